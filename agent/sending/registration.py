"""RegisterUsage at start: a fresh nonce, retries, and the verification of the signed answer.

Container products priced by the hour call RegisterUsage once when the task or pod starts (SPEC
"Container products"). The answer's `Signature` is a JWT (alg PS256) over `productCode`,
`publicKeyVersion`, `nonce` and `iat`; with `register_usage.public_key` it is verified, so an answer
that did not come from AWS Marketplace (a forged endpoint, a replayed token) stops the agent.

Why a child process: `run` keeps boto3 and `cryptography` out of the daemon (footprint), so the
call runs in `metering-agent register-usage`, as sends run in `metering-agent send`; the daemon maps
its exit code (`at_start`). `cryptography` is imported inside the functions that need it only.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.clock import Clock, iso
from agent.config.model import Config
from agent.errors import EX_NOPERM, EX_OK, EX_UNAVAILABLE, AgentError, NotAuthorized, Unavailable

log = logging.getLogger(__name__)

ALG = "PS256"
IAT_WINDOW = 300.0  # seconds the token's `iat` may be from this machine's clock
NONCE_BYTES = 32  # token_urlsafe: 43 characters (RegisterUsage takes at most 255)
# Retries: jittered exponential backoff from 1 s, capped at 15 s per wait, for at most 60 s in all;
# then exit 69 (Unavailable): systemd restarts the unit after 10 s (within its 90 s start timeout),
# ECS/EKS restart the container.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 15.0
BUDGET = 60.0
META = "register_usage"  # ledger meta: the last registration, for `status`

HINTS = {
    "CustomerNotEntitledException": (
        "the buyer is not subscribed to this product: subscribe in AWS Marketplace, and check "
        "that product_code matches the listing"
    ),
    "PlatformNotSupportedException": (
        "RegisterUsage works only from an ECS task or an EKS pod (Fargate included): run the "
        "agent as a sidecar there"
    ),
    "InvalidProductCodeException": "product_code is not the listing's: copy it from the listing",
    "InvalidPublicKeyVersionException": (
        "register_usage.public_key_version is not one of the listing's: use the version shown "
        "with the listing's public key"
    ),
    "InvalidRegionException": (
        "RegisterUsage must be called in the region the task runs in: check metering.region "
        "and $AWS_REGION"
    ),
    "DisabledApiException": (
        "the API is disabled for this product: contact AWS Marketplace seller operations"
    ),
}
ROLE_HINT = (
    'the task role (ECS) or IRSA role (EKS) needs a policy allowing "aws-marketplace:RegisterUsage"'
)


@dataclass(frozen=True)
class Registered:
    """A registration that succeeded: what `status` shows."""

    nonce: str
    public_key_version: int
    verified: bool  # the signature was checked against register_usage.public_key
    rotation: float | None  # PublicKeyRotationTimestamp: the key version is being retired
    attempts: int


def new_nonce() -> str:
    """A fresh random Nonce for each start (<= 255 characters, URL-safe)."""
    return secrets.token_urlsafe(NONCE_BYTES)


def backoff(attempt: int, rng: Callable[[], float] = random.random) -> float:
    """The wait before try `attempt + 1`: half the capped exponential step fixed, half jitter,
    so a fleet started at once (RegisterUsage allows 5 calls/s per account) spreads out."""
    step = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (attempt - 1))
    return step / 2 + rng() * step / 2


def register(
    client: Any,
    config: Config,
    clock: Clock,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
    budget: float = BUDGET,
) -> Registered:
    """Call RegisterUsage until it answers, then verify the answer when a public key is set.

    Raises NotAuthorized (77) for the final errors and a failed verification, Unavailable (69)
    when throttling, 5xx or the network outlast `budget` seconds, AgentError for anything else.
    """
    ru = config.register_usage
    if ru is None:
        raise AgentError("register_usage is not configured")
    nonce = new_nonce()
    started, waited, attempt = clock.monotonic(), 0.0, 0
    while True:
        attempt += 1
        answer = client.register_usage(config.product_code, ru.public_key_version, nonce)
        if answer.verdict == "ok":
            break
        if answer.verdict == "refused":
            hint = HINTS.get(answer.code or "", ROLE_HINT)
            raise NotAuthorized(f"RegisterUsage: {answer.error}; {hint}")
        if answer.verdict != "retry":
            raise AgentError(f"RegisterUsage: the service refused the request ({answer.error})")
        wait = backoff(attempt, rng)
        spent = max(waited, clock.monotonic() - started)
        if spent + wait > budget:
            raise Unavailable(
                f"RegisterUsage: still failing after {attempt} tries in {spent:.0f} s "
                f"({answer.error}); the service or the network is unavailable: exiting to be "
                "restarted"
            )
        log.warning(
            "RegisterUsage for product %s: %s; retrying in %.1f s (try %d)",
            config.product_code,
            answer.error,
            wait,
            attempt,
        )
        sleep(wait)
        waited += wait
    if ru.public_key is not None:
        expected = {
            "productCode": config.product_code,
            "publicKeyVersion": ru.public_key_version,
            "nonce": nonce,
        }
        verify(answer.signature, read_key(ru.public_key), expected, clock.time())
    if answer.rotation is not None:
        log.warning("RegisterUsage: %s", rotation_warning(ru.public_key_version, answer.rotation))
    log.info(
        "RegisterUsage: product %s registered (public key version %d, signature %s)",
        config.product_code,
        ru.public_key_version,
        "verified" if ru.public_key else "not verified: no register_usage.public_key",
    )
    verified = ru.public_key is not None
    return Registered(nonce, ru.public_key_version, verified, answer.rotation, attempt)


def rotation_warning(version: int, rotation: float) -> str:
    return (
        f"public key version {version} is being rotated out (PublicKeyRotationTimestamp "
        f"{iso(rotation)}); set register_usage.public_key_version (and public_key) to the "
        "listing's new key"
    )


# -- the signed answer ---------------------------------------------------------------------------


def refused(why: str) -> NotAuthorized:
    return NotAuthorized(
        f"RegisterUsage: the signed answer is not trusted: {why}; the agent stops (not from AWS "
        "Marketplace, or register_usage.public_key is not the listing's key of that version)"
    )


def _b64url(part: str) -> bytes:
    if not part or any(c in part for c in "+/= \n"):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def read_key(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise AgentError(f"register_usage.public_key: {path}: {e.strerror}") from None


def load_public_key(pem: bytes, path: str = "register_usage.public_key") -> Any:
    """The PEM's RSA public key (a `cryptography` object); AgentError naming the file if not."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise AgentError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise AgentError(f"{path}: not an RSA public key ({type(key).__name__})")
    return key


