"""What the Metering API's answers mean, with no I/O: each error code classified (retry, held,
unauthorized, expired, rejected) as an Outcome the send policy acts on, RegisterUsage's verdicts,
BatchMeterUsage's per-record results matched to their records, ResolveCustomer's answer, and the
one-line verdict `check` prints for a permission probe. The hints each refusal names.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from agent.errors import NotAuthorized

ROLE_HINT = (
    "attach an instance role (or ECS task role / EKS IRSA role) whose policy allows "
    '"aws-marketplace:MeterUsage"'
)
ENTITLEMENT_HINT = (
    "launch the instance from the product's AWS Marketplace subscription, and check that "
    "product_code matches the listing"
)

# How each service answer is treated. Anything not listed is final (`rejected`).
RETRYABLE = {
    "ThrottlingException",
    "InternalServiceErrorException",
    "InternalFailure",
    "ServiceUnavailable",
    "InvalidEndpointRegionException",
    "ExpiredTokenException",
    "RequestTimeout",
    "RequestTimeoutException",
    # Signing and credential answers: the identical request succeeds once the credentials are
    # refreshed or the clock is right again, so they never lose the hour.
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "RequestExpired",
}
SIGNING = {
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidClientTokenId",
    "ExpiredTokenException",
    "RequestExpired",
}
# PlatformNotSupportedException: a container's call signed by the node's role ("This operation can
# only be called from within an ECS task or an EKS pod"): the signer is wrong, not the hour.
UNAUTHORIZED = {
    "AccessDeniedException",
    "UnauthorizedException",
    "AccessDenied",
    "PlatformNotSupportedException",
}
NOT_ENTITLED = {"CustomerNotEntitledException", "InvalidProductCodeException"}
# The seller's configuration, not the buyer's usage: the hour is held (pending) until it expires.
HELD = {"InvalidProductCodeException", "InvalidUsageDimensionException"}
PRODUCT_CODE_REFUSED = "InvalidProductCodeException"
OUT_OF_BOUNDS = "TimestampOutOfBoundsException"
SKEW_NAMED = 60.0  # a clock this far from the service's `Date` is named in the reason


# What the ledger does with an hour after one answer (a DryRun's: dryrun_ok if permitted).
Status = Literal["sent", "retry", "held", "unauthorized", "expired", "rejected", "dryrun_ok"]


def error_text(code: str | None, message: str | None) -> str | None:
    """An answer's error as the ledger and logs keep it: "Code: message" (None: no error)."""
    if code is None:
        return None
    return f"{code}: {message}" if message else code


@dataclass(frozen=True)
class Outcome:
    """How one MeterUsage (or DryRun) call ended, in the ledger's terms."""

    status: Status
    record_id: str | None = None
    code: str | None = None
    message: str | None = None

    @property
    def error(self) -> str | None:
        return error_text(self.code, self.message)


# RegisterUsage's answers: final (exit 77), retried (throttling, 5xx, the network, credentials
# not yet there, a signature a refresh fixes), anything else a failure of its own (exit 1).
REGISTER_REFUSED = {
    "CustomerNotEntitledException",
    "PlatformNotSupportedException",
    "InvalidProductCodeException",
    "InvalidPublicKeyVersionException",
    "InvalidRegionException",
    "DisabledApiException",
    *UNAUTHORIZED,
}
REGISTER_RETRYABLE = {
    "ThrottlingException",
    "InternalServiceErrorException",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    *SIGNING,
}

RegistrationVerdict = Literal["ok", "retry", "refused", "failed"]


@dataclass(frozen=True)
class Registration:
    """How one RegisterUsage call ended: `ok` with the signed token (and the key's rotation time
    when the service sends one), `retry`, `refused` (the final errors: exit 77) or `failed`."""

    verdict: RegistrationVerdict
    signature: str | None = None
    rotation: float | None = None  # PublicKeyRotationTimestamp, epoch seconds
    code: str | None = None
    message: str | None = None

    @property
    def error(self) -> str | None:
        return error_text(self.code, self.message)


def classify_registration(code: str, http_status: int | None) -> RegistrationVerdict:
    """A RegisterUsage error code -> retry it, or stop (refused: 77; failed: anything else)."""
    if code in REGISTER_REFUSED:
        return "refused"
    if code in REGISTER_RETRYABLE or (http_status is not None and http_status >= 500):
        return "retry"
    return "failed"


def classify(code: str, http_status: int | None, message: str = "") -> Status:
    """Map a service error code to what the ledger does with the hour."""
    if code in UNAUTHORIZED:
        return "unauthorized"
    if code == OUT_OF_BOUNDS:
        return "expired"
    if code in HELD:
        return "held"
    if code in RETRYABLE or (http_status is not None and http_status >= 500):
        return "retry"
    if "signature expired" in message.lower():
        return "retry"
    return "rejected"


