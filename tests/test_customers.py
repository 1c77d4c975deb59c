"""SaaS customers: ResolveCustomer through a real boto3 client against the emulator, the
`customers` and `resolve-customer` commands, and the fulfillment WSGI app."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from agent.clock import Clock
from agent.config.tables import check_redirect
from agent.emulator import Emulator, Settings
from agent.errors import NotAuthorized, Unavailable
from agent.fulfillment import make_app
from agent.fulfillment.handler import Registrar
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.sending.client import MeteringClient
from agent.sending.outcomes import TokenRefused
from tests.conftest import PRODUCT, ROOT, run_cli

ACCOUNT = "111122223333"
LICENSE = "arn:aws:license-manager::111122223333:license:l-0123456789abcdef"
AGREEMENT = "agmt-1a2b3c"
REDIRECT = (
    "https://app.example.com/welcome?account={customer_aws_account_id}&license={license_arn}"
    "&agreement={agreement_id}&c={customer}"
)


class Shifted(Clock):
    """A real clock that a test moves forward, and whose sleeps are recorded, not slept."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0
        self.slept: list[float] = []

    def time(self) -> float:
        return super().time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture(autouse=True)
def restore_logging() -> Any:
    """cli.main points the root logger at this test's captured stderr: put it back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSTUBSTUBSTUB")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stubsecret")


@pytest.fixture
def emu(creds: None) -> Any:
    emulator = Emulator(Settings(product_codes={PRODUCT}), Shifted())
    emulator.serve(0)
    yield emulator
    emulator.stop()


def saas_config(tmp_path: Path, url: str, mode: str = "saas", redirect: str = REDIRECT) -> Path:
    saas = (
        f"""
        saas:
          registration:
            listen: 127.0.0.1:8788
            redirect: '{redirect}'
        """
        if mode == "saas"
        else ""
    )
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            mode: {mode}
            metering: {{endpoint_url: "{url}", region: us-east-1, send_window: 0}}
            dimensions:
              - name: requests
                collector:
                  type: log
                  path: {tmp_path / "app.log"}
                  pattern: 'customer=(?P<customer>\\S+)'
            """
        )
        + textwrap.dedent(saas)
    )
    return path


def customers_in(tmp_path: Path) -> list[Customer]:
    if not (tmp_path / "state" / "ledger.db").exists():
        return []
    ledger = Ledger(tmp_path / "state", readonly=True)
    try:
        return ledger.customers(include_removed=True)
    finally:
        ledger.close()


def cli_main(*argv: str) -> int:
    return cli.main(list(argv))


# -- ResolveCustomer -------------------------------------------------------------------------


def test_resolve_customer_new_and_legacy(emu: Emulator) -> None:
    client = MeteringClient("us-east-1", emu.url)
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    got = client.resolve_customer(token)
    assert (got.account_id, got.license_arn, got.agreement_id, got.customer_identifier) == (
        ACCOUNT, LICENSE, AGREEMENT, None,
    )  # fmt: skip
    assert got.product_code == PRODUCT
    legacy = client.resolve_customer(emu.issue_token(legacy_identifier="cust-legacy-9"))
    assert (legacy.customer_identifier, legacy.license_arn) == ("cust-legacy-9", None)
    sent = [c["request"] for c in emu.received() if c["operation"] == "ResolveCustomer"]
    assert sent[0] == {"RegistrationToken": token}


def test_invalid_token_is_one_line_exit_77(emu: Emulator) -> None:
    client = MeteringClient("us-east-1", emu.url)
    with pytest.raises(TokenRefused) as info:
        client.resolve_customer("emu-reg-never-issued")
    assert info.value.exit_code == 77 and "\n" not in str(info.value)
    assert "InvalidTokenException" in str(info.value)


