"""RegisterUsage (issue 15): the PS256 JWT verification, the retry classification, the backoff
budget, the child's exit mapping, the config section and the emulator's service rules.

Oracles: tokens signed by the emulator's own key (and by another key, for forgeries), the real
boto3 client against the emulator, botocore's Stubber for the error mapping, and exit codes."""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import textwrap
import urllib.request
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from agent import config as config_mod
from agent.commands import status
from agent.config import RegisterUsage, public_key_problem
from agent.emulator import Emulator, ServiceError, Settings, b64url, sign_jwt
from agent.errors import AgentError, ConfigError, NotAuthorized, Unavailable
from agent.ledger import Ledger
from agent.sending import registration
from agent.sending.client import MeteringClient
from agent.sending.outcomes import Registration, classify_registration
from tests.billing import make_config
from tests.conftest import PRODUCT, ConfigWriter, run_cli
from tests.fakes import FakeClock

NOW = 1_800_000_000.0
NONCE = "n0nce-" + "x" * 20


@pytest.fixture(scope="module")
def service() -> Emulator:
    """An emulator (not serving) whose key signs the tokens, as RegisterUsage's would."""
    return Emulator(Settings(product_codes={PRODUCT}))


@pytest.fixture(scope="module")
def pem(service: Emulator) -> bytes:
    return service.public_key_pem()


@pytest.fixture(scope="module")
def other_key() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def claims(**changes: Any) -> dict[str, Any]:
    base = {"productCode": PRODUCT, "publicKeyVersion": 1, "nonce": NONCE, "iat": int(NOW)}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


EXPECTED = {"productCode": PRODUCT, "publicKeyVersion": 1, "nonce": NONCE}


def refused_by(token: Any, pem: bytes, now: float = NOW) -> str:
    with pytest.raises(NotAuthorized) as info:
        registration.verify(token, pem, EXPECTED, now)
    assert info.value.exit_code == 77
    assert "\n" not in str(info.value)
    return str(info.value)


# -- the JWT -------------------------------------------------------------------------------------


def test_a_token_of_the_emulators_key_verifies(service: Emulator, pem: bytes) -> None:
    token = sign_jwt(service.private_key, claims())
    assert registration.verify(token, pem, EXPECTED, NOW) == claims()


def test_a_token_signed_by_another_key_is_refused(pem: bytes, other_key: Any) -> None:
    assert "does not verify" in refused_by(sign_jwt(other_key, claims()), pem)


def test_claims_changed_after_signing_are_refused(service: Emulator, pem: bytes) -> None:
    head, _, sig = sign_jwt(service.private_key, claims()).split(".")
    body = b64url(json.dumps(claims(productCode="other-product")).encode())
    assert "does not verify" in refused_by(f"{head}.{body}.{sig}", pem)


def test_alg_none_is_refused(pem: bytes) -> None:
    head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    assert "alg is 'none'" in refused_by(f"{head}.{body}.", pem)


def test_hs256_keyed_with_the_public_key_is_refused(pem: bytes) -> None:
    """The classic confusion: a MAC whose secret is the public key everybody has."""
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims()).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    assert "alg is 'HS256'" in refused_by(f"{head}.{body}.{b64url(mac)}", pem)


def test_rs256_by_the_right_key_is_still_refused(service: Emulator, pem: bytes) -> None:
    head = b64url(json.dumps({"alg": "RS256"}).encode())
    body = b64url(json.dumps(claims()).encode())
    sig = service.private_key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    assert "RS256" in refused_by(f"{head}.{body}.{b64url(sig)}", pem)


def test_a_ps256_header_over_a_pkcs1_signature_is_refused(service: Emulator, pem: bytes) -> None:
    head = b64url(json.dumps({"alg": "PS256"}).encode())
    body = b64url(json.dumps(claims()).encode())
    sig = service.private_key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
    assert "does not verify" in refused_by(f"{head}.{body}.{b64url(sig)}", pem)


@pytest.mark.parametrize(
    ("changes", "claim"),
    [
        ({"nonce": "another-nonce"}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"productCode": "other-product"}, "productCode"),
        ({"publicKeyVersion": 2}, "publicKeyVersion"),
        ({"publicKeyVersion": "1"}, "publicKeyVersion"),
        ({"publicKeyVersion": True}, "publicKeyVersion"),
    ],
)
def test_a_claim_other_than_what_was_sent_is_refused(
    service: Emulator, pem: bytes, changes: dict[str, Any], claim: str
) -> None:
    token = sign_jwt(service.private_key, claims(**changes))
    assert f"claim {claim} is" in refused_by(token, pem)


