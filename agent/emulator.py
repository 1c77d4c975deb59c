"""A local MeterUsage + IMDSv2 service on 127.0.0.1, for sellers' offline trials and our tests.

It speaks the real AWS JSON 1.1 protocol (`X-Amz-Target: AWSMPMeteringService.MeterUsage`, errors as
`__type`), so the agent's real boto3 client talks to it unchanged, and it keeps the service's rules:
the Timestamp is rounded down to the hour; one record per {caller, dimension, hour}; an identical
request returns the same MeteringRecordId and a different quantity gets DuplicateRequestException;
a ClientToken reused with other parameters gets IdempotencyConflictException; records more than
6 h old get TimestampOutOfBoundsException; a 10 requests/s token bucket throttles; UsageAllocations
are checked as the service checks them (`_check_allocations`) and kept with the record.
BatchMeterUsage keeps its own rules (`_batch_meter_usage`): per-record Status, a 24 h window and
the month-end cutoff, ProductCode only with legacy records, the `customers` setting.

Faults for tests are queued through `POST /_emulator/faults` (or `Emulator.inject`): `error` (any
code and HTTP status), `drop` (close the connection before recording), `lose` (record, then close
without answering), `slow` (answer after a delay). `Date` headers follow the emulator's clock;
`signature_window` refuses SigV4 dates that far off (a skewed client clock), and `imds_hang` makes
IMDS hold and drop every request (a slow first boot).

Containers (fixed paths; packaging/ci/container-check.sh relies on them):
- ECS task metadata v4: `ECS_CONTAINER_METADATA_URI_V4=<url>/ecs/v4`; `GET /ecs/v4/task` answers a
  `TaskARN` `arn:aws:ecs:<region>:111122223333:task/emulator-cluster/<task_id>` (settings), with
  `Cluster`, `Family`, `Revision`, `AvailabilityZone`; `GET /ecs/v4` the container's metadata.
- Task role credentials: `AWS_CONTAINER_CREDENTIALS_FULL_URI=<url>/ecs/credentials` (botocore allows
  http to loopback), AccessKeyId `ASIAEMULATORTASKROLE`.
- STS AssumeRoleWithWebIdentity (IRSA): `AWS_ENDPOINT_URL_STS=<url>`, with `AWS_ROLE_ARN` and
  `AWS_WEB_IDENTITY_TOKEN_FILE` (any token); `POST /` form `Action=AssumeRoleWithWebIdentity`,
  AccessKeyId `ASIAEMULATORIRSAROLE`.
- IMDS role credentials keep AccessKeyId `ASIAEMULATOREXAMPLE1` (the node's role in a container);
  `container_only: true` makes MeterUsage signed with it answer PlatformNotSupportedException, as
  AWS answers a node-role call from a task or pod.
Each of these is kept in `calls()` under its operation (TaskMetadata, ContainerCredentials,
AssumeRoleWithWebIdentity); a record's `Caller` is the access key that signed it.

RegisterUsage (`AWSMPMeteringService.RegisterUsage`) validates as the service does (ProductCode,
PublicKeyVersion >= 1 and known, Nonce <= 255 characters) and answers a PS256 JWT signed with an RSA
key pair the emulator makes on first use (`GET /_emulator/public_key` serves its PEM); settings
`entitled`, `authorized`, `rotation_timestamp` and `public_key_version` shape the answer, and faults
with `operation: RegisterUsage` inject errors. `cryptography` is imported only then.
ResolveCustomer answers for registration tokens made through `POST /_emulator/tokens` (or
`Emulator.issue_token`): each names one customer and expires on the emulator's clock
(InvalidTokenException for a token it never issued, ExpiredTokenException after its expiry).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.aggregate import DECIMAL_PATTERN, MAX_INT
from agent.billing.allocations import MAX_ALLOCATIONS, MAX_TAG_VALUE
from agent.clock import HOUR, Clock, hour_start, iso
from agent.config.model import MAX_TAGS, PRODUCT_CODE, TAG_CHAR

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


class Emulator:
    """The service state and rules; `serve()` puts it behind HTTP on 127.0.0.1."""

    def __init__(self, settings: Settings | None = None, clock: Clock | None = None) -> None:
        self.settings = settings or Settings()
        self.clock = clock or Clock()  # the service's: Timestamps, Date, SigV4, calls, throttling
        self.state = State()
        self.lock = threading.Lock()
        self.bucket = TokenBucket(self.settings.rate, self.settings.burst, self.clock.monotonic())
        self.register_bucket = TokenBucket(
            self.settings.register_rate, self.settings.register_rate, self.clock.monotonic()
        )
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._key: Any = None  # the RegisterUsage signing key, made on first use
        self._key_lock = threading.Lock()

    # -- control -------------------------------------------------------------------------------

    def inject(self, kind: str, **kwargs: Any) -> None:
        with self.lock:
            self.state.faults.append(Fault(kind=kind, **kwargs))

    def configure(self, **kwargs: Any) -> None:
        with self.lock:
            for key, value in kwargs.items():
                if not hasattr(self.settings, key):
                    raise ValueError(f"unknown emulator setting {key!r}")
                if key in ("product_codes", "dimensions") and value is not None:
                    value = set(value)
                setattr(self.settings, key, value)
            self.bucket = TokenBucket(
                self.settings.rate, self.settings.burst, self.clock.monotonic()
            )
            self.register_bucket = TokenBucket(
                self.settings.register_rate, self.settings.register_rate, self.clock.monotonic()
            )

    def records(self) -> list[Record]:
        with self.lock:
            return sorted(self.state.records.values(), key=lambda r: (r.hour, r.dimension))

    def calls(self, outcome: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.state.calls if outcome is None or c["outcome"] == outcome]

    def clear_faults(self) -> None:
        with self.lock:
            self.state.faults.clear()

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.state.received)

    def _next_fault(self, operation: str) -> Fault | None:
        with self.lock:
            for fault in self.state.faults:
                if fault.operation == operation and fault.count > 0:
                    fault.count -= 1
                    if fault.count == 0:
                        self.state.faults.remove(fault)
                    return fault
        return None

    # -- MeterUsage ----------------------------------------------------------------------------

    def meter_usage(self, body: dict[str, Any], caller: str, signed_region: str | None) -> Any:
        return self.call("MeterUsage", body, caller, signed_region)

    def call(
        self, operation: str, body: dict[str, Any], caller: str, signed_region: str | None
    ) -> Any:
        """Apply queued faults, the token bucket and the operation's rules (OPERATIONS); returns
        the answer or raises ServiceError / _Drop."""
        handler = OPERATIONS.get(operation)
        if handler is None:
            raise ServiceError("UnknownOperationException", f"unknown operation {operation}")
        fault = self._next_fault(operation)
        if fault and fault.kind == "slow":
            time.sleep(fault.delay)
        if fault and fault.kind == "drop":
            raise _Drop()
        if fault and fault.kind == "error":
            raise ServiceError(fault.code, fault.message, fault.status)
        with self.lock:
            if not self.bucket.take(self.clock.monotonic()):
                raise ServiceError("ThrottlingException", "Rate exceeded", 400)
            answer = handler(self, body, caller, signed_region)
        if fault and fault.kind == "lose":
            raise _Drop()
        return answer

    def _meter_usage(self, body: dict[str, Any], caller: str, signed_region: str | None) -> Any:
        s = self.settings
        if signed_region and signed_region != s.region:
            raise ServiceError(
                "InvalidEndpointRegionException",
                f"the request was signed for {signed_region}, but the instance runs in {s.region}",
            )
        product = body.get("ProductCode")
        dimension = body.get("UsageDimension")
        if not isinstance(product, str) or not re.fullmatch(PRODUCT_CODE, product):
            raise ServiceError("ValidationException", "ProductCode is missing or malformed")
        if not isinstance(dimension, str) or not 1 <= len(dimension) <= 255:
            raise ServiceError("ValidationException", "UsageDimension is missing or malformed")
        if "Timestamp" not in body:
            raise ServiceError("ValidationException", "Timestamp is required")
        if s.container_only and caller == ACCESS_KEY:
            raise ServiceError("PlatformNotSupportedException", NODE_ROLE_REFUSED)
        if not s.authorized:
            raise ServiceError(
                s.deny_code,
                f"User is not authorized to perform: aws-marketplace:MeterUsage ({caller})",
            )
        if s.product_codes is not None and product not in s.product_codes:
            raise ServiceError("InvalidProductCodeException", f"unknown product code {product}")
        if not s.entitled:
            raise ServiceError(
                "CustomerNotEntitledException", "the customer is not subscribed to the product"
            )
        quantity, quantity_text = _quantity(body)
        timestamp = _timestamp(body["Timestamp"])
        now = self.clock.time()
        if timestamp < now - MAX_AGE or timestamp > now + FUTURE_SLACK:
            raise ServiceError(
                "TimestampOutOfBoundsException",
                f"Timestamp {iso(timestamp)} is outside the allowed window (now {iso(now)})",
            )
        if s.dimensions is not None and dimension not in s.dimensions:
            raise ServiceError("InvalidUsageDimensionException", f"unknown dimension {dimension}")
        allocations = body.get("UsageAllocations")
        if allocations is not None:
            _check_allocations(allocations, quantity, "UsageQuantityAsDecimal" in body)
        if body.get("DryRun"):
            if s.dryrun_style == "200":
                return {"MeteringRecordId": "DryRunOperation"}
            raise ServiceError(
                "DryRunOperation", "Request would have succeeded, but DryRun flag is set."
            )
        hour = hour_start(timestamp)
        key = (caller, product, dimension, hour)
        token = body.get("ClientToken")
        fingerprint = json.dumps(
            [product, dimension, hour, str(quantity), allocations], default=str
        )
        if token is not None:
            seen = self.state.tokens.get(token)
            if seen and seen[0] != fingerprint:
                raise ServiceError(
                    "IdempotencyConflictException",
                    "ClientToken was already used with different parameters",
                    409,
                )
        existing = self.state.records.get(key)
        if existing:
            if existing.quantity != quantity or existing.allocations != allocations:
                raise ServiceError(
                    "DuplicateRequestException",
                    f"usage for {dimension} at {iso(hour)} was already recorded "
                    f"as {existing.quantity_text}",
                )
            record_id = existing.record_id
        else:
            record_id = str(uuid.uuid4())
            self.state.records[key] = Record(
                record_id, caller, product, dimension, hour, timestamp, quantity,
                quantity_text, token, allocations,
            )  # fmt: skip
        if token is not None:
            self.state.tokens[token] = (fingerprint, record_id)
        return {"MeteringRecordId": record_id}

    # -- RegisterUsage -------------------------------------------------------------------------

    @property
    def private_key(self) -> Any:
        """The RSA key RegisterUsage answers are signed with (2048-bit, made once)."""
        with self._key_lock:
            if self._key is None:
                from cryptography.hazmat.primitives.asymmetric import rsa

                self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._key

    def public_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(
            self.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    def register_usage(self, body: dict[str, Any], caller: str, signed_region: str | None) -> Any:
        """RegisterUsage's rules and its signed answer; raises ServiceError / _Drop."""
        return self.call("RegisterUsage", body, caller, signed_region)

    def _register_usage(self, body: dict[str, Any], caller: str, signed_region: str | None) -> Any:
        """Under the lock, after faults and the account's bucket (`call`)."""
        s = self.settings
        product = body.get("ProductCode")
        version = body.get("PublicKeyVersion")
        nonce = body.get("Nonce")
        if not isinstance(product, str) or not re.fullmatch(PRODUCT_CODE, product):
            raise ServiceError("ValidationException", "ProductCode is missing or malformed")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ServiceError(
                "ValidationException", "PublicKeyVersion must be an integer of at least 1"
            )
        if nonce is not None and (not isinstance(nonce, str) or len(nonce) > 255):
            raise ServiceError("ValidationException", "Nonce must be at most 255 characters")
        if signed_region and signed_region != s.region:
            raise ServiceError(
                "InvalidRegionException",
                f"RegisterUsage must be called in the task's region ({s.region}), "
                f"not {signed_region}",
            )
        if not s.authorized:
            raise ServiceError(
                s.deny_code,
                f"User is not authorized to perform: aws-marketplace:RegisterUsage ({caller})",
            )
        if s.product_codes is not None and product not in s.product_codes:
            raise ServiceError("InvalidProductCodeException", f"unknown product code {product}")
        if version > s.public_key_version:
            raise ServiceError(
                "InvalidPublicKeyVersionException", f"public key version {version} does not exist"
            )
        if not s.entitled:
            raise ServiceError(
                "CustomerNotEntitledException", "the customer is not subscribed to the product"
            )
        if not self.register_bucket.take(self.clock.monotonic()):  # its own quota: 5/s
            raise ServiceError("ThrottlingException", "Rate exceeded", 400)
        claims: dict[str, Any] = {"productCode": product, "publicKeyVersion": version}
        if nonce is not None:
            claims["nonce"] = nonce
        claims["iat"] = int(self.clock.time())
        answer: dict[str, Any] = {"Signature": sign_jwt(self.private_key, claims)}
        if s.rotation_timestamp is not None:
            answer["PublicKeyRotationTimestamp"] = s.rotation_timestamp
        return answer

    # -- ResolveCustomer ------------------------------------------------------------------------

    def issue_token(
        self,
        account: str | None = None,
        license: str | None = None,
        agreement: str | None = None,
        legacy_identifier: str | None = None,
        expires_in: float = 3600,
        product: str | None = None,
    ) -> str:
        """A registration token for one customer, as the buyer's browser would post it: a new
        integration (account + license) or a legacy one (legacy_identifier), resolvable until
        `expires_in` seconds from now on the emulator's clock."""
        if legacy_identifier is None and not (account and license):
            raise ValueError("a token needs account and license, or legacy_identifier")
        codes = self.settings.product_codes
        product = product or (sorted(codes)[0] if codes else "emulatorproduct0000000001")
        token = "emu-reg-" + uuid.uuid4().hex
        registration = Registration(
            account, license, agreement, legacy_identifier, product,
            self.clock.time() + float(expires_in),
        )  # fmt: skip
        with self.lock:
            self.state.registrations[token] = registration
        return token

    def _resolve_customer(
        self, body: dict[str, Any], caller: str, signed_region: str | None
    ) -> Any:
        token = body.get("RegistrationToken")
        if not isinstance(token, str) or not token:
            raise ServiceError("ValidationException", "RegistrationToken is required")
        if not self.settings.authorized:
            raise ServiceError(
                self.settings.deny_code,
                f"User is not authorized to perform: aws-marketplace:ResolveCustomer ({caller})",
            )
        r = self.state.registrations.get(token)
        if r is None:
            raise ServiceError("InvalidTokenException", "Registration token is invalid")
        if self.clock.time() >= r.expires:
            raise ServiceError("ExpiredTokenException", "Registration token has expired")
        answer: dict[str, Any] = {"ProductCode": r.product_code}
        if r.legacy_identifier is not None:
            answer["CustomerIdentifier"] = r.legacy_identifier
        if r.account is not None:
            answer["CustomerAWSAccountId"] = r.account
        if r.legacy_identifier is None and r.license is not None:
            answer["LicenseArn"] = r.license
        if r.agreement is not None:
            answer["Metadata"] = {"AgreementId": r.agreement}
        return answer

    # -- BatchMeterUsage -----------------------------------------------------------------------

    def _batch_meter_usage(
        self, body: dict[str, Any], caller: str, signed_region: str | None
    ) -> Any:
        """BatchMeterUsage's rules: 0..25 records under 1 MB; ProductCode only with legacy
        CustomerIdentifier records (with LicenseArn ones it is a ValidationException); whole-call
        errors for a malformed record, an unknown dimension, bad allocations or a Timestamp out of
        the window (24 h; a previous month's from 06:00 UTC on the 1st); then per record:
        CustomerNotSubscribed, DuplicateRecord (another quantity for the customer, dimension and
        hour), Success (the same MeteringRecordId for an identical record), or unprocessed."""
        s = self.settings
        if signed_region and signed_region != s.region:
            raise ServiceError(
                "InvalidEndpointRegionException",
                f"the request was signed for {signed_region}, but the service is in {s.region}",
            )
        records = body.get("UsageRecords")
        if not isinstance(records, list) or len(records) > BATCH_MAX_RECORDS:
            raise ServiceError("ValidationException", "UsageRecords must hold 0 to 25 records")
        size = len(json.dumps(body).encode())
        if size >= BATCH_MAX_BYTES:
            raise ServiceError("ValidationException", f"the request is {size} bytes, over 1 MB")
        product = body.get("ProductCode")
        if product is not None and not (
            isinstance(product, str) and re.fullmatch(PRODUCT_CODE, product)
        ):
            raise ServiceError("ValidationException", "ProductCode is malformed")
        for r in records:
            if not isinstance(r, dict):
                raise ServiceError("ValidationException", "each UsageRecord must be a structure")
            if "LicenseArn" in r and product is not None:
                raise ServiceError(
                    "ValidationException", "ProductCode must be omitted with LicenseArn records"
                )
            if "CustomerIdentifier" in r and product is None:
                raise ServiceError(
                    "ValidationException", "ProductCode is required with CustomerIdentifier"
                )
        if not s.authorized:
            raise ServiceError(
                s.deny_code,
                f"User is not authorized to perform: aws-marketplace:BatchMeterUsage ({caller})",
            )
        if product is not None and s.product_codes is not None and product not in s.product_codes:
            raise ServiceError("InvalidProductCodeException", f"unknown product code {product}")
        now = self.clock.time()
        checked = [self._batch_record(r, now) for r in records]
        results, unprocessed = [], []
        for r, (customer, quantity, text, timestamp) in zip(records, checked, strict=True):
            if s.unprocessed > 0:
                s.unprocessed -= 1
                unprocessed.append(r)
                continue
            result: dict[str, Any] = {"UsageRecord": r}
            if not self._subscribed(r):
                results.append(result | {"Status": "CustomerNotSubscribed"})
                continue
            hour = hour_start(timestamp)
            key = ("customer:" + customer, product or "", r["Dimension"], hour)
            allocations = r.get("UsageAllocations")
            existing = self.state.records.get(key)
            if existing is None:
                existing = self.state.records[key] = Record(
                    str(uuid.uuid4()), caller, product or "", r["Dimension"], hour, timestamp,
                    quantity, text, None, allocations, customer,
                )  # fmt: skip
            elif existing.quantity != quantity or existing.allocations != allocations:
                results.append(result | {"Status": "DuplicateRecord"})
                continue
            results.append(result | {"Status": "Success", "MeteringRecordId": existing.record_id})
        return {"Results": results, "UnprocessedRecords": unprocessed}

    def _batch_record(self, r: dict[str, Any], now: float) -> tuple[str, Decimal, str, float]:
        """One UsageRecord's whole-call checks; (customer key, quantity, its text, Timestamp)."""
        dimension = r.get("Dimension")
        if not isinstance(dimension, str) or not 1 <= len(dimension) <= 255:
            raise ServiceError("ValidationException", "Dimension is missing or malformed")
        if "Timestamp" not in r:
            raise ServiceError("ValidationException", "Timestamp is required")
        ident, account, license_ = (
            r.get("CustomerIdentifier"), r.get("CustomerAWSAccountId"), r.get("LicenseArn"),
        )  # fmt: skip
        if (ident is None) == (account is None):
            raise ServiceError(
                "ValidationException",
                "a UsageRecord names its customer by CustomerIdentifier or CustomerAWSAccountId",
            )
        if ident is not None and not (isinstance(ident, str) and 1 <= len(ident) <= 255):
            raise ServiceError("InvalidCustomerIdentifierException", f"bad identifier {ident!r}")
        if account is not None and not (isinstance(account, str) and account.isdigit()):
            raise ServiceError("ValidationException", f"CustomerAWSAccountId {account!r}")
        if account is not None and license_ is None:
            raise ServiceError("ValidationException", "LicenseArn is required with the account")
        if license_ is not None and not (
            isinstance(license_, str) and re.fullmatch(LICENSE_ARN, license_)
        ):
            raise ServiceError("InvalidLicenseException", f"LicenseArn {license_!r} is malformed")
        renamed = {
            ("Usage" + k if k.startswith("Quantity") else k): v
            for k, v in r.items()
            if k.startswith("Quantity")
        }
        quantity, text = _quantity(renamed)
        s = self.settings
        if s.dimensions is not None and dimension not in s.dimensions:
            raise ServiceError("InvalidUsageDimensionException", f"unknown dimension {dimension}")
        if r.get("UsageAllocations") is not None:
            _check_allocations(r["UsageAllocations"], quantity, "QuantityAsDecimal" in r)
        timestamp = _timestamp(r["Timestamp"])
        month = datetime.fromtimestamp(now, tz=timezone.utc).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        last_month = timestamp < month.timestamp() and now >= month.timestamp() + 6 * HOUR
        if timestamp < now - BATCH_MAX_AGE or timestamp > now + FUTURE_SLACK or last_month:
            raise ServiceError(
                "TimestampOutOfBoundsException",
                f"Timestamp {iso(timestamp)} is outside the allowed window (now {iso(now)})",
            )
        customer = f"{account}|{license_}" if account is not None else f"legacy|{ident}"
        return customer, quantity, text, timestamp

    def _subscribed(self, r: dict[str, Any]) -> bool:
        issued = [
            {"account": g.account, "license": g.license, "legacy_identifier": g.legacy_identifier}
            for g in self.state.registrations.values()
        ]
        known = issued + (self.settings.customers or [])
        if self.settings.customers is None and not issued:
            return True
        if "CustomerIdentifier" in r:
            return any(c.get("legacy_identifier") == r["CustomerIdentifier"] for c in known)
        return any(
            (c.get("account"), c.get("license")) == (r["CustomerAWSAccountId"], r["LicenseArn"])
            for c in known
        )

    # -- HTTP ----------------------------------------------------------------------------------

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Start serving in a background thread; returns the base URL (tests may listen on
        another of this machine's addresses, to be a non-loopback endpoint)."""
        handler = type("Handler", (_Handler,), {"emulator": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()


# The operations the emulator answers (X-Amz-Target's suffix): each applies the service's rules
# under the emulator's lock, after faults and throttling (Emulator.call).
Operation = Callable[[Emulator, dict[str, Any], str, str | None], Any]
OPERATIONS: dict[str, Operation] = {
    "MeterUsage": Emulator._meter_usage,
    "RegisterUsage": Emulator._register_usage,
    "ResolveCustomer": Emulator._resolve_customer,
    "BatchMeterUsage": Emulator._batch_meter_usage,
}


class _Handler(BaseHTTPRequestHandler):
    emulator: Emulator
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read records
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header on the emulator's clock, as the service's own clock would say."""
        return email.utils.formatdate(
            self.emulator.clock.time() if timestamp is None else timestamp, usegmt=True
        )

    def _imds_silent(self) -> bool:
        """A slow first boot: IMDS holds the request, then closes it without an answer."""
        hang = self.emulator.settings.imds_hang
        if hang <= 0:
            return False
        time.sleep(hang)
        self._drop()
        return True

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain")

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(2)

    # IMDSv2 ---------------------------------------------------------------------------------

    def do_PUT(self) -> None:
        self._body()
        if self._imds_silent():
            return None
        if self.path != "/latest/api/token" or not self.emulator.settings.imds:
            return self._text(404, "Not Found")
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._text(400, "Missing TTL header")
        self._text(200, "emulator-imds-token-" + uuid.uuid4().hex)

    def do_GET(self) -> None:
        e = self.emulator
        if self.path.startswith("/_emulator/"):
            return self._control_get()
        if self.path.startswith("/ecs/"):
            return self._ecs()
        if self._imds_silent():
            return None
        if not e.settings.imds or not self.path.startswith("/latest/meta-data/"):
            return self._text(404, "Not Found")
        if not (self.headers.get("X-aws-ec2-metadata-token") or "").startswith(
            "emulator-imds-token-"
        ):
            return self._text(401, "Unauthorized")  # IMDSv2 only: no token, no answer
        path = self.path[len("/latest/meta-data/") :]
        s = e.settings
        creds_path = "iam/security-credentials/"
        answers = {
            "placement/region": s.region,
            "placement/availability-zone": s.region + "a",
            "instance-id": s.instance_id,
            creds_path: s.role,
            creds_path.rstrip("/"): s.role,
        }
        if path in answers:
            return self._text(200, answers[path])
        if path == creds_path + s.role:
            now = Clock().time()  # botocore checks the expiry on the client's own wall clock
            return self._send(
                200,
                {
                    "Code": "Success",
                    "LastUpdated": iso(now),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": ACCESS_KEY,
                    "SecretAccessKey": "emulatorsecretkeyemulatorsecretkey000000",
                    "Token": "emulator-session-token",
                    "Expiration": _expiration(),
                },
            )
        self._text(404, "Not Found")

    # ECS task metadata v4, container credentials, STS (IRSA) -------------------------------

    def _ecs(self) -> None:
        s = self.emulator.settings
        arn = f"arn:aws:ecs:{s.region}:{ACCOUNT}:task/emulator-cluster/{s.task_id}"
        container = {
            "DockerId": "emulator-container-" + s.task_id[:12],
            "Name": "metering-agent",
            "Image": "localhost/metering-agent",
            "Labels": {"com.amazonaws.ecs.task-arn": arn},
            "ContainerARN": f"arn:aws:ecs:{s.region}:{ACCOUNT}:container/emulator-cluster/"
            f"{s.task_id}/metering-agent",
        }
        if self.path.rstrip("/") == "/ecs/v4/task":
            self._record(
                {"operation": "TaskMetadata", "time": self.emulator.clock.time(), "outcome": "ok"}
            )
            return self._send(
                200,
                {
                    "Cluster": f"arn:aws:ecs:{s.region}:{ACCOUNT}:cluster/emulator-cluster",
                    "TaskARN": arn,
                    "Family": "emulator-product",
                    "Revision": "1",
                    "DesiredStatus": "RUNNING",
                    "KnownStatus": "RUNNING",
                    "AvailabilityZone": s.region + "a",
                    "LaunchType": "FARGATE",
                    "Containers": [container],
                },
            )
        if self.path.rstrip("/") == "/ecs/v4":
            return self._send(200, container)
        if self.path.rstrip("/") == "/ecs/credentials":
            self._record(
                {
                    "operation": "ContainerCredentials",
                    "time": self.emulator.clock.time(),
                    "outcome": "ok",
                }
            )
            return self._send(
                200,
                {
                    "AccessKeyId": TASK_ROLE_KEY,
                    "SecretAccessKey": "emulatortaskrolesecretemulatortaskrole00",
                    "Token": "emulator-task-role-session-token",
                    "Expiration": _expiration(),
                    "RoleArn": TASK_ROLE_ARN,
                },
            )
        self._text(404, "Not Found")

    def _sts(self, raw: bytes) -> bool:
        """STS AssumeRoleWithWebIdentity (unsigned, a form POST): the IRSA role's credentials."""
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
        if form.get("Action") != ["AssumeRoleWithWebIdentity"]:
            return False
        role = (form.get("RoleArn") or [f"arn:aws:iam::{ACCOUNT}:role/emulator-irsa-role"])[0]
        session = (form.get("RoleSessionName") or ["metering-agent"])[0]
        self._record(
            {"operation": "AssumeRoleWithWebIdentity", "time": self.emulator.clock.time(),
             "outcome": "ok", "role": role, "token": bool(form.get("WebIdentityToken"))}
        )  # fmt: skip
        xml = f"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:default:metering-agent</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>{role.replace(":role/", ":assumed-role/").replace("arn:aws:iam:", "arn:aws:sts:")}/{session}</Arn>
      <AssumedRoleId>AROAEMULATORIRSAROLE:{session}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>{IRSA_KEY}</AccessKeyId>
      <SecretAccessKey>emulatorirsarolesecretemulatorirsarole00</SecretAccessKey>
      <SessionToken>emulator-irsa-session-token</SessionToken>
      <Expiration>{_expiration()}</Expiration>
    </Credentials>
    <Audience>sts.amazonaws.com</Audience>
    <Provider>arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.eks.emulator.amazonaws.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
"""  # noqa: E501
        self._send(200, xml.encode(), "text/xml")
        return True

    # MeterUsage and control ----------------------------------------------------------------

    def do_POST(self) -> None:
        raw = self._body()
        if self.path.startswith("/_emulator/"):
            return self._control_post(raw)
        if "x-www-form-urlencoded" in self.headers.get("Content-Type", "") and self._sts(raw):
            return None
        target = self.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else target
        auth = self.headers.get("Authorization", "")
        m = CREDENTIAL.search(auth)
        call: dict[str, Any] = {"operation": operation, "time": self.emulator.clock.time()}
        try:
            if not m:
                raise ServiceError("MissingAuthenticationTokenException", "request is not signed")
            caller, signed_region = m.group(1), m.group(2)
            self._check_signature_date()
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise ServiceError("SerializationException", "body is not JSON") from None
            call["request"] = body
            call["size"] = len(raw)
            with self.emulator.lock:
                self.emulator.state.received.append(dict(call))
            answer = self.emulator.call(operation, body, caller, signed_region)
        except _Drop:
            call["outcome"] = "dropped"
            self._record(call)
            return self._drop()
        except ServiceError as err:
            call.update(outcome="error", code=err.code)
            self._record(call)
            return self._send(
                err.status,
                {"__type": err.code, "message": err.message},
                "application/x-amz-json-1.1",
            )
        call.update(outcome="ok", answer=answer)
        self._record(call)
        self._send(200, answer, "application/x-amz-json-1.1")

    def _check_signature_date(self) -> None:
        """SigV4: a request signed more than the window away from the service's clock."""
        window = self.emulator.settings.signature_window
        stamp = self.headers.get("X-Amz-Date", "")
        if window is None or not stamp:
            return
        try:
            signed = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            raise ServiceError("IncompleteSignatureException", "X-Amz-Date is malformed") from None
        now = self.emulator.clock.time()
        if abs(signed.timestamp() - now) > window:
            earliest = datetime.fromtimestamp(now - window, tz=timezone.utc)
            raise ServiceError(
                "InvalidSignatureException",
                f"Signature expired: {stamp} is now earlier than "
                f"{earliest.strftime('%Y%m%dT%H%M%SZ')} ({iso(now)} - 5 min.)",
                403,
            )

    def _record(self, call: dict[str, Any]) -> None:
        with self.emulator.lock:
            self.emulator.state.calls.append(call)

    def _control_get(self) -> None:
        e = self.emulator
        if self.path == "/_emulator/records":
            return self._send(200, [_record_json(r) for r in e.records()])
        if self.path == "/_emulator/calls":
            return self._send(200, e.calls())
        if self.path == "/_emulator/public_key":
            return self._send(200, e.public_key_pem(), "text/plain")
        self._text(404, "Not Found")

    def _control_post(self, raw: bytes) -> None:
        e = self.emulator
        try:
            data = json.loads(raw or b"{}")
            if self.path == "/_emulator/faults":
                for fault in data if isinstance(data, list) else [data]:
                    e.inject(**fault)
            elif self.path == "/_emulator/settings":
                e.configure(**data)
            elif self.path == "/_emulator/tokens":
                return self._send(200, {"token": e.issue_token(**data)})
            else:
                return self._text(404, "Not Found")
        except (TypeError, ValueError) as err:
            return self._send(400, {"error": str(err)})
        self._send(200, {"ok": True})


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