def describe_key(path: str) -> str:
    """`check`'s line for the configured key: that it loads, and its size."""
    key = load_public_key(read_key(path), path)
    return f"RSA {key.key_size}-bit"


IAT_MIN, IAT_MAX = 946684800, 4102444800  # 2000-01-01 and 2100-01-01: an `iat` in seconds


def verify(token: Any, pem: bytes, expected: Mapping[str, Any], now: float) -> dict[str, Any]:
    """Verify RegisterUsage's `Signature`: a JWT with alg PS256, its RSA-PSS SHA-256 signature
    by `pem`'s key, then `productCode`, `publicKeyVersion` and `nonce` equal to `expected` and
    `iat` within 5 minutes of `now`. The claims; NotAuthorized with one line if anything fails.

    The header's `alg` is checked before any key is used: `none` and HS256 (a MAC keyed with the
    public key) are the classic forgeries of a JWT verifier that trusts the header."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    if not isinstance(token, str) or token.count(".") != 2:
        raise refused("Signature is not a JWT (three dot-separated parts)")
    head_b64, body_b64, sig_b64 = token.split(".")
    malformed = "Signature is a malformed JWT"
    try:
        header = json.loads(_b64url(head_b64))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise refused(f"{malformed} (its header is not base64url JSON)") from None
    if not isinstance(header, dict):
        raise refused(f"{malformed} (its header is not a JSON object)")
    if header.get("alg") != ALG:
        raise refused(f"the JWT's alg is {header.get('alg')!r}; only {ALG} is accepted")
    try:
        claims = json.loads(_b64url(body_b64))
        signature = _b64url(sig_b64)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise refused(f"{malformed} (its claims or signature are not base64url)") from None
    if not isinstance(claims, dict):
        raise refused(f"{malformed} (its claims are not a JSON object)")
    key = load_public_key(pem)
    try:
        key.verify(
            signature,
            f"{head_b64}.{body_b64}".encode("ascii"),
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
            hashes.SHA256(),
        )
    except InvalidSignature:
        raise refused("its PS256 signature does not verify with the public key") from None
    for name, want in expected.items():
        got = claims.get(name)
        if got != want or isinstance(got, bool) or type(got) is not type(want):
            raise refused(f"claim {name} is {got!r}, but {want!r} was sent")
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, (int, float)):
        raise refused(f"claim iat is {iat!r}, not a time")
    if not (IAT_MIN <= iat <= IAT_MAX):  # NaN, Infinity, milliseconds: nothing to format
        raise refused(f"claim iat is {iat!r}, not a time in seconds since 1970 (2000 to 2100)")
    if abs(now - iat) > IAT_WINDOW:
        way = "before" if iat < now else "after"
        raise refused(
            f"claim iat {iso(iat)} is {abs(now - iat):.0f} s {way} this machine's clock "
            f"({iso(now)}; at most {IAT_WINDOW:.0f} s allowed): a replayed answer, or a clock "
            "off: check NTP"
        )
    return claims


# -- the child process (`run`) ------------------------------------------------------------------


def child_command(config: Path, clock: Clock, log_format: str) -> list[str]:
    """`metering-agent register-usage` for the running config, with this process's logging and
    clock (hidden subcommand)."""
    cmd = [sys.executable, "-m", "agent", "register-usage", "-c", str(Path(config).resolve())]
    cmd += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    cmd += ["--log-format", log_format]
    cmd += ["--clock", clock.spec] if clock.spec else []
    return cmd


def child_main(config: Config, clock: Clock) -> int:
    """The child: register, print one JSON line for the parent (`at_start`), exit 0/77/69/1.

    Its log lines go to the inherited stderr (the journal); the error is the parent's to print."""
    from agent.host import platform
    from agent.host.imds import resolve_region
    from agent.sending import client as metering

    try:
        plat = platform.detect(config.platform, os.environ)
        region, _ = resolve_region(config.metering.region, platform=plat.name)
        client = metering.MeteringClient(
            region, config.metering.endpoint_url, clock=clock, platform=plat.name
        )
        refused = client.refusal()  # the node's role on ECS/EKS: AWS would refuse it
        if refused:
            raise NotAuthorized(refused)
        done = register(client, config, clock)
    except AgentError as e:
        print(json.dumps({"ok": False, "error": str(e)}), flush=True)
        return e.exit_code
    answer = {
        "ok": True,
        "at": clock.time(),
        "public_key_version": done.public_key_version,
        "verified": done.verified,
        "rotation": done.rotation,
        "attempts": done.attempts,
    }
    print(json.dumps(answer), flush=True)
    return EX_OK


