"""Everything that talks to AWS: IMDSv2, region resolution, the DryRun check, MeterUsage,
RegisterUsage, ResolveCustomer and BatchMeterUsage (SaaS mode).

boto3 is imported only inside the functions that call the service, so the sampling daemon can import
this module (for IMDS) without keeping boto3 (~30 MiB) resident; sends happen in a short child.
"""

from __future__ import annotations

import email.utils
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from agent.aggregate import Allocation, Quantity, to_json
from agent.clock import Clock
from agent.errors import AgentError, NotAuthorized, Unavailable
from agent.host.platform import (
    NODE_ROLE_CODE,
    ROLE_TO_SET,
    TaskMetadata,
    node_role_refusal,
    task_region,
)
from agent.ledger.hours import SealedHour

log = logging.getLogger(__name__)

IMDS_DEFAULT = "http://169.254.169.254"
IMDS_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
SERVICE = "meteringmarketplace"

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
# ResolveCustomer: a buyer is waiting on the fulfillment page, so throttling and the service's
# transient failures are retried here, briefly, not through the ledger.
RESOLVE_TRIES = 5
RESOLVE_BACKOFF = 0.25  # seconds before the 2nd try; doubled for each next one


class ImdsError(Unavailable):
    pass


class Imds:
    """A minimal IMDSv2 client (token first, never v1), honouring botocore's endpoint variable."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 1.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.endpoint = (endpoint or env.get(IMDS_ENV) or IMDS_DEFAULT).rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _open(self, req: urllib.request.Request) -> str:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return str(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise ImdsError(
                f"IMDS at {self.endpoint} answered HTTP {e.code} for {req.full_url}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ImdsError(
                f"IMDS at {self.endpoint} is unreachable ({reason}); not on EC2? set "
                f"metering.region, or {IMDS_ENV} for a test IMDS"
            ) from None

    def token(self) -> str:
        if self._token is None:
            req = urllib.request.Request(
                f"{self.endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            self._token = self._open(req)
        return self._token

    def get(self, path: str) -> str:
        req = urllib.request.Request(
            f"{self.endpoint}/latest/meta-data/{path}",
            headers={"X-aws-ec2-metadata-token": self.token()},
        )
        return self._open(req).strip()

    def region(self) -> str:
        return self.get("placement/region")

    def instance_id(self) -> str:
        return self.get("instance-id")


def resolve_region(
    configured: str,
    env: Mapping[str, str] | None = None,
    imds: Imds | None = None,
    platform: str = "ec2",
    metadata: TaskMetadata | None = None,
) -> tuple[str, str]:
    """(region, where it came from): config, then $AWS_REGION, $AWS_DEFAULT_REGION, then on ECS
    the task metadata's TaskARN, on EC2/EKS IMDS (on EKS a pod often cannot reach it: hop limit)."""
    env = os.environ if env is None else env
    if configured and configured != "auto":
        return configured, "config metering.region"
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if env.get(var):
            return env[var], f"${var}"
    if platform == "ecs":
        return task_region(metadata or TaskMetadata(env)), "ECS task metadata TaskARN"
    imds = imds or Imds(env=env)
    if platform == "eks":
        try:
            return imds.region(), "IMDS placement/region"
        except ImdsError as e:
            raise ImdsError(
                f"{e}; in an EKS pod set AWS_REGION (or metering.region), or raise the node's "
                "IMDSv2 hop limit to 2"
            ) from None
    return imds.region(), "IMDS placement/region"


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