def test_expired_token_on_the_emulators_clock(emu: Emulator) -> None:
    client = MeteringClient("us-east-1", emu.url)
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, expires_in=60)
    assert client.resolve_customer(token).account_id == ACCOUNT  # in time
    assert isinstance(emu.clock, Shifted)
    emu.clock.offset = 61
    with pytest.raises(TokenRefused) as info:
        client.resolve_customer(token)
    assert "ExpiredTokenException" in str(info.value) and "redeemed at once" in str(info.value)
    assert [c.get("code") for c in emu.calls()] == [None, "ExpiredTokenException"]


def test_throttling_is_retried_with_backoff(emu: Emulator) -> None:
    clock = Shifted()
    client = MeteringClient("us-east-1", emu.url, clock=clock)
    emu.inject("error", operation="ResolveCustomer", code="ThrottlingException", status=400,
               count=2)  # fmt: skip
    token = emu.issue_token(account=ACCOUNT, license=LICENSE)
    assert client.resolve_customer(token).license_arn == LICENSE
    codes = [c.get("code") for c in emu.calls()]
    assert codes == ["ThrottlingException", "ThrottlingException", None]
    assert clock.slept == [0.25, 0.5]  # doubling backoff, on the client's clock


def test_throttling_that_does_not_end_is_unavailable(emu: Emulator) -> None:
    clock = Shifted()
    client = MeteringClient("us-east-1", emu.url, clock=clock)
    emu.inject("error", operation="ResolveCustomer", code="ThrottlingException", status=400,
               count=99)  # fmt: skip
    with pytest.raises(Unavailable) as info:
        client.resolve_customer(emu.issue_token(account=ACCOUNT, license=LICENSE))
    assert info.value.exit_code == 69 and len(emu.calls()) == 5 and len(clock.slept) == 4


def test_access_denied_is_77_naming_the_permission(emu: Emulator) -> None:
    emu.configure(authorized=False)
    client = MeteringClient("us-east-1", emu.url)
    with pytest.raises(NotAuthorized, match="aws-marketplace:ResolveCustomer") as info:
        client.resolve_customer(emu.issue_token(account=ACCOUNT, license=LICENSE))
    assert not isinstance(info.value, TokenRefused)


# -- the commands ------------------------------------------------------------------------------


def test_customers_add_by_token_list_remove(
    emu: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(saas_config(tmp_path, emu.url))
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    assert cli_main("customers", "add", "-c", cfg, "--token", token) == 0
    assert cli_main("customers", "add", "-c", cfg, "--account", "444455556666", "--license",
                    LICENSE.replace("1111", "4444"), "--as", "globex") == 0  # fmt: skip
    assert cli_main("customers", "add", "-c", cfg, "--customer-identifier", "cust-old",
                    "--as", "initech") == 0  # fmt: skip
    stored = {c.label: c for c in customers_in(tmp_path)}
    assert set(stored) == {ACCOUNT, "globex", "initech"}
    assert (stored[ACCOUNT].license_arn, stored[ACCOUNT].agreement_id) == (LICENSE, AGREEMENT)
    assert stored["initech"].legacy and stored["initech"].customer_identifier == "cust-old"
    capsys.readouterr()
    assert cli_main("customers", "list", "-c", cfg, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["label"] for c in listed] == sorted(stored)
    assert listed[0]["customer_aws_account_id"] == ACCOUNT and listed[0]["removed_at"] is None
    assert cli_main("customers", "remove", "-c", cfg, "globex") == 0
    assert customers_in(tmp_path)[1].removed_at is not None
    assert cli_main("customers", "remove", "-c", cfg, "nobody") == 1
    assert cli_main("customers", "list", "-c", cfg) == 0
    assert "removed" in capsys.readouterr().out


def test_customers_add_refuses_a_label_of_another_buyer(emu: Emulator, tmp_path: Path) -> None:
    cfg = str(saas_config(tmp_path, emu.url))
    assert cli_main("customers", "add", "-c", cfg, "--account", ACCOUNT, "--license", LICENSE,
                    "--as", "acme") == 0  # fmt: skip
    other = emu.issue_token(account="999988887777", license=LICENSE.replace("1111", "9999"))
    assert cli_main("customers", "add", "-c", cfg, "--token", other, "--as", "acme") == 1
    assert [c.account_id for c in customers_in(tmp_path)] == [ACCOUNT]
    # the same buyer again with a new license: updated, under its first added_at
    first = customers_in(tmp_path)[0]
    again = emu.issue_token(account=ACCOUNT, license=LICENSE + "2", agreement="agmt-2")
    assert cli_main("customers", "add", "-c", cfg, "--token", again, "--as", "acme") == 0
    now = customers_in(tmp_path)[0]
    assert (now.license_arn, now.agreement_id, now.added_at) == (
        LICENSE + "2", "agmt-2", first.added_at,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--token", "emu-reg-never-issued"], 77),
        (["--account", "12345", "--license", LICENSE, "--as", "x"], 2),
        (["--account", ACCOUNT, "--license", "not-an-arn", "--as", "x"], 2),
        (["--account", ACCOUNT, "--license", LICENSE], 2),
        (["--account", ACCOUNT, "--as", "x"], 2),
    ],
)
def test_customers_add_refusals_store_nothing(
    emu: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int
) -> None:
    cfg = str(saas_config(tmp_path, emu.url))
    assert cli_main("customers", "add", "-c", cfg, *args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert customers_in(tmp_path) == []


def test_expired_token_through_the_command(emu: Emulator, tmp_path: Path) -> None:
    cfg = str(saas_config(tmp_path, emu.url))
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, expires_in=0)
    result = run_cli("customers", "add", "-c", cfg, "--token", token)
    assert result.returncode == 77, result.stderr
    assert "expired" in result.stderr and result.stderr.count("\n") == 1
    assert customers_in(tmp_path) == []


