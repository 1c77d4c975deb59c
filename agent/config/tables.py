"""The field tables: the single definition of the config format. The loader validates with them
and `metering-agent schema` prints them as JSON Schema.
"""

from __future__ import annotations

import string
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.config.model import (
    AGGREGATES,
    DEFAULT_SEND_WINDOW,
    DEFAULT_STATE_DIR,
    DEFAULT_TIMEOUT,
    MAX_TAGS,
    PRODUCT_CODE,
    REGION,
    TAG_CHAR,
)
from agent.errors import ConfigError
from agent.fields import (
    Bool,
    Duration,
    Enum,
    Field,
    Int,
    ListOf,
    MapOf,
    Nullable,
    Number,
    Passthrough,
    Section,
    Str,
)
from agent.warnings import KINDS

INTERVAL = Duration(minimum=1, maximum=3600, divides=3600)

METERING = Section(
    {
        "region": Field(
            Str(REGION, hint="expected auto or a region name such as us-east-1"),
            default="auto",
            doc="auto: $AWS_REGION, $AWS_DEFAULT_REGION, then the ECS TaskARN (ecs) or IMDS",
        ),
        "endpoint_url": Field(
            Nullable(Str(r"https?://\S+", hint="expected an http:// or https:// URL")),
            doc="override: a VPC endpoint, or the local emulator",
        ),
        "send_window": Field(
            Duration(0, 3600),
            default=DEFAULT_SEND_WINDOW,
            doc="hour H is sent at H+1:00 plus a per-instance offset in [0, send_window)",
        ),
        "startup_check": Field(Bool(), default=True, doc="MeterUsage DryRun at startup"),
        "on_check_failure": Field(
            Nullable(Enum(("exit", "continue"))),
            doc="a start-up DryRun refused (not throttled, not 5xx): exit ends `run` with 77; "
            "default exit on ecs/eks, continue on ec2",
        ),
    }
)

SAMPLING = Section(
    {
        "interval": Field(
            INTERVAL, default=60, doc="seconds between samples; must divide 3600 evenly"
        )
    }
)


def _hook(after_default: int | None) -> Section:
    fields = {
        "command": Field(
            ListOf(Str(), min_items=1), required=True, doc="argv to run, no shell: [cmd, arg, ...]"
        ),
        "timeout": Field(Duration(1, 3600), default=60, doc="kill the command after this long"),
    }
    if after_default is not None:
        fields["after"] = Field(
            Duration(0),
            default=after_default,
            doc="how long sends must fail before the hook runs (AWS: not before 2h)",
        )
    return Section(fields)


DIMENSION_FIELDS = {
    "name": Field(
        Str(r"[\s\S]+", max_len=255), required=True, doc="the UsageDimension from the listing"
    ),
    "collector": Field(
        Passthrough({"type": "object"}),  # validated per type by the registry: _collector()
        required=True,
        doc="where readings come from: {type: system|..., ...}",
    ),
    "aggregate": Field(
        Enum(AGGREGATES), doc="how an hour's samples become one quantity (default: sum or max)"
    ),
    "scale": Field(
        Number(Decimal(0), exclusive_minimum=True), default=Decimal(1), doc="multiplier"
    ),
    "rounding": Field(Enum(("up", "down", "nearest")), default="nearest", doc="half up"),
    "decimals": Field(Int(1, 6), doc="send UsageQuantityAsDecimal with this many places"),
    "interval": Field(INTERVAL, doc="this dimension's sampling interval (default: sampling's)"),
    "allocations": Field(
        Section(
            {
                "tags": Field(
                    MapOf(
                        Str(),
                        key=Str(
                            f"{TAG_CHAR}+",
                            max_len=100,
                            hint="a tag key is letters, digits, spaces and + - = . _ : / @",
                        ),
                        min_items=1,
                        max_items=MAX_TAGS,
                    ),
                    required=True,
                    doc="tag key (the buyer sees aws:marketplace:isv:<Key>) -> label; 1..5",
                )
            }
        ),
        doc="split each hour's quantity by label into MeterUsage UsageAllocations",
    ),
    "max_label_sets": Field(
        Int(1, 10_000), default=2500, doc="label sets kept apart per hour; more count unlabelled"
    ),
}