@pytest.mark.parametrize(
    ("iat", "ok"),
    [
        (NOW - 299, True),
        (NOW + 299, True),
        (NOW - 301, False),
        (NOW + 301, False),
        (NOW - 86400, False),
        ("1800000000", False),
        (None, False),
        (NOW * 1000, False),  # milliseconds
        (float("inf"), False),
        (float("-inf"), False),
        (float("nan"), False),
        (1e308, False),
    ],
)
def test_iat_within_five_minutes_of_now(service: Emulator, pem: bytes, iat: Any, ok: bool) -> None:
    token = sign_jwt(service.private_key, claims(iat=iat))
    if ok:
        assert registration.verify(token, pem, EXPECTED, NOW)["iat"] == iat
    else:
        assert "claim iat" in refused_by(token, pem)


@pytest.mark.parametrize(
    "token",
    [
        None,
        42,
        "",
        "only.two",
        "a.b.c.d",
        "!!!.@@@.###",
        f"{b64url(b'not json')}.{b64url(b'{}')}.{b64url(b'sig')}",
        f"{b64url(b'[1]')}.{b64url(b'{}')}.{b64url(b'sig')}",
        # standard base64 (with padding) is not base64url
        "eyJhbGciOiJQUzI1NiJ9.e30=.c2ln",
    ],
)
def test_a_malformed_token_is_refused_in_one_line(pem: bytes, token: Any) -> None:
    assert "JWT" in refused_by(token, pem)


def test_a_key_that_is_not_rsa_cannot_verify(service: Emulator, tmp_path: Path) -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(AgentError, match="not an RSA public key"):
        registration.verify(sign_jwt(service.private_key, claims()), ec_pem, EXPECTED, NOW)


