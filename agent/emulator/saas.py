"""SaaS mode's operations: registration tokens and ResolveCustomer, BatchMeterUsage with its
per-record Status, 24 h window, month-end cutoff and subscribed customers."""

from __future__ import annotations

import json
import re
import threading
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from agent.clock import HOUR, Clock, hour_start, iso
from agent.config.model import PRODUCT_CODE
from agent.emulator.rules import (
    BATCH_MAX_AGE,
    BATCH_MAX_BYTES,
    BATCH_MAX_RECORDS,
    FUTURE_SLACK,
    LICENSE_ARN,
    Record,
    Registration,
    ServiceError,
    Settings,
    State,
    _check_allocations,
    _quantity,
    _timestamp,
)


class SaasOperations:
    """ResolveCustomer and BatchMeterUsage, on the service's state (service.Service)."""

    settings: Settings
    clock: Clock
    state: State
    lock: threading.Lock

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
