from __future__ import annotations

from datetime import datetime, timezone

import pytest
from botocore.stub import Stubber

from agent.aggregate import Quantity
from agent.emulator import Emulator
from agent.errors import AgentError, NotAuthorized, Unavailable
from agent.host.imds import Imds, ImdsError, resolve_region
from agent.sending.client import MeteringClient, dry_run_verdict
from agent.sending.outcomes import Outcome, classify
from tests.billing import sealed_hour
from tests.conftest import PRODUCT


class TestRegion:
    def test_config_wins(self) -> None:
        env = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}
        assert resolve_region("ap-south-1", env) == ("ap-south-1", "config metering.region")

    def test_aws_region_then_default_region(self) -> None:
        env = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}
        assert resolve_region("auto", env)[0] == "eu-west-1"
        assert resolve_region("auto", {"AWS_DEFAULT_REGION": "eu-west-2"})[0] == "eu-west-2"

    def test_imds_last(self, emulator: Emulator) -> None:
        emulator.configure(region="sa-east-1")
        env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
        assert resolve_region("auto", env) == ("sa-east-1", "IMDS placement/region")

    def test_imds_unreachable_is_unavailable(self) -> None:
        with pytest.raises(ImdsError, match="unreachable") as info:
            resolve_region("auto", {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9"})
        assert info.value.exit_code == 69


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ThrottlingException", 400, "retry"),
        ("InternalServiceErrorException", 500, "retry"),
        ("SomethingNew", 503, "retry"),
        ("InvalidEndpointRegionException", 400, "retry"),
        ("AccessDeniedException", 400, "unauthorized"),
        ("UnauthorizedException", 401, "unauthorized"),
        ("TimestampOutOfBoundsException", 400, "expired"),
        ("DuplicateRequestException", 400, "rejected"),
        ("IdempotencyConflictException", 409, "rejected"),
        ("CustomerNotEntitledException", 400, "rejected"),
        ("InvalidUsageDimensionException", 400, "held"),
        ("InvalidProductCodeException", 400, "held"),
        ("InvalidSignatureException", 403, "retry"),
        ("UnrecognizedClientException", 403, "retry"),
        ("ExpiredTokenException", 403, "retry"),
        ("SignatureDoesNotMatch", 403, "retry"),
    ],
)
def test_error_classes_through_a_stubbed_client(
    code: str, status: int, expected: str, static_credentials: None
) -> None:
    client = MeteringClient("us-east-1", "http://127.0.0.1:9")
    with Stubber(client.client) as stub:
        stub.add_client_error("meter_usage", service_error_code=code, http_status_code=status)
        outcome = client.meter_usage(sealed_hour("vcpus", 1_800_000_000, Quantity(1), "tok"))
    assert (outcome.status, outcome.code) == (expected, code)
    assert classify(code, status) == expected


@pytest.fixture
def static_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSTUB")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stub")


def test_request_carries_sealed_fields_exactly(static_credentials: None) -> None:
    client = MeteringClient("us-east-1", "http://127.0.0.1:9")
    with Stubber(client.client) as stub:
        stub.add_response(
            "meter_usage",
            {"MeteringRecordId": "rec-1"},
            {
                "ProductCode": PRODUCT,
                "Timestamp": datetime(2027, 1, 15, 8, 59, 0, tzinfo=timezone.utc),
                "UsageDimension": "gb",
                "UsageQuantityAsDecimal": "1.250",
                "ClientToken": "sealed-token",
            },
        )
        ts = datetime(2027, 1, 15, 8, 59, 0, 900000, tzinfo=timezone.utc).timestamp()
        outcome = client.meter_usage(sealed_hour("gb", ts, Quantity("1.250"), "sealed-token"))
    assert outcome == Outcome("sent", record_id="rec-1")


@pytest.mark.parametrize("style", ["error", "200"])
def test_dry_run_success_in_both_styles(emulator: Emulator, style: str) -> None:
    emulator.configure(dryrun_style=style)
    client = MeteringClient("us-east-1", emulator.url)
    out = client.dry_run(PRODUCT, "vcpus", None, datetime.now(timezone.utc).timestamp())
    assert out.status == "dryrun_ok"
    assert "permitted" in dry_run_verdict(out)
    assert emulator.records() == []


@pytest.mark.parametrize(
    ("settings", "error", "text", "exit_code"),
    [
        ({"authorized": False}, NotAuthorized, "aws-marketplace:MeterUsage", 77),
        (
            {"authorized": False, "deny_code": "UnauthorizedException"},
            NotAuthorized,
            "instance role",
            77,
        ),
        ({"entitled": False}, NotAuthorized, "subscription", 77),
        ({"product_codes": {"someotherproduct"}}, NotAuthorized, "product_code matches", 77),
        ({"region": "eu-west-1"}, Unavailable, "instance's region", 69),
        ({"dimensions": {"other"}}, NotAuthorized, "dimension of the listing", 77),
    ],
)
def test_dry_run_refusals(
    emulator: Emulator, settings: dict, error: type, text: str, exit_code: int
) -> None:
    emulator.configure(**settings)
    client = MeteringClient("us-east-1", emulator.url)
    out = client.dry_run(PRODUCT, "vcpus", None, datetime.now(timezone.utc).timestamp())
    with pytest.raises(error, match=text) as info:
        dry_run_verdict(out)
    assert info.value.exit_code == exit_code  # sysexits: 77 no permission, 69 unavailable