def test_nonces_are_fresh_and_fit_the_api() -> None:
    nonces = {registration.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(16 <= len(n) <= 255 for n in nonces)


# -- the config section ----------------------------------------------------------------------


def write_key(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_config_section_loads(tmp_path: Path, other_key: Any) -> None:
    key = write_key(tmp_path / "key.pem", other_key.public_key())
    extra = f"register_usage: {{public_key_version: 3, public_key: {key}}}\n"
    cfg = make_config(tmp_path, extra=extra)
    assert cfg.register_usage == RegisterUsage(public_key_version=3, public_key=str(key))
    assert make_config(tmp_path).register_usage is None
    only = make_config(tmp_path, extra="register_usage: {public_key_version: 1}\n")
    assert only.register_usage == RegisterUsage(1, None)


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ("{}", "register_usage.public_key_version: required key is missing"),
        ("{public_key_version: 0}", "register_usage.public_key_version: expected 1.."),
        ("{public_key_version: one}", "register_usage.public_key_version: expected a whole"),
        ("{public_key_version: 1, key: x}", "register_usage.key: unknown key"),
        ("{public_key_version: 1, public_key: /nonexistent/key.pem}", "no such file"),
    ],
)
def test_config_section_errors_name_the_key(tmp_path: Path, section: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(tmp_path, extra=f"register_usage: {section}\n")
    assert info.value.exit_code == 78
    assert needle in str(info.value)


def pem_of(obj: Any, private: bool = False) -> bytes:
    if private:
        return bytes(
            obj.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return bytes(
        obj.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def test_public_key_problems_are_found_without_cryptography(tmp_path: Path, other_key: Any) -> None:
    """The loader's stdlib check (the daemon never imports cryptography) agrees with
    cryptography's own reading of each file."""
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pkcs1 = other_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )
    cases = {
        "rsa.pem": (pem_of(other_key.public_key()), None),
        "pkcs1.pem": (pkcs1, None),
        "ec.pem": (pem_of(ec_key.public_key()), "not an RSA one"),
        "private.pem": (pem_of(other_key, private=True), "holds a private key"),
        "garbage.pem": (b"hello\n", "not a PEM public key"),
        "badbody.pem": (b"-----BEGIN PUBLIC KEY-----\n$$$\n-----END PUBLIC KEY-----\n", "base64"),
    }
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        problem = public_key_problem(path)
        if needle is None:
            assert problem is None, name
            assert registration.describe_key(str(path)) == "RSA 2048-bit"
        else:
            assert problem is not None and needle in problem, (name, problem)
            with pytest.raises(AgentError):
                registration.describe_key(str(path))
    assert "is a directory" in (public_key_problem(tmp_path) or "")


def test_check_offline_names_a_bad_key_file_in_one_line(
    write_config: ConfigWriter, tmp_path: Path
) -> None:
    path = write_config()
    text = path.read_text() + "register_usage: {public_key_version: 1, public_key: nope.pem}\n"
    path.write_text(text)
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == 78
    (line,) = result.stderr.strip().splitlines()
    assert "register_usage.public_key" in line and "no such file" in line


def test_schema_has_the_section() -> None:
    schema = config_mod.json_schema()
    section = schema["properties"]["register_usage"]
    assert any(v.get("required") == ["public_key_version"] for v in section.get("anyOf", [section]))


# -- classification and the client ----------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "verdict"),
    [
        ("ThrottlingException", 400, "retry"),
        ("InternalServiceErrorException", 500, "retry"),
        ("SomethingNew", 503, "retry"),
        ("ExpiredTokenException", 400, "retry"),
        ("CustomerNotEntitledException", 400, "refused"),
        ("PlatformNotSupportedException", 400, "refused"),
        ("InvalidProductCodeException", 400, "refused"),
        ("InvalidPublicKeyVersionException", 400, "refused"),
        ("InvalidRegionException", 400, "refused"),
        ("DisabledApiException", 400, "refused"),
        ("AccessDeniedException", 400, "refused"),
        ("UnauthorizedException", 401, "refused"),
        ("ValidationException", 400, "failed"),
    ],
)
def test_register_usage_errors_through_a_stubbed_client(
    code: str, status: int, verdict: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSTUB")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stub")
    client = MeteringClient("us-east-1", "http://127.0.0.1:9")
    with Stubber(client.client) as stub:
        stub.add_client_error("register_usage", service_error_code=code, http_status_code=status)
        answer = client.register_usage(PRODUCT, 1, NONCE)
    assert (answer.verdict, answer.code) == (verdict, code)
    assert classify_registration(code, status) == verdict


def test_the_request_and_the_rotation_timestamp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSTUB")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stub")
    client = MeteringClient("us-east-1", "http://127.0.0.1:9")
    when = datetime(2027, 3, 1, tzinfo=timezone.utc)
    with Stubber(client.client) as stub:
        stub.add_response(
            "register_usage",
            {"Signature": "a.b.c", "PublicKeyRotationTimestamp": when},
            {"ProductCode": PRODUCT, "PublicKeyVersion": 2, "Nonce": NONCE},
        )
        answer = client.register_usage(PRODUCT, 2, NONCE)
    assert answer == Registration("ok", signature="a.b.c", rotation=when.timestamp())


def test_nothing_listening_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSTUB")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stub")
    answer = MeteringClient("us-east-1", "http://127.0.0.1:9").register_usage(PRODUCT, 1, NONCE)
    assert answer.verdict == "retry"


# -- register(): retries, budget, verification --------------------------------------------------


class Scripted:
    """A client whose RegisterUsage answers are given in order (the last one repeats)."""

    def __init__(self, *answers: Registration) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, int, str | None]] = []

    def register_usage(self, product: str, version: int, nonce: str | None) -> Registration:
        self.calls.append((product, version, nonce))
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


THROTTLED = Registration("retry", code="ThrottlingException", message="Rate exceeded")


def test_retries_with_capped_jittered_backoff_then_succeeds(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra="register_usage: {public_key_version: 1}\n")
    client = Scripted(THROTTLED, THROTTLED, THROTTLED, Registration("ok", signature="x.y.z"))
    clock = FakeClock(NOW)
    done = registration.register(client, cfg, clock, sleep=clock.sleep, rng=lambda: 1.0)
    assert done.attempts == 4 and not done.verified
    assert clock.slept == [1.0, 2.0, 4.0]  # rng 1.0: the full step
    assert len({c[2] for c in client.calls}) == 1  # one nonce per start, the same on each try
    for attempt in range(1, 12):
        low = registration.backoff(attempt, lambda: 0.0)
        high = registration.backoff(attempt, lambda: 1.0)
        assert 0 < low == high / 2 and high <= registration.MAX_BACKOFF