@contextlib.contextmanager
def _stop_on_signal(child: subprocess.Popen[bytes]) -> Iterator[None]:
    """SIGTERM/SIGINT while RegisterUsage runs (up to BUDGET s, before `Daemon.run` installs its
    handlers): end the child and exit 0 at once; nothing was sampled yet, so nothing is lost.
    Without this, an agent that is PID 1 in a container ignores SIGTERM until it is killed."""

    def stop(signum: int, frame: Any) -> None:
        log.info("received %s during RegisterUsage: stopping; nothing sampled yet",
                 signal.Signals(signum).name)  # fmt: skip
        child.terminate()
        try:
            child.wait(timeout=2)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise SystemExit(EX_OK)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def at_start(command: list[str], ledger: Any, timeout: float = BUDGET + 60) -> dict[str, Any]:
    """Run the child and map its exit: 0 -> the registration (kept in the ledger for `status`),
    77 -> NotAuthorized, 69 -> Unavailable, else AgentError, each with the child's line."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    with _stop_on_signal(proc):
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise Unavailable(f"RegisterUsage: the call ran over {timeout:.0f} s") from None
    child = subprocess.CompletedProcess(command, proc.returncode, stdout)
    try:
        answer = json.loads(child.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError, UnicodeDecodeError):
        answer = {}
    if child.returncode == EX_OK and answer.get("ok"):
        ledger.update_meta(**{META: answer})
        return dict(answer)
    error = answer.get("error") or f"RegisterUsage: the call exited {child.returncode}"
    if child.returncode == EX_NOPERM:
        raise NotAuthorized(error)
    if child.returncode == EX_UNAVAILABLE:
        raise Unavailable(error)
    raise AgentError(error)