REGISTER_USAGE = Section(
    {
        "public_key_version": Field(
            Int(1), required=True, doc="the listing's public key version (RegisterUsage)"
        ),
        "public_key": Field(
            Nullable(Str()),
            doc="PEM file of the listing's RSA public key: verify RegisterUsage's signed answer",
        ),
    }
)

METRICS = Section(
    {
        "textfile": Field(
            Str(
                r"/\S*[^/\s]\.prom",
                hint="an absolute path of a file named *.prom (node_exporter's textfile collector "
                "reads only those), e.g. /var/lib/prometheus/node-exporter/metering-agent.prom",
            ),
            required=True,
            doc="write the agent's own state there in Prometheus text format (node_exporter's "
            "textfile collector), atomically",
        ),
    }
)

SAAS = Section(
    {
        "customer_label": Field(
            Str(r"[a-zA-Z_][a-zA-Z0-9_]*", max_len=100, hint="a label name such as customer"),
            default="customer",
            doc="the label (see Labels) that names the customer in every dimension",
        ),
        "idle_zero": Field(
            Bool(), default=True, doc="each hour, send 0 for every known customer without usage"
        ),
        "registration": Field(
            Nullable(
                Section(
                    {
                        "listen": Field(
                            Str(r"[^\s:]+:\d{1,5}", hint="expected host:port, e.g. 127.0.0.1:8788"),
                            default="127.0.0.1:8788",
                            doc="where the fulfillment URL handler listens",
                        ),
                        "redirect": Field(
                            Str(r"https?://\S+", hint="expected an http:// or https:// URL"),
                            required=True,
                            doc="302 target; {customer_aws_account_id}, {license_arn}, "
                            "{agreement_id}, {customer} are filled in",
                        ),
                        "max_connections": Field(
                            Int(8, 100_000),
                            default=500,
                            doc="open connections at most; at the cap, the one reading its "
                            "request longest is closed (keep under the unit's LimitNOFILE)",
                        ),
                        "trusted_proxy": Field(
                            Nullable(
                                Str(
                                    r"[0-9a-fA-F.:]+",
                                    hint="expected the proxy's IP address, e.g. 127.0.0.1",
                                )
                            ),
                            doc="the reverse proxy's address: only from it is X-Forwarded-For "
                            "read as the client (per-client limits)",
                        ),
                    }
                )
            ),
            doc="optional: serve the fulfillment URL (the buyer's registration POST)",
        ),
        "notifications": Field(
            Nullable(
                Section(
                    {
                        "queue_url": Field(
                            Str(
                                r"https?://[^\s/]+/\S+",
                                hint="expected the queue's URL, e.g. "
                                "https://sqs.us-east-1.amazonaws.com/123456789012/marketplace",
                            ),
                            required=True,
                            doc="the SQS queue subscribed to the product's Marketplace SNS topic",
                        ),
                    }
                )
            ),
            doc="optional: apply AWS Marketplace's subscription notifications (SQS long poll)",
        ),
    }
)

# The fields the fulfillment handler fills in `saas.registration.redirect` (fulfillment.handler).
REDIRECT_FIELDS = ("customer_aws_account_id", "license_arn", "agreement_id", "customer")


