"""The emulator keeps the service's rules; checked through a real boto3 client."""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import datetime, timezone
from typing import Any

import pytest

from agent.aggregate import Quantity
from agent.emulator import Emulator
from agent.host.imds import Imds
from agent.sending.client import MeteringClient
from tests.billing import sealed_hour
from tests.conftest import PRODUCT


@pytest.fixture
def client(emulator: Emulator) -> MeteringClient:
    return MeteringClient("us-east-1", emulator.url)


def now_hour() -> float:
    t = datetime.now(timezone.utc).timestamp()
    return t - t % 3600


def send(client: MeteringClient, **kw: Any):
    args: dict[str, Any] = {
        "product_code": PRODUCT,
        "dimension": "vcpus",
        "timestamp": now_hour() - 3600 + 59 * 60,
        "quantity": Quantity(4),
        "client_token": "tok-1",
    }
    args.update(kw)
    return client.meter_usage(sealed_hour(**args))


def test_identical_request_returns_the_same_record(
    client: MeteringClient, emulator: Emulator
) -> None:
    first = send(client)
    again = send(client)
    assert first.status == again.status == "sent"
    assert first.record_id == again.record_id
    assert len(emulator.records()) == 1


def test_timestamp_is_rounded_to_the_hour(client: MeteringClient, emulator: Emulator) -> None:
    base = now_hour() - 3600
    a = send(client, timestamp=base + 60, client_token="a")
    b = send(client, timestamp=base + 3000, client_token="b")  # same hour, same quantity
    assert a.record_id == b.record_id
    c = send(client, timestamp=base + 3000, quantity=Quantity(5), client_token="c")
    assert (c.status, c.code) == ("rejected", "DuplicateRequestException")
    assert [r.quantity_text for r in emulator.records()] == ["4"]


def test_quantities_compare_by_value(client: MeteringClient) -> None:
    a = send(client, quantity=Quantity(17), client_token="x1")
    b = send(client, quantity=Quantity("17.00"), client_token="x2")
    assert a.record_id == b.record_id


def test_reused_client_token_with_other_parameters(client: MeteringClient) -> None:
    send(client, client_token="same")
    other = send(client, dimension="users", client_token="same")
    assert (other.status, other.code) == ("rejected", "IdempotencyConflictException")


def test_six_hour_window(client: MeteringClient) -> None:
    old = send(client, timestamp=now_hour() - 7 * 3600, client_token="old")
    assert (old.status, old.code) == ("expired", "TimestampOutOfBoundsException")


def test_unknown_product_and_dimension(client: MeteringClient, emulator: Emulator) -> None:
    r = send(client, product_code="otherproduct123", client_token="p")
    assert r.code == "InvalidProductCodeException" and r.status == "held"
    emulator.configure(dimensions={"vcpus"})
    r = send(client, dimension="bogus", client_token="d")
    assert r.code == "InvalidUsageDimensionException" and r.status == "held"


def test_quantity_validation(client: MeteringClient) -> None:
    r = client.call(
        {
            "ProductCode": PRODUCT,
            "Timestamp": datetime.now(timezone.utc),
            "UsageDimension": "vcpus",
            "UsageQuantity": 1,
            "UsageQuantityAsDecimal": "1",
        }
    )
    assert r.code == "ValidationException"


def test_allocations_must_sum(client: MeteringClient) -> None:
    base = {
        "ProductCode": PRODUCT,
        "Timestamp": datetime.now(timezone.utc),
        "UsageDimension": "vcpus",
        "UsageQuantityAsDecimal": "3",
    }
    bad = client.call({**base, "UsageAllocations": [{"AllocatedUsageQuantityAsDecimal": "1"}]})
    assert bad.code == "InvalidUsageAllocationsException"
    good = client.call(
        {
            **base,
            "UsageAllocations": [
                {"AllocatedUsageQuantityAsDecimal": "1", "Tags": [{"Key": "k", "Value": "a"}]},
                {"AllocatedUsageQuantityAsDecimal": "2", "Tags": [{"Key": "k", "Value": "b"}]},
            ],
        }
    )
    assert good.status == "sent"