class MeteringClient:
    """A meteringmarketplace client signed by the default credential chain."""

    def __init__(
        self,
        region: str,
        endpoint_url: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        clock: Clock | None = None,
        platform: str = "ec2",
    ) -> None:
        # botocore falls back to IMDSv1 unless told not to; SPEC says IMDSv2 only.
        os.environ.setdefault("AWS_EC2_METADATA_V1_DISABLED", "true")
        import boto3
        from botocore.config import Config as BotoConfig

        self.region = region
        self.platform = platform
        self._refusal: str | None = None  # node_role_refusal, once credentials are known
        self.clock = clock or Clock()
        self.session = boto3.session.Session(region_name=region)
        self._client: Any = None
        self._client_args = dict(
            endpoint_url=endpoint_url,
            config=BotoConfig(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                # Retries are the ledger's job: it keeps the sealed request and the backoff
                # state across restarts, which botocore's in-memory retries cannot.
                retries={"total_max_attempts": 1, "mode": "standard"},
                user_agent_extra="metering-agent",
            ),
        )

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use: botocore may consult IMDS while making it, and
        that failure belongs to a call's outcome, not to start-up."""
        if self._client is None:
            self._client = self.session.client(SERVICE, **self._client_args)
        return self._client

    def has_credentials(self) -> bool:
        try:
            return self.session.get_credentials() is not None
        except Exception as e:  # botocore raises many kinds while fetching from IMDS/ECS
            log.warning("credential lookup failed: %s", e)
            return False

    def credential_source(self) -> str | None:
        """botocore's name for where the default chain found credentials (`credentials.method`:
        env, container-role, assume-role-with-web-identity, iam-role, ...); None: none found."""
        creds = self.session.get_credentials()
        return None if creds is None else str(getattr(creds, "method", "unknown"))

    def refusal(self) -> str | None:
        """On ECS/EKS, the line refusing the node's instance role (platform.node_role_refusal).
        Asked before each call; a lookup that fails is left to the call, which reports it."""
        if self.platform == "ec2":
            return None
        if self._refusal is None:
            try:
                method = self.credential_source()
            except Exception:  # botocore raises many kinds while fetching from IMDS/ECS/STS
                return None
            self._refusal = node_role_refusal(self.platform, method) or ""
        return self._refusal or None

    def call(self, request: Mapping[str, Any]) -> Outcome:
        """One MeterUsage call; never raises for anything the network or service does."""
        resp = self._invoke("meter_usage", request)
        if isinstance(resp, Outcome):
            return resp
        record_id = resp.get("MeteringRecordId")
        if record_id == "DryRunOperation":
            return Outcome("dryrun_ok", record_id=record_id)
        return Outcome("sent", record_id=record_id)

    def _invoke(self, operation: str, request: Mapping[str, Any]) -> dict[str, Any] | Outcome:
        """One call of `operation`: its answer, or how it failed (never raises for anything the
        network or service does), classified alike for every operation."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            MetadataRetrievalError,
            NoCredentialsError,
        )

        # MeterUsage from a container product: no request leaves, the service would refuse the
        # node's role (SaaS's BatchMeterUsage is the seller's own: not refused here)
        refused = self.refusal() if operation == "meter_usage" else None
        if refused:
            return Outcome("unauthorized", code=NODE_ROLE_CODE, message=refused)
        try:
            resp: dict[str, Any] = getattr(self.client, operation)(**request)
        except MetadataRetrievalError as e:
            if self.platform in ROLE_TO_SET:  # only IMDS was left, and its role is refused here
                return Outcome(
                    "unauthorized",
                    code="NoCredentials",
                    message=f"{e}; {ROLE_TO_SET[self.platform]}",
                )
            return Outcome("retry", code="NoCredentials", message=f"{e}; {ROLE_HINT}")
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "Unknown")
            meta = e.response.get("ResponseMetadata", {})
            status = meta.get("HTTPStatusCode")
            message = str(err.get("Message") or "")
            if code == "DryRunOperation":
                return Outcome("dryrun_ok", code=code, message=message)
            verdict = classify(code, status, message)
            if code in SIGNING or code == OUT_OF_BOUNDS or "signature" in message.lower():
                note = skew_note(meta.get("HTTPHeaders", {}).get("date"), self.clock.time())
                if note:
                    message = f"{message}; {note}" if message else note
            return Outcome(verdict, code=code, message=message)
        except NoCredentialsError as e:
            if self.platform in ROLE_TO_SET:  # no task role / IRSA: final until one is set
                return Outcome(
                    "unauthorized",
                    code="NoCredentials",
                    message=f"{e}; {ROLE_TO_SET[self.platform]}",
                )
            return Outcome("retry", code="NoCredentials", message=f"{e}; {ROLE_HINT}")
        except BotoCoreError as e:  # timeouts, connection refused/reset, credential fetch errors
            return Outcome("retry", code=type(e).__name__, message=str(e))
        return resp

    def register_usage(
        self, product_code: str, public_key_version: int, nonce: str | None
    ) -> Registration:
        """One RegisterUsage call; never raises for anything the network or service does."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        request: dict[str, Any] = {
            "ProductCode": product_code,
            "PublicKeyVersion": public_key_version,
        }
        if nonce is not None:
            request["Nonce"] = nonce
        try:
            resp = self.client.register_usage(**request)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "Unknown")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            message = str(err.get("Message") or "")
            return Registration(classify_registration(code, status), code=code, message=message)
        except NoCredentialsError as e:
            return Registration("retry", code="NoCredentials", message=f"{e}; {ROLE_HINT}")
        except BotoCoreError as e:  # timeouts, refused connections, credential fetch errors
            return Registration("retry", code=type(e).__name__, message=str(e))
        rotation = resp.get("PublicKeyRotationTimestamp")
        if isinstance(rotation, datetime):
            rotation = rotation.timestamp()
        return Registration(
            "ok",
            signature=resp.get("Signature"),
            rotation=float(rotation) if rotation is not None else None,
        )

    def meter_usage(self, h: SealedHour) -> Outcome:
        """The sealed hour's request, identical on every try."""
        return self.call(
            build_request(
                h.product_code, h.dimension, h.timestamp, h.quantity, h.client_token, h.allocations
            )
        )

    def resolve_customer(self, token: str) -> Resolved:
        """ResolveCustomer for a registration token (see `resolve`)."""
        return resolve(self, token)

    def dry_run(
        self, product_code: str, dimension: str, decimals: int | None, now: float
    ) -> Outcome:
        """MeterUsage(DryRun=True) for a zero quantity of the dimension's own type."""
        zero = Quantity("0." + "0" * decimals if decimals else 0)
        request = build_request(product_code, dimension, now, zero, None)
        request["DryRun"] = True
        return self.call(request)

    def batch_meter_usage(
        self, records: Sequence[Mapping[str, Any]], product_code: str | None
    ) -> BatchOutcome:
        """One BatchMeterUsage call of `records` (UsageRecords, built by agent.batching), with
        the request's ProductCode only when given (legacy CustomerIdentifier records); each
        record's result by its position in `records`."""
        request: dict[str, Any] = {"UsageRecords": [dict(r) for r in records]}
        if product_code is not None:
            request["ProductCode"] = product_code
        resp = self._invoke("batch_meter_usage", request)
        if isinstance(resp, Outcome):
            return BatchOutcome(resp)
        return batch_outcome(records, resp)

    def probe_batch(self, product_code: str) -> Outcome:
        """An empty BatchMeterUsage (the model allows 0 records): SaaS mode's permission probe,
        as MeterUsage's DryRun is instance mode's; `dryrun_ok` when permitted."""
        outcome = self.batch_meter_usage((), product_code).call
        return Outcome("dryrun_ok") if outcome.status == "sent" else outcome


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