def error_code(error: str | None) -> str | None:
    """The service's error code at the head of a stored `last_error` ("Code: message")."""
    if not error:
        return None
    return error.split(":", 1)[0].strip() or None


def skew_note(date_header: str | None, now: float) -> str | None:
    """Name a skewed clock: the answer's HTTP `Date` against this machine's clock."""
    if not date_header:
        return None
    try:
        service = email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    skew = now - service
    if abs(skew) < SKEW_NAMED:
        return None
    way = "ahead of" if skew > 0 else "behind"
    return (
        f"this machine's clock is {abs(skew):.0f} s {way} the service's ({date_header}): "
        "signatures older than 5 minutes are refused; check NTP (chronyc tracking)"
    )


def batch_outcome(records: Sequence[Mapping[str, Any]], resp: Mapping[str, Any]) -> BatchOutcome:
    """A BatchMeterUsage answer, each result matched to its record by customer, dimension and
    Timestamp (the answer echoes the record; its order is not promised)."""
    where = {record_key(r): i for i, r in enumerate(records)}
    results: dict[int, RecordResult] = {}
    for r in resp.get("Results") or ():
        i = where.get(record_key(r.get("UsageRecord") or {}))
        if i is not None:
            results[i] = RecordResult(i, str(r.get("Status")), r.get("MeteringRecordId"))
    for r in resp.get("UnprocessedRecords") or ():
        i = where.get(record_key(r))
        if i is not None:
            results[i] = RecordResult(i, UNPROCESSED)
    answered = tuple(results.get(i, RecordResult(i, MISSING)) for i in range(len(records)))
    return BatchOutcome(Outcome("sent"), answered)


# BatchMeterUsage: per-record answers besides the service's Status values
BATCH_SUCCESS = "Success"
BATCH_REFUSED = {"CustomerNotSubscribed", "DuplicateRecord"}  # the record is rejected
UNPROCESSED = "Unprocessed"  # in UnprocessedRecords: resubmit
MISSING = "Missing"  # in neither list (never seen): resubmit, identically
# A whole BatchMeterUsage call refused for what one of its records holds: split in halves until
# the offending record is alone, which then gets the verdict instance mode gives an hour.
BATCH_INVALID = {
    "ValidationException",
    "InvalidTagException",
    "InvalidUsageAllocationsException",
    "InvalidCustomerIdentifierException",
    "InvalidLicenseException",
    "InvalidUsageDimensionException",
    OUT_OF_BOUNDS,
}
SAAS_ROLE_HINT = (
    "give the seller's credentials (instance role, task role or user) a policy allowing "
    '"aws-marketplace:BatchMeterUsage" and "aws-marketplace:ResolveCustomer"'
)
SAAS_PRODUCT_HINT = "check that product_code is the SaaS listing's product code"


@dataclass(frozen=True)
class RecordResult:
    index: int  # the record's position in the call's UsageRecords
    status: str  # Success | CustomerNotSubscribed | DuplicateRecord | Unprocessed | Missing
    record_id: str | None = None


@dataclass(frozen=True)
class BatchOutcome:
    """How one BatchMeterUsage call ended: `call` is `sent` when the service answered (then
    `results` holds one per record), else the whole call's failure, as for MeterUsage."""

    call: Outcome
    results: tuple[RecordResult, ...] = ()


def record_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
    """What names a UsageRecord in an answer: its customer, dimension and Timestamp (the answer
    echoes the record; one call never holds two records with the same key)."""
    ts = record.get("Timestamp")
    epoch = int(ts.timestamp()) if isinstance(ts, datetime) else ts
    return (
        record.get("CustomerAWSAccountId"),
        record.get("LicenseArn"),
        record.get("CustomerIdentifier"),
        record.get("Dimension"),
        epoch,
    )


class TokenRefused(NotAuthorized):
    """ResolveCustomer refused the registration token (invalid or expired)."""


@dataclass(frozen=True)
class Resolved:
    """ResolveCustomer's answer: a new integration's CustomerAWSAccountId + LicenseArn, or a
    legacy product's CustomerIdentifier (an account id may come with it)."""

    account_id: str | None
    license_arn: str | None
    agreement_id: str | None
    customer_identifier: str | None
    product_code: str | None

    def as_json(self) -> dict[str, str | None]:
        return {
            "CustomerAWSAccountId": self.account_id,
            "LicenseArn": self.license_arn,
            "AgreementId": self.agreement_id,
            "CustomerIdentifier": self.customer_identifier,
            "ProductCode": self.product_code,
        }