def test_dry_run_with_nothing_listening_is_unavailable() -> None:
    client = MeteringClient("us-east-1", "http://127.0.0.1:9", connect_timeout=1)
    out = client.dry_run(PRODUCT, "vcpus", None, 1_800_000_000)
    assert out.status == "retry"
    with pytest.raises(Unavailable):
        dry_run_verdict(out)


def test_no_credentials_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    # IMDS points at a closed port: the default chain finds nothing
    client = MeteringClient("us-east-1", "http://127.0.0.1:9")
    assert not client.has_credentials()
    out = client.dry_run(PRODUCT, "vcpus", None, 1_800_000_000)
    assert out.code == "NoCredentials"
    with pytest.raises(Unavailable, match="no AWS credentials"):
        dry_run_verdict(out)


def test_imds_token_is_fetched_once(emulator: Emulator) -> None:
    imds = Imds(emulator.url)
    imds.region()
    imds.instance_id()
    puts = [c for c in emulator.calls() if c.get("operation") == "token"]
    assert puts == []  # token PUTs are not MeterUsage calls
    assert imds._token is not None


def test_dry_run_with_a_wrong_clock_says_so(emulator: Emulator) -> None:
    client = MeteringClient("us-east-1", emulator.url)
    seven_hours_ago = datetime.now(timezone.utc).timestamp() - 7 * 3600
    out = client.dry_run(PRODUCT, "vcpus", None, seven_hours_ago)
    with pytest.raises(AgentError, match="clock is off") as info:
        dry_run_verdict(out)
    assert info.value.exit_code == 1


@pytest.mark.parametrize(
    ("decimals", "field", "value"),
    [(None, "UsageQuantity", 0), (3, "UsageQuantityAsDecimal", "0.000")],
)
def test_dry_run_sends_a_zero_of_the_dimensions_type(
    emulator: Emulator, decimals: int | None, field: str, value: object
) -> None:
    client = MeteringClient("us-east-1", emulator.url)
    out = client.dry_run(PRODUCT, "vcpus", decimals, datetime.now(timezone.utc).timestamp())
    assert out.status == "dryrun_ok"
    (call,) = emulator.received()
    assert call["request"][field] == value


def test_signature_expired_message_is_retryable_and_names_the_skew(
    static_credentials: None,
) -> None:
    """An answer whose `Date` is 20 minutes behind this machine's clock: the reason says so."""
    from tests.fakes import FakeClock

    clock = FakeClock(1_800_000_000 + 1200)
    client = MeteringClient("us-east-1", "http://127.0.0.1:9", clock=clock)
    with Stubber(client.client) as stub:
        stub.add_client_error(
            "meter_usage",
            service_error_code="SomethingUnlisted",
            service_message="Signature expired: 20270115T082000Z is now earlier than ...",
            http_status_code=400,
            response_meta={"HTTPHeaders": {"date": "Fri, 15 Jan 2027 08:00:00 GMT"}},
        )
        outcome = client.meter_usage(sealed_hour("vcpus", 1_800_000_000, Quantity(1), "tok"))
    assert outcome.status == "retry"
    assert "1200 s ahead of the service" in (outcome.error or "")


def test_a_clock_in_step_names_no_skew(static_credentials: None) -> None:
    from tests.fakes import FakeClock

    client = MeteringClient("us-east-1", "http://127.0.0.1:9", clock=FakeClock(1_800_000_010))
    with Stubber(client.client) as stub:
        stub.add_client_error(
            "meter_usage",
            service_error_code="InvalidSignatureException",
            http_status_code=403,
            response_meta={"HTTPHeaders": {"date": "Fri, 15 Jan 2027 08:00:00 GMT"}},
        )
        outcome = client.meter_usage(sealed_hour("vcpus", 1_800_000_000, Quantity(1), "tok"))
    assert outcome.status == "retry" and "clock" not in (outcome.error or "")


def test_a_skewed_clock_through_the_emulator(static_credentials: None) -> None:
    """A real boto3 client on a machine 10 minutes behind the service: refused, retryable (the
    hour is not lost), and the reason names the skew from the answer's `Date`."""
    from agent.clock import Clock
    from agent.emulator import Settings

    now = datetime.now(timezone.utc).timestamp()
    service_clock = Clock(origin=now + 600, wall0=now)  # the service is 10 minutes ahead
    emulator = Emulator(Settings(signature_window=300), service_clock)
    url = emulator.serve(0)
    try:
        client = MeteringClient("us-east-1", url)
        out = client.meter_usage(sealed_hour("vcpus", now, Quantity(1), "tok-skew"))
    finally:
        emulator.stop()
    assert (out.status, out.code) == ("retry", "InvalidSignatureException")
    assert "Signature expired" in (out.error or "")
    assert "behind the service" in (out.error or "")
    assert emulator.records() == []