def test_customers_need_saas_mode(emu: Emulator, tmp_path: Path) -> None:
    cfg = str(saas_config(tmp_path, emu.url, mode="instance"))
    assert cli_main("customers", "list", "-c", cfg) == 78
    assert cli_main("customers", "add", "-c", cfg, "--account", ACCOUNT, "--license", LICENSE,
                    "--as", "x") == 78  # fmt: skip


def test_resolve_customer_prints_json_and_stores_nothing(emu: Emulator, tmp_path: Path) -> None:
    cfg = str(saas_config(tmp_path, emu.url))
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    result = run_cli("resolve-customer", "-c", cfg, token)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "CustomerAWSAccountId": ACCOUNT,
        "LicenseArn": LICENSE,
        "AgreementId": AGREEMENT,
        "CustomerIdentifier": None,
        "ProductCode": PRODUCT,
    }
    assert customers_in(tmp_path) == []
    bad = subprocess.run(
        [sys.executable, "-m", "agent", "resolve-customer", "-c", cfg, "-"],
        input="emu-reg-unknown\n", capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 77 and "InvalidTokenException" in bad.stderr


def test_unreachable_service_is_69(tmp_path: Path, creds: None) -> None:
    cfg = str(saas_config(tmp_path, "http://127.0.0.1:9"))
    result = run_cli("customers", "add", "-c", cfg, "--token", "anything", timeout=120)
    assert result.returncode == 69, result.stderr
    assert customers_in(tmp_path) == []


# -- the fulfillment app -----------------------------------------------------------------------


def wsgi(app: Any, method: str, body: bytes = b"") -> tuple[str, dict[str, str], bytes]:
    got: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        got.update(status=status, headers=dict(headers))

    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/register",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    out = b"".join(app(environ, start_response))
    return got["status"], got["headers"], out


def test_app_registers_and_redirects_with_quoted_fields(emu: Emulator, tmp_path: Path) -> None:
    from agent import config

    cfg = config.load(saas_config(tmp_path, emu.url))
    app = make_app(cfg)
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    body = urllib.parse.urlencode({"x-amzn-marketplace-token": token}).encode()
    status, headers, _ = wsgi(app, "POST", body)
    assert status.startswith("302")
    q = urllib.parse.quote
    assert headers["Location"] == (
        f"https://app.example.com/welcome?account={ACCOUNT}&license={q(LICENSE, safe='')}"
        f"&agreement={AGREEMENT}&c={ACCOUNT}"
    )
    assert [(c.label, c.license_arn) for c in customers_in(tmp_path)] == [(ACCOUNT, LICENSE)]
    expired = emu.issue_token(account="999988887777", license=LICENSE, expires_in=0)
    for form in ({"x-amzn-marketplace-token": expired}, {"x-amzn-marketplace-token": "bogus"}, {}):
        status, headers, text = wsgi(app, "POST", urllib.parse.urlencode(form).encode())
        assert status.startswith("400") and "Location" not in headers and b"expired" in text
    assert len(customers_in(tmp_path)) == 1
    assert wsgi(app, "GET")[0].startswith("200")
    assert wsgi(app, "PUT")[0].startswith("405")


def test_app_unavailable_service_is_503(tmp_path: Path, creds: None) -> None:
    from agent import config

    cfg = config.load(saas_config(tmp_path, "http://127.0.0.1:9"))
    registrar = Registrar(cfg, Shifted())
    app = make_app(cfg, registrar=registrar)
    status, headers, _ = wsgi(app, "POST", b"x-amzn-marketplace-token=abc")
    assert status.startswith("503") and "Location" not in headers
    assert customers_in(tmp_path) == []


def test_redirect_may_name_only_the_filled_fields() -> None:
    assert check_redirect(REDIRECT) == REDIRECT
    with pytest.raises(Exception, match=r"saas.registration.redirect: unknown field \{acount\}"):
        check_redirect("https://x.example/?a={acount}")


def test_a_redirect_naming_an_unknown_field_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = str(saas_config(tmp_path, "http://127.0.0.1:9", redirect="https://x.example/?a={acount}"))
    assert cli_main("check", "--offline", "-c", cfg) == 78
    assert "saas.registration.redirect" in capsys.readouterr().err
    assert cli_main("run", "-c", cfg) == 78  # before any lock or ledger is made
    assert not (tmp_path / "state").exists()


def test_a_token_for_another_product_is_refused(
    emu: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent import config

    path = saas_config(tmp_path, emu.url)
    other = emu.issue_token(account=ACCOUNT, license=LICENSE, product="zzzz1234efgh5678ijkl90mn")
    assert cli_main("customers", "add", "-c", str(path), "--token", other) == 77
    assert "zzzz1234efgh5678ijkl90mn" in capsys.readouterr().err
    status, headers, _ = wsgi(
        make_app(config.load(path)), "POST", f"x-amzn-marketplace-token={other}".encode()
    )
    assert status.startswith("503") and "Location" not in headers
    assert customers_in(tmp_path) == []


def test_an_expired_session_of_the_sellers_credentials_is_not_the_buyers_token(
    emu: Emulator,
) -> None:
    emu.inject("error", operation="ResolveCustomer", code="ExpiredTokenException", status=400,
               message="The security token included in the request is expired")  # fmt: skip
    client = MeteringClient("us-east-1", emu.url)
    with pytest.raises(Unavailable, match="credentials") as info:
        client.resolve_customer(emu.issue_token(account=ACCOUNT, license=LICENSE))
    assert info.value.exit_code == 69


def test_customers_without_an_action_shows_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main("customers") == 2
    err = capsys.readouterr().err
    assert "metering-agent customers" in err and "remove" in err


def test_emulator_tokens_over_http(emu: Emulator) -> None:
    import urllib.error
    import urllib.request

    def make(body: dict[str, Any]) -> Any:
        req = urllib.request.Request(emu.url + "/_emulator/tokens", json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read())

    token = make({"account": ACCOUNT, "license": LICENSE, "agreement": AGREEMENT,
                  "legacy_identifier": None, "expires_in": 3600})["token"]  # fmt: skip
    client = MeteringClient("us-east-1", emu.url)
    assert client.resolve_customer(token).agreement_id == AGREEMENT
    with pytest.raises(urllib.error.HTTPError) as info:
        make({"account": ACCOUNT})  # no license, no legacy identifier: not a customer
    assert info.value.code == 400