def test_retrying_stops_at_the_budget_with_69(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra="register_usage: {public_key_version: 1}\n")
    client = Scripted(Registration("retry", code="InternalServiceErrorException"))
    clock = FakeClock(NOW)
    with pytest.raises(Unavailable) as info:
        registration.register(client, cfg, clock, sleep=clock.sleep)
    assert info.value.exit_code == 69 and "InternalServiceErrorException" in str(info.value)
    assert sum(clock.slept) <= registration.BUDGET
    assert sum(clock.slept) > registration.BUDGET - 2 * registration.MAX_BACKOFF
    assert len(client.calls) == len(clock.slept) + 1


@pytest.mark.parametrize(
    ("answer", "error", "code"),
    [
        (Registration("refused", code="CustomerNotEntitledException"), NotAuthorized, 77),
        (Registration("refused", code="AccessDeniedException"), NotAuthorized, 77),
        (Registration("failed", code="ValidationException"), AgentError, 1),
    ],
)
def test_final_errors_are_not_retried(
    tmp_path: Path, answer: Registration, error: type, code: int
) -> None:
    cfg = make_config(tmp_path, extra="register_usage: {public_key_version: 1}\n")
    client = Scripted(answer)
    clock = FakeClock(NOW)
    with pytest.raises(error) as info:
        registration.register(client, cfg, clock, sleep=clock.sleep)
    assert info.value.exit_code == code and answer.code in str(info.value)
    assert len(client.calls) == 1 and clock.slept == []


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Any:
    emu = Emulator(Settings(product_codes={PRODUCT}))
    url = emu.serve(0)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
    yield emu
    emu.stop()


def key_config(tmp_path: Path, emu: Emulator, pem: bytes | None = None) -> Any:
    key = tmp_path / "marketplace.pem"
    key.write_bytes(pem if pem is not None else served_pem(emu))
    return make_config(
        tmp_path, extra=f"register_usage: {{public_key_version: 1, public_key: {key}}}\n"
    )


def served_pem(emu: Emulator) -> bytes:
    with urllib.request.urlopen(emu.url + "/_emulator/public_key") as resp:
        assert resp.headers["Content-Type"] == "text/plain"
        return bytes(resp.read())


def test_through_boto3_the_emulators_answer_verifies(served: Emulator, tmp_path: Path) -> None:
    cfg = key_config(tmp_path, served)
    client = MeteringClient("us-east-1", served.url)
    done = registration.register(client, cfg, FakeClock(served.clock.time()))
    assert done.verified and done.rotation is None
    (call,) = served.calls()
    assert call["operation"] == "RegisterUsage" and call["outcome"] == "ok"
    assert call["request"] == {"ProductCode": PRODUCT, "PublicKeyVersion": 1, "Nonce": done.nonce}


def test_through_boto3_another_key_is_refused(
    served: Emulator, tmp_path: Path, other_key: Any
) -> None:
    cfg = key_config(tmp_path, served, pem_of(other_key.public_key()))
    client = MeteringClient("us-east-1", served.url)
    with pytest.raises(NotAuthorized, match="does not verify"):
        registration.register(client, cfg, FakeClock(served.clock.time()))


def test_through_boto3_a_clock_off_by_ten_minutes_is_refused(
    served: Emulator, tmp_path: Path
) -> None:
    cfg = key_config(tmp_path, served)
    client = MeteringClient("us-east-1", served.url)
    with pytest.raises(NotAuthorized, match="claim iat"):
        registration.register(client, cfg, FakeClock(served.clock.time() + 600))


def test_through_boto3_the_rotation_timestamp_comes_back(served: Emulator, tmp_path: Path) -> None:
    served.configure(rotation_timestamp=1_900_000_000)
    cfg = key_config(tmp_path, served)
    done = registration.register(
        MeteringClient("us-east-1", served.url), cfg, FakeClock(served.clock.time())
    )
    assert done.rotation == 1_900_000_000


# -- the emulator's rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"ProductCode": "bad code!", "PublicKeyVersion": 1}, "ValidationException"),
        ({"ProductCode": PRODUCT, "PublicKeyVersion": 0}, "ValidationException"),
        ({"ProductCode": PRODUCT, "PublicKeyVersion": "1"}, "ValidationException"),
        ({"ProductCode": PRODUCT}, "ValidationException"),
        (
            {"ProductCode": PRODUCT, "PublicKeyVersion": 1, "Nonce": "n" * 256},
            "ValidationException",
        ),
        ({"ProductCode": PRODUCT, "PublicKeyVersion": 2}, "InvalidPublicKeyVersionException"),
        ({"ProductCode": "otherproduct", "PublicKeyVersion": 1}, "InvalidProductCodeException"),
    ],
)
def test_emulator_validates_as_the_service(body: dict[str, Any], code: str) -> None:
    with pytest.raises(ServiceError) as info:
        Emulator(Settings(product_codes={PRODUCT})).register_usage(body, "AKID", "us-east-1")
    assert info.value.code == code


