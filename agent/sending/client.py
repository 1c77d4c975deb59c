"""The only boto3 user: the meteringmarketplace client signed by the default credential chain
(MeterUsage and its DryRun, RegisterUsage, ResolveCustomer, BatchMeterUsage), each answer made an
Outcome (outcomes.py); and the SQS queue of subscription notifications (SubscriptionQueue).

boto3 is imported only inside the functions that call the service, so the sampling daemon never
keeps boto3 (~30 MiB) resident; sends happen in a short child.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from agent.aggregate import Allocation, Quantity, to_json
from agent.clock import Clock
from agent.errors import AgentError, NotAuthorized, Unavailable
from agent.host.platform import (
    NODE_ROLE_CODE,
    ROLE_TO_SET,
    node_role_refusal,
)
from agent.ledger.hours import SealedHour
from agent.sending.outcomes import (
    ENTITLEMENT_HINT,
    NOT_ENTITLED,
    OUT_OF_BOUNDS,
    ROLE_HINT,
    SAAS_ROLE_HINT,
    SIGNING,
    UNAUTHORIZED,
    BatchOutcome,
    Outcome,
    Registration,
    Resolved,
    TokenRefused,
    batch_outcome,
    classify,
    classify_registration,
    skew_note,
)

log = logging.getLogger(__name__)

SERVICE = "meteringmarketplace"
# ResolveCustomer: a buyer is waiting on the fulfillment page, so throttling and the service's
# transient failures are retried here, briefly, not through the ledger.
RESOLVE_TRIES = 5
RESOLVE_BACKOFF = 0.25  # seconds before the 2nd try; doubled for each next one


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

    def resolve_customer(
        self, token: str, before_call: Callable[[], None] | None = None
    ) -> Resolved:
        """ResolveCustomer for a registration token (see `resolve`)."""
        return resolve(self, token, before_call)

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
        """One BatchMeterUsage call of `records` (UsageRecords, built by sending/batches.py), with
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


def resolve(
    client: MeteringClient, token: str, before_call: Callable[[], None] | None = None
) -> Resolved:
    """ResolveCustomer for a registration token, now: throttling and transient failures retried
    with backoff (on the client's clock), every other answer one AgentError line.
    `before_call` runs before every try (the fulfillment handler's call budget: it raises to
    make no call).

    Why at once: the token expires within hours of the buyer's browser posting it, so a token
    is redeemed when it arrives, never queued. The token itself is in no message."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    delay = RESOLVE_BACKOFF
    for attempt in range(1, RESOLVE_TRIES + 1):
        if before_call is not None:
            before_call()
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


class QueueError(Exception):
    """ReceiveMessage or DeleteMessage failed: `code` is the service's error code (or the
    exception's name for the network), `denied` when it is a permission refusal."""

    def __init__(self, code: str, message: str, denied: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.denied = code, denied


SQS_WAIT = 20  # seconds a ReceiveMessage long-polls (SQS's maximum)
DENIED_CODES = ("AccessDenied", "AccessDeniedException", "KMS.AccessDeniedException")


class SubscriptionQueue:
    """The seller's SQS queue of Marketplace subscription notifications: long-polled receives
    and deletes, signed by the default credential chain. A queue URL on AWS names its region
    (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`); any other host (a VPC endpoint, a local
    SQS) is the endpoint itself, signed for `region`."""

    def __init__(self, queue_url: str, region: str, wait: int = SQS_WAIT) -> None:
        os.environ.setdefault("AWS_EC2_METADATA_V1_DISABLED", "true")
        import boto3
        from botocore.config import Config as BotoConfig

        self.url, self.wait = queue_url, wait
        queue_region, endpoint = queue_endpoint(queue_url)
        self.client = boto3.session.Session(region_name=queue_region or region).client(
            "sqs",
            endpoint_url=endpoint,
            config=BotoConfig(
                connect_timeout=5,
                read_timeout=wait + 10,  # a long poll answers within `wait` seconds
                retries={"total_max_attempts": 1, "mode": "standard"},
                user_agent_extra="metering-agent",
            ),
        )

    def receive(self) -> list[dict[str, Any]]:
        """Up to 10 messages, waiting up to `wait` s for one; each keeps its receipt handle."""
        answer = self._call(
            "receive_message",
            QueueUrl=self.url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=self.wait,
            MessageSystemAttributeNames=["SentTimestamp", "ApproximateReceiveCount"],
        )
        return list(answer.get("Messages") or [])

    def delete(self, receipt_handle: str) -> None:
        self._call("delete_message", QueueUrl=self.url, ReceiptHandle=receipt_handle)

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return dict(getattr(self.client, operation)(**kwargs))
        except ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code") or "ClientError")
            denied = code in DENIED_CODES or "AccessDenied" in code or code in (
                "UnrecognizedClientException", "InvalidClientTokenId", "SignatureDoesNotMatch"
            )  # fmt: skip
            raise QueueError(code, str(error.get("Message") or e), denied) from None
        except BotoCoreError as e:  # no credentials, no network, a timeout
            raise QueueError(type(e).__name__, str(e)) from None


def queue_endpoint(queue_url: str) -> tuple[str | None, str | None]:
    """(the region an AWS queue URL names, None) or (None, the endpoint of any other URL)."""
    from urllib.parse import urlsplit

    parts = urlsplit(queue_url)
    host = parts.hostname or ""
    labels = host.split(".")
    if host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn"):
        if labels[0] == "sqs" and len(labels) >= 4:  # sqs.REGION.amazonaws.com
            return labels[1], None
        if len(labels) >= 4 and labels[1] == "queue":  # REGION.queue.amazonaws.com (legacy)
            return labels[0], None
    return None, f"{parts.scheme}://{parts.netloc}"