def check_redirect(redirect: str, key: str = "saas.registration.redirect") -> str:
    """The redirect template may name only the fields the handler fills in."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(redirect) if name is not None}
    except ValueError as e:
        raise ConfigError(key, f"{e}; write a literal brace as {{{{ or }}}}") from None
    unknown = sorted(n for n in names if n not in REDIRECT_FIELDS)
    if unknown:
        raise ConfigError(
            key,
            f"unknown field {{{unknown[0]}}}; the handler fills in "
            + ", ".join(f"{{{f}}}" for f in REDIRECT_FIELDS),
        )
    return redirect


TOP = Section(
    {
        "version": Field(Int(1, 1), default=1, doc="config format version"),
        "product_code": Field(
            Str(PRODUCT_CODE, max_len=255, hint="use the product code from the listing"),
            required=True,
        ),
        "state_dir": Field(Str(), default=DEFAULT_STATE_DIR, doc="ledger and health file"),
        "platform": Field(
            Enum(("auto", "ec2", "ecs", "eks")),
            default="auto",
            doc="auto: $ECS_CONTAINER_METADATA_URI_V4 -> ecs; $AWS_WEB_IDENTITY_TOKEN_FILE or "
            "$KUBERNETES_SERVICE_HOST -> eks; else ec2",
        ),
        "metering": Field(METERING, default=None),
        "sampling": Field(SAMPLING, default=None),
        "dimensions": Field(
            ListOf(Section(DIMENSION_FIELDS), min_items=1),
            required=True,
            doc="one entry per UsageDimension",
        ),
        "on_metering_failure": Field(
            Nullable(_hook(7200)), doc="run once when sending has failed for `after`"
        ),
        "on_recovery": Field(Nullable(_hook(None)), doc="run once when sending works again"),
        "register_usage": Field(
            Nullable(REGISTER_USAGE),
            doc="call RegisterUsage at start (container products priced by the hour)",
        ),
        "mode": Field(
            Enum(("instance", "saas")),
            default="instance",
            doc="instance: MeterUsage per instance; saas: BatchMeterUsage per customer",
        ),
        "saas": Field(Nullable(SAAS), doc="SaaS mode's customers and registration (mode: saas)"),
        "warnings": Field(
            Nullable(
                Section(
                    {
                        "accept": Field(
                            ListOf(Enum(tuple(KINDS))),
                            default=[],
                            doc="names of warnings that are meant: not printed, and not "
                            "failures for check --strict",
                        )
                    }
                )
            ),
            doc="warnings acknowledged by name (docs/commands.md lists them)",
        ),
        "metrics": Field(Nullable(METRICS), doc="the agent's own state as Prometheus metrics"),
    }
)


def collector_section(cls: Any) -> Section:
    """The mapping a collector of this class takes: its own options plus `type` and `counter`."""
    return Section(
        {
            "type": Field(Str(), required=True, doc="collector kind"),
            "counter": Field(
                Bool(), default=False, doc="the reading is a running total: bill its increase"
            ),
            "timeout": Field(
                Duration(1, 3600),
                doc=f"total deadline of a read (default {DEFAULT_TIMEOUT} s, at most the interval)",
            ),
            **cls.options,
        }
    )


# DER of the two OIDs an RSA SubjectPublicKeyInfo names: rsaEncryption and RSASSA-PSS.
_RSA_OIDS = (bytes.fromhex("06092a864886f70d010101"), bytes.fromhex("06092a864886f70d01010a"))


def public_key_problem(path: Path) -> str | None:
    """Why `path` is not an RSA public key PEM (None: it is), without `cryptography`: the config
    loads in the daemon, which stays small; the child that verifies parses the key in full.

    Why at load: a missing or wrong key file would otherwise surface only at the first start
    on the buyer's machine, as a refusal to run."""
    import base64
    import binascii

    fix = "use the PEM public key of the listing's public_key_version (-----BEGIN PUBLIC KEY-----)"
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return f"{path}: no such file; {fix}"
    except IsADirectoryError:
        return f"{path}: is a directory; {fix}"
    except PermissionError:
        return f"{path}: permission denied; make it readable by the agent's user"
    except (UnicodeDecodeError, OSError) as e:
        return f"{path}: cannot read a PEM text ({e}); {fix}"
    for kind in ("PUBLIC KEY", "RSA PUBLIC KEY"):
        begin, end = f"-----BEGIN {kind}-----", f"-----END {kind}-----"
        if begin in text and end in text.split(begin, 1)[1]:
            body = text.split(begin, 1)[1].split(end, 1)[0]
            try:
                der = base64.b64decode("".join(body.split()), validate=True)
            except (binascii.Error, ValueError):
                return f"{path}: the PEM body is not base64; {fix}"
            if kind == "RSA PUBLIC KEY" or any(oid in der[:32] for oid in _RSA_OIDS):
                return None
            return f"{path}: a public key, but not an RSA one; {fix}"
    if "PRIVATE KEY" in text:
        return f"{path}: holds a private key; {fix}"
    if "CERTIFICATE" in text:
        return f"{path}: holds a certificate, not a public key; {fix}"
    return f"{path}: not a PEM public key; {fix}"