def test_emulator_refuses_another_region_and_the_unentitled() -> None:
    emu = Emulator(Settings(product_codes={PRODUCT}))
    body = {"ProductCode": PRODUCT, "PublicKeyVersion": 1, "Nonce": "n" * 255}
    with pytest.raises(ServiceError, match="task's region") as info:
        emu.register_usage(body, "AKID", "eu-west-1")
    assert info.value.code == "InvalidRegionException"
    emu.configure(entitled=False)
    with pytest.raises(ServiceError) as info:
        emu.register_usage(body, "AKID", "us-east-1")
    assert info.value.code == "CustomerNotEntitledException"
    emu.configure(entitled=True)
    token = emu.register_usage(body, "AKID", "us-east-1")["Signature"]
    expected = {"productCode": PRODUCT, "publicKeyVersion": 1, "nonce": "n" * 255}
    assert registration.verify(token, emu.public_key_pem(), expected, emu.clock.time())


def test_emulator_throttles_at_five_per_second() -> None:
    emu = Emulator(Settings())
    body = {"ProductCode": PRODUCT, "PublicKeyVersion": 1}
    codes = []
    for _ in range(8):
        try:
            emu.register_usage(body, "AKID", None)
            codes.append("ok")
        except ServiceError as e:
            codes.append(e.code)
    assert codes[:5] == ["ok"] * 5 and "ThrottlingException" in codes[5:]


# -- the child and its exit codes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "line", "error"),
    [
        (77, {"ok": False, "error": "RegisterUsage: CustomerNotEntitledException"}, NotAuthorized),
        (69, {"ok": False, "error": "RegisterUsage: still failing"}, Unavailable),
        (1, {"ok": False, "error": "RegisterUsage: the service refused"}, AgentError),
        (1, None, AgentError),  # a crash: no line at all
    ],
)
def test_the_childs_exit_code_maps_to_runs(
    tmp_path: Path, code: int, line: dict | None, error: type
) -> None:
    ledger = Ledger(tmp_path)
    text = json.dumps(line) if line else ""
    command = [sys.executable, "-c", f"print({text!r}); raise SystemExit({code})"]
    with pytest.raises(error) as info:
        registration.at_start(command, ledger)
    assert info.value.exit_code == code
    if line:
        assert str(info.value) == line["error"]
    assert ledger.get_meta(registration.META) is None


def test_a_registration_is_kept_for_status(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra="register_usage: {public_key_version: 2}\n")
    ledger = Ledger(cfg.state_dir)
    answer = {"ok": True, "at": NOW, "public_key_version": 2, "verified": False,
              "rotation": NOW + 86400, "attempts": 1}  # fmt: skip
    command = [sys.executable, "-c", f"print({json.dumps(answer)!r})"]
    assert registration.at_start(command, ledger) == answer
    report = status.collect(ledger, cfg, FakeClock(NOW))
    reg = report["register_usage"]
    assert reg["registered_at"] == "2027-01-15T08:00:00Z"
    assert reg["rotation_timestamp"] == "2027-01-16T08:00:00Z"
    assert "public key version 2 is being rotated out" in reg["warning"]
    assert "warning [key_rotation] RegisterUsage" in status.render(report)
    plain = replace(cfg, register_usage=None)
    assert status.collect(ledger, plain, FakeClock(NOW))["register_usage"] is None


def test_child_command_carries_the_clock_and_logging(tmp_path: Path) -> None:
    from agent.clock import Clock

    clock = Clock(rate=60.0, origin=NOW, wall0=NOW)
    cmd = registration.child_command(tmp_path / "c.yaml", clock, "json")
    assert cmd[1:4] == ["-m", "agent", "register-usage"]
    assert cmd[cmd.index("--clock") + 1] == clock.spec
    assert cmd[cmd.index("--log-format") + 1] == "json"


def test_the_example_config_documents_the_section() -> None:
    from tests.conftest import ROOT

    text = (ROOT / "config.example.yaml").read_text()
    assert "# register_usage:" in text and "public_key_version" in text
    section = textwrap.dedent(
        "\n".join(
            line[2:]
            for line in text.split("# register_usage:")[1].splitlines()
            if line.startswith("#   ")
        )
    )
    assert "public_key_version: 1" in section
