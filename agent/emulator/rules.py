"""The service's rules as the emulator keeps them: its limits and patterns, the records it keeps,
its settings and faults, the token bucket, and the validation of quantities, allocations, tags and
Timestamps; the RegisterUsage JWT."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from agent.aggregate import DECIMAL_PATTERN, MAX_INT
from agent.billing.allocations import MAX_ALLOCATIONS, MAX_TAG_VALUE
from agent.clock import HOUR, Clock, iso
from agent.config.model import MAX_TAGS, TAG_CHAR

TARGET_PREFIX = "AWSMPMeteringService."
MAX_AGE = 6 * HOUR
BATCH_MAX_AGE = 24 * HOUR
BATCH_MAX_RECORDS = 25
BATCH_MAX_BYTES = 1_000_000
LICENSE_ARN = r"arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:" + (
    r"[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}"
)
FUTURE_SLACK = 300  # a few minutes of clock skew is tolerated
ACCESS_KEY = "ASIAEMULATOREXAMPLE1"  # the IMDS role's (on ECS/EKS: the node's)
TASK_ROLE_KEY = "ASIAEMULATORTASKROLE"
IRSA_KEY = "ASIAEMULATORIRSAROLE"
ACCOUNT = "111122223333"
TASK_ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/emulator-task-role"
NODE_ROLE_REFUSED = "This operation can only be called from within an ECS task or an EKS pod"
CREDENTIAL = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")
ALLOCATED = {True: "AllocatedUsageQuantityAsDecimal", False: "AllocatedUsageQuantity"}
_TAG = re.compile(f"{TAG_CHAR}+")


class ServiceError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class InvalidAllocations(ServiceError):
    def __init__(self, message: str) -> None:
        super().__init__("InvalidUsageAllocationsException", message)


@dataclass
class Record:
    record_id: str
    caller: str
    product_code: str
    dimension: str
    hour: int
    timestamp: float
    quantity: Decimal
    quantity_text: str
    client_token: str | None
    allocations: Any = None
    customer: str | None = None  # BatchMeterUsage: "ACCOUNT|LICENSE_ARN" or "legacy|IDENTIFIER"


@dataclass
class Settings:
    region: str = "us-east-1"
    instance_id: str = "i-0emulator0000001"
    role: str = "metering-agent-emulator-role"
    product_codes: set[str] | None = None  # None: any product code is known
    dimensions: set[str] | None = None  # None: any dimension is known
    authorized: bool = True
    deny_code: str = "AccessDeniedException"
    entitled: bool = True
    dryrun_style: str = "error"  # "error": DryRunOperation error; "200": HTTP 200 answer
    rate: float = 10.0  # requests per second per account (token bucket)
    burst: float = 10.0
    imds: bool = True
    imds_hang: float = 0.0  # IMDS holds each request this long, then closes it unanswered
    signature_window: float | None = None  # refuse a SigV4 date further off than this (5 min)
    task_id: str = "0123456789abcdef0123456789abcdef"  # the ECS task in the TaskARN
    container_only: bool = False  # MeterUsage signed by the IMDS (node) role is refused
    public_key_version: int = 1  # RegisterUsage: the newest key version; higher ones are invalid
    rotation_timestamp: float | None = None  # RegisterUsage answers PublicKeyRotationTimestamp
    register_rate: float = 5.0  # RegisterUsage requests per second per account
    # BatchMeterUsage: the subscribed customers, [{"account": ID, "license": ARN}] or
    # [{"legacy_identifier": ID}], besides those tokens were issued for; None: any customer
    customers: list[dict[str, Any]] | None = None
    unprocessed: int = 0  # the next N records received come back in UnprocessedRecords


@dataclass
class Fault:
    kind: str  # error | drop | lose | slow
    count: int = 1
    code: str = "InternalServiceErrorException"
    status: int = 500
    delay: float = 0.0
    operation: str = "MeterUsage"
    message: str = "injected fault"


@dataclass(frozen=True)
class Registration:
    """The customer a registration token (`POST /_emulator/tokens`) resolves to, until `expires`
    on the emulator's clock."""

    account: str | None
    license: str | None
    agreement: str | None
    legacy_identifier: str | None
    product_code: str
    expires: float


@dataclass
class State:
    records: dict[tuple[str, str, str, int], Record] = field(default_factory=dict)
    tokens: dict[str, tuple[str, str]] = field(default_factory=dict)  # token -> (fingerprint, id)
    calls: list[dict[str, Any]] = field(default_factory=list)  # as answered (or dropped)
    received: list[dict[str, Any]] = field(default_factory=list)  # as they arrive
    faults: list[Fault] = field(default_factory=list)
    registrations: dict[str, Registration] = field(default_factory=dict)  # token -> customer


class TokenBucket:
    """The service's per-account request limit (also the fleet simulation's, on virtual time)."""

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class _Drop(Exception):
    """Close the connection without an answer."""


