"""`check` with `register_usage:` (issue 15): the real command, a real boto3 client, the emulator's
RegisterUsage signed with its own key pair. Oracles: exit codes, the emulator's calls."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.emulator import Emulator
from agent.errors import EX_NOPERM, EX_OK
from tests.conftest import ConfigWriter, run_cli


def configure(write_config: ConfigWriter, emulator: Emulator, key: bytes | None) -> Path:
    path = write_config(endpoint=emulator.url)
    section = "register_usage:\n  public_key_version: 1\n"
    if key is not None:
        (path.parent / "marketplace.pem").write_bytes(key)
        section += f"  public_key: {path.parent / 'marketplace.pem'}\n"
    path.write_text(path.read_text() + section)
    return path


def emulator_key(emulator: Emulator) -> bytes:
    with urllib.request.urlopen(emulator.url + "/_emulator/public_key") as resp:
        return bytes(resp.read())


def check(path: Path, emulator: Emulator) -> tuple[int, list[str], str]:
    result = run_cli(
        "check", "-c", str(path), env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    )
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stdout.splitlines() if not line.startswith("warning [")]
    return result.returncode, lines, result.stdout


def registrations(emulator: Emulator) -> list[str]:
    return [
        c.get("code") or c["outcome"] for c in emulator.calls() if c["operation"] == "RegisterUsage"
    ]


def test_check_registers_and_verifies_the_signature(
    emulator: Emulator, write_config: ConfigWriter
) -> None:
    path = configure(write_config, emulator, emulator_key(emulator))
    code, lines, _ = check(path, emulator)
    assert code == EX_OK, lines
    assert [line.split()[0] for line in lines] == ["ok"] * len(lines)
    assert lines[-1].endswith("RegisterUsage: registered, public key version 1, signature verified")
    assert registrations(emulator) == ["ok"]
    (call,) = [c for c in emulator.calls() if c["operation"] == "RegisterUsage"]
    assert 16 <= len(call["request"]["Nonce"]) <= 255
    assert not (path.parent / "state").exists()  # check writes no state


def test_check_without_a_key_registers_unverified(
    emulator: Emulator, write_config: ConfigWriter
) -> None:
    code, lines, _ = check(configure(write_config, emulator, None), emulator)
    assert code == EX_OK and "signature not verified" in lines[-1]


@pytest.mark.parametrize(
    "error",
    [
        "CustomerNotEntitledException",
        "PlatformNotSupportedException",
        "InvalidProductCodeException",
        "InvalidPublicKeyVersionException",
        "InvalidRegionException",
        "DisabledApiException",
        "AccessDeniedException",
    ],
)
def test_check_final_errors_exit_77_in_one_line(
    emulator: Emulator, write_config: ConfigWriter, error: str
) -> None:
    emulator.inject("error", code=error, status=400, operation="RegisterUsage", count=5)
    code, lines, _ = check(configure(write_config, emulator, emulator_key(emulator)), emulator)
    assert code == EX_NOPERM
    assert lines[-1].startswith("fail") and error in lines[-1]
    assert registrations(emulator) == [error]  # final: not retried


def test_check_refuses_an_answer_signed_by_another_key(
    emulator: Emulator, write_config: ConfigWriter
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    pem = other.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    code, lines, _ = check(configure(write_config, emulator, pem), emulator)
    assert code == EX_NOPERM
    assert lines[-1].startswith("fail") and "does not verify" in lines[-1]


def test_check_retries_throttling_then_succeeds_and_warns_of_a_rotation(
    emulator: Emulator, write_config: ConfigWriter
) -> None:
    emulator.configure(rotation_timestamp=1_900_000_000)
    emulator.inject(
        "error", code="ThrottlingException", status=400, operation="RegisterUsage", count=2
    )
    code, _lines, out = check(configure(write_config, emulator, emulator_key(emulator)), emulator)
    assert code == EX_OK
    assert registrations(emulator) == ["ThrottlingException", "ThrottlingException", "ok"]
    assert "warning [key_rotation] RegisterUsage: public key version 1 is being rotated out" in out
    assert "2030-03-17T17:46:40Z" in out


def test_check_a_version_the_listing_lacks_exits_77(
    emulator: Emulator, write_config: ConfigWriter
) -> None:
    path = configure(write_config, emulator, None)
    path.write_text(path.read_text().replace("public_key_version: 1", "public_key_version: 7"))
    code, lines, _ = check(path, emulator)
    assert code == EX_NOPERM and "InvalidPublicKeyVersionException" in lines[-1]