def test_token_bucket_throttles_bursts(client: MeteringClient, emulator: Emulator) -> None:
    emulator.configure(rate=1.0, burst=3.0)
    outcomes = [send(client, dimension=f"d{i}", client_token=f"t{i}").code for i in range(6)]
    assert outcomes[:3] == [None, None, None]
    assert "ThrottlingException" in outcomes[3:]


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"kind": "error"}, "retry", "InternalServiceErrorException"),
        (
            {"kind": "error", "code": "ThrottlingException", "status": 400},
            "retry",
            "ThrottlingException",
        ),
        ({"kind": "drop"}, "retry", None),
        ({"kind": "lose"}, "retry", None),
    ],
)
def test_faults(
    client: MeteringClient, emulator: Emulator, fault: dict[str, Any], status: str, code: str | None
) -> None:
    emulator.inject(**fault)
    r = send(client)
    assert r.status == status
    if code:
        assert r.code == code
    recorded = len(emulator.records())
    assert recorded == (1 if fault["kind"] == "lose" else 0)
    # the retry with the identical request ends in exactly one record
    again = send(client)
    assert again.status == "sent"
    assert len(emulator.records()) == 1


def test_region_must_match_the_instance(emulator: Emulator) -> None:
    r = send(MeteringClient("eu-west-1", emulator.url))
    assert (r.status, r.code) == ("retry", "InvalidEndpointRegionException")


def test_imds_is_v2_only(emulator: Emulator) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{emulator.url}/latest/meta-data/instance-id")
    assert info.value.code == 401
    imds = Imds(emulator.url)
    assert imds.instance_id() == emulator.settings.instance_id
    assert imds.region() == "us-east-1"


def test_control_api_over_http(emulator: Emulator) -> None:
    req = urllib.request.Request(
        f"{emulator.url}/_emulator/settings", data=json.dumps({"region": "eu-central-1"}).encode()
    )
    urllib.request.urlopen(req).read()
    assert emulator.settings.region == "eu-central-1"
    records = json.loads(urllib.request.urlopen(f"{emulator.url}/_emulator/records").read())
    assert records == []


@pytest.mark.parametrize("product", ["", "x" * 256, "has space"])
def test_a_product_code_the_config_refuses_the_service_refuses(
    emulator: Emulator, product: str
) -> None:
    """One pattern for both: a 0-character product code was once accepted here."""
    from agent.config import PRODUCT_CODE
    from agent.emulator import ServiceError

    assert re.fullmatch(PRODUCT_CODE, product) is None
    body = {"ProductCode": product, "UsageDimension": "vcpus", "Timestamp": now_hour()}
    with pytest.raises(ServiceError) as info:
        emulator.meter_usage({**body, "UsageQuantity": 1}, "caller", None)
    assert info.value.code == "ValidationException"
    assert emulator.calls() == [] and emulator.records() == []


def test_the_emulator_command_refuses_dimensions_outside_its_listing(monkeypatch) -> None:
    """`emulator --dimensions` plays the listing: other names get InvalidUsageDimensionException."""
    import os
    import subprocess
    import sys
    from datetime import datetime, timezone

    from agent.sending.client import MeteringClient
    from tests.conftest import ROOT

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "emulator", "--port", str(port), "--any-product",
         "--dimensions", "vcpus, egress_gb"],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and "listening" in proc.stdout.readline()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIATEST")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        client = MeteringClient("us-east-1", f"http://127.0.0.1:{port}")
        now = datetime.now(timezone.utc).timestamp()
        assert client.dry_run("p1", "vcpus", None, now).status == "dryrun_ok"
        assert client.dry_run("p1", "egress_gb", None, now).status == "dryrun_ok"
        refused = client.dry_run("p1", "users", None, now)
        assert refused.code == "InvalidUsageDimensionException"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