def resolve(client: MeteringClient, token: str) -> Resolved:
    """ResolveCustomer for a registration token, now: throttling and transient failures retried
    with backoff (on the client's clock), every other answer one AgentError line.

    Why at once: the token expires within hours of the buyer's browser posting it, so a token
    is redeemed when it arrives, never queued. The token itself is in no message."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    delay = RESOLVE_BACKOFF
    for attempt in range(1, RESOLVE_TRIES + 1):
        try:
            answer = client.client.resolve_customer(RegistrationToken=token)
        except NoCredentialsError:
            raise Unavailable(
                f"ResolveCustomer: no AWS credentials found; {SAAS_ROLE_HINT}"
            ) from None
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "Unknown")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            text = f"{code}: {err.get('Message') or ''}".rstrip(": ")
            if code == "InvalidTokenException":
                raise TokenRefused(
                    f"ResolveCustomer: the registration token is not valid ({text}); pass the "
                    "x-amzn-marketplace-token exactly as AWS Marketplace posted it"
                ) from None
            if code == "ExpiredTokenException" and "security token" in text.lower():
                raise Unavailable(  # the seller's own session credentials, not the buyer's token
                    f"ResolveCustomer: the AWS credentials' session has expired ({text}); "
                    "refresh the credentials the agent runs with"
                ) from None
            if code == "ExpiredTokenException":
                raise TokenRefused(
                    f"ResolveCustomer: the registration token has expired ({text}); a token must "
                    "be redeemed at once, as the buyer's browser posts it (the fulfillment "
                    "handler does); ask the buyer to open the product's setup link again"
                ) from None
            if code in UNAUTHORIZED:
                raise NotAuthorized(
                    f"ResolveCustomer: not authorized ({text}); {SAAS_ROLE_HINT}"
                ) from None
            if classify(code, status, text) != "retry":
                raise AgentError(
                    f"ResolveCustomer: the service refused the request ({text})"
                ) from None
            failure = text
        except BotoCoreError as e:  # timeouts, connection refused/reset, credential fetch errors
            failure = f"{type(e).__name__}: {e}"
        else:
            return _resolved(answer)
        if attempt < RESOLVE_TRIES:
            log.warning("ResolveCustomer: try %d of %d failed (%s); retrying in %.2f s",
                        attempt, RESOLVE_TRIES, failure, delay)  # fmt: skip
            client.clock.sleep(delay)
            delay *= 2
    raise Unavailable(
        f"ResolveCustomer: service unreachable or throttling after {RESOLVE_TRIES} tries "
        f"({failure}); try again in a minute"
    )


def _resolved(answer: Mapping[str, Any]) -> Resolved:
    return Resolved(
        account_id=answer.get("CustomerAWSAccountId"),
        license_arn=answer.get("LicenseArn"),
        agreement_id=(answer.get("Metadata") or {}).get("AgreementId"),
        customer_identifier=answer.get("CustomerIdentifier"),
        product_code=answer.get("ProductCode"),
    )


def build_request(
    product_code: str,
    dimension: str,
    timestamp: float,
    quantity: Quantity,
    client_token: str | None,
    allocations: Sequence[Allocation] = (),
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "ProductCode": product_code,
        "Timestamp": datetime.fromtimestamp(int(timestamp), tz=timezone.utc),
        "UsageDimension": dimension,
        **quantity.request_fields(),
    }
    if allocations:  # sealed with the quantity, in its type (Allocation.request_fields)
        request["UsageAllocations"] = to_json(allocations)
    if client_token:
        request["ClientToken"] = client_token
    return request


def dry_run_verdict(
    outcome: Outcome,
    name: str = "MeterUsage DryRun",
    role_hint: str = ROLE_HINT,
    entitlement_hint: str = ENTITLEMENT_HINT,
) -> str:
    """Turn a DryRun outcome into a one-line verdict, or raise the error `check` exits with.
    SaaS mode's probe (an empty BatchMeterUsage) passes its own name and hints."""
    if outcome.status == "dryrun_ok":
        how = "DryRunOperation error" if outcome.code == "DryRunOperation" else "HTTP 200"
        return f"{name}: permitted ({how})"
    code, text = outcome.code or "", outcome.error or "unknown error"
    if code == NODE_ROLE_CODE:
        raise NotAuthorized(f"{name}: {outcome.message}")
    if code in UNAUTHORIZED:
        raise NotAuthorized(f"{name}: not authorized ({text}); {role_hint}")
    if code in NOT_ENTITLED:
        raise NotAuthorized(f"{name}: {text}; {entitlement_hint}")
    if code == "InvalidEndpointRegionException":
        raise Unavailable(
            f"{name}: {text}; the endpoint must be in the instance's region "
            "(check metering.region / metering.endpoint_url)"
        )
    if code == "NoCredentials":
        raise Unavailable(f"{name}: no AWS credentials found; {role_hint}")
    if outcome.status == "retry":
        raise Unavailable(f"{name}: service unreachable or failing ({text})")
    if code == OUT_OF_BOUNDS:
        raise AgentError(f"{name}: {text}; this machine's clock is off: check NTP (chrony) sync")
    if code == "InvalidUsageDimensionException":
        raise NotAuthorized(
            f"{name}: {text}; every dimensions[].name must be a dimension of the listing"
        )
    if code in SIGNING or "signature expired" in text.lower():
        raise Unavailable(f"{name}: the request's signature was refused ({text})")
    raise AgentError(f"{name}: the service refused the request ({text})")
