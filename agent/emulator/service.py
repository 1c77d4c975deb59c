"""The service's state and its operations MeterUsage and RegisterUsage (SaaS mode's are in
saas.py): faults and throttling first (`call`), then the service's rules under one lock."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from agent.clock import Clock, hour_start, iso
from agent.config.model import PRODUCT_CODE
from agent.emulator.rules import (
    ACCESS_KEY,
    FUTURE_SLACK,
    MAX_AGE,
    NODE_ROLE_REFUSED,
    Fault,
    Record,
    ServiceError,
    Settings,
    State,
    TokenBucket,
    _check_allocations,
    _Drop,
    _quantity,
    _timestamp,
    sign_jwt,
)
from agent.emulator.saas import SaasOperations


class Service(SaasOperations):
    """The service state and rules; `Emulator` (server.py) puts it behind HTTP on 127.0.0.1."""

    def __init__(self, settings: Settings | None = None, clock: Clock | None = None) -> None:
        self.settings = settings or Settings()
        self.clock = clock or Clock()  # the service's: Timestamps, Date, SigV4, calls, throttling
        self.state = State()
        self.lock = threading.Lock()
        self.bucket = TokenBucket(self.settings.rate, self.settings.burst, self.clock.monotonic())
        self.register_bucket = TokenBucket(
            self.settings.register_rate, self.settings.register_rate, self.clock.monotonic()
        )
        self._key: Any = None  # the RegisterUsage signing key, made on first use
        self._key_lock = threading.Lock()

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


# The operations the emulator answers (X-Amz-Target's suffix): each applies the service's rules
# under the emulator's lock, after faults and throttling (Emulator.call).
Operation = Callable[[Service, dict[str, Any], str, str | None], Any]
OPERATIONS: dict[str, Operation] = {
    "MeterUsage": Service._meter_usage,
    "RegisterUsage": Service._register_usage,
    "ResolveCustomer": Service._resolve_customer,
    "BatchMeterUsage": Service._batch_meter_usage,
}