def _expiration() -> str:
    """Credentials' expiry, 6 h ahead on the real wall clock: botocore checks it on the client's
    own clock (under libfaketime or --clock, that is not the emulator's)."""
    return datetime.fromtimestamp(Clock().time() + 6 * HOUR, tz=timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_jwt(private_key: Any, claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """A JWS compact token signed PS256 (RSA-PSS, SHA-256, MGF1 SHA-256, 32-byte salt: RFC 7518
    3.5), as RegisterUsage's `Signature`; tests pass another `header` or key to forge one."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    head = b64url(json.dumps(header or {"alg": "PS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = private_key.sign(
        f"{head}.{body}".encode("ascii"),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
        hashes.SHA256(),
    )
    return f"{head}.{body}.{b64url(signature)}"


def _quantity(body: dict[str, Any]) -> tuple[Decimal, str]:
    has_int = "UsageQuantity" in body
    has_dec = "UsageQuantityAsDecimal" in body
    if has_int and has_dec:
        raise ServiceError(
            "ValidationException", "specify UsageQuantity or UsageQuantityAsDecimal, not both"
        )
    if has_dec:
        text = body["UsageQuantityAsDecimal"]
        if not isinstance(text, str) or not DECIMAL_PATTERN.match(text):
            raise ServiceError(
                "ValidationException", f"UsageQuantityAsDecimal {text!r} is not a valid decimal"
            )
        return Decimal(text), text
    value = body.get("UsageQuantity", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise ServiceError("ValidationException", f"UsageQuantity {value!r} is out of range")
    return Decimal(value), str(value)


def _check_allocations(allocations: Any, total: Decimal, decimal: bool) -> None:
    """UsageAllocations as the service checks them (botocore's model and its documentation):
    1..2,500 allocations, each in the request's quantity type and none mixed, summing exactly to
    the quantity; 0 or 1..5 tags each, keys 1..100 and values 1..256 characters of the tag set
    (SPEC's reading of the model's pattern), one value per key; each tag set unique."""
    if not isinstance(allocations, list) or not 1 <= len(allocations) <= MAX_ALLOCATIONS:
        raise ServiceError(
            "ValidationException", f"UsageAllocations must hold 1 to {MAX_ALLOCATIONS} allocations"
        )
    field, other = ALLOCATED[decimal], ALLOCATED[not decimal]
    summed = Decimal(0)
    seen: set[frozenset[tuple[str, str]]] = set()
    for a in allocations:
        if not isinstance(a, dict):
            raise ServiceError("ValidationException", "each allocation must be a structure")
        if other in a or field not in a:
            raise InvalidAllocations(
                f"each allocation needs {field} (the request's quantity type), and not {other}"
            )
        value = a[field]
        if decimal and not (isinstance(value, str) and DECIMAL_PATTERN.match(value)):
            raise ServiceError("ValidationException", f"{field} {value!r} is not a valid decimal")
        if not decimal and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT
        ):
            raise ServiceError("ValidationException", f"{field} {value!r} is out of range")
        summed += Decimal(value)
        tags = _tags(a.get("Tags"))
        if tags in seen:
            raise InvalidAllocations("each allocation must have a unique set of tags")
        seen.add(tags)
    if summed != total:
        raise InvalidAllocations(f"allocations sum to {summed}, but the usage quantity is {total}")


def _tags(tags: Any) -> frozenset[tuple[str, str]]:
    if tags is None:
        return frozenset()
    if not isinstance(tags, list) or not 1 <= len(tags) <= MAX_TAGS:
        raise ServiceError("InvalidTagException", f"an allocation takes 1 to {MAX_TAGS} tags")
    pairs: set[tuple[str, str]] = set()
    for t in tags:
        key, value = (t.get("Key"), t.get("Value")) if isinstance(t, dict) else (None, None)
        for text, most in ((key, 100), (value, MAX_TAG_VALUE)):
            if not isinstance(text, str) or len(text) > most or not _TAG.fullmatch(text):
                raise ServiceError(
                    "InvalidTagException",
                    f"tag {text!r}: expected 1 to {most} letters, digits, spaces, +-=._:/@",
                )
        pairs.add((str(key), str(value)))
    if len({k for k, _ in pairs}) != len(tags):
        raise ServiceError("InvalidTagException", "each tag key appears once per allocation")
    return frozenset(pairs)


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise ServiceError("ValidationException", f"Timestamp {value!r} is not a timestamp")


def _record_json(r: Record) -> dict[str, Any]:
    return {
        "MeteringRecordId": r.record_id,
        "Caller": r.caller,
        "ProductCode": r.product_code,
        "UsageDimension": r.dimension,
        "Hour": iso(r.hour),
        "Timestamp": iso(r.timestamp),
        "Quantity": r.quantity_text,
        "ClientToken": r.client_token,
        "UsageAllocations": r.allocations,
        "Customer": r.customer,
    }
