"""YAML config -> frozen dataclasses. Every error names its key: `dimensions[2].collector.pattern`.

The field tables below are the single definition of the format: the loader validates with them and
`metering-agent schema` prints them as JSON Schema.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from agent.collectors import Registry
from agent.collectors.base import Kind, Sources
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
    collect,
    describe,
    raise_all,
)

DEFAULT_PATH = "/etc/metering-agent/config.yaml"
DEFAULT_STATE_DIR = "/var/lib/metering-agent"
ENV_CONFIG = "METERING_AGENT_CONFIG"
# Chosen from benchmarks/fleet.py: the whole hour keeps a 10,000-instance fleet (8.3 calls/s of the
# account's 10) mostly unthrottled; see docs/billing.md, "Choosing the send window".
DEFAULT_SEND_WINDOW = 3600
DEFAULT_TIMEOUT = 10  # seconds a collector read may take, unless the interval is shorter

AGGREGATES = ("max", "min", "avg", "sum", "last", "integral")
LEVEL_ONLY = ("avg", "integral")
PRODUCT_CODE = r"[-a-zA-Z0-9/=:_.@]{1,255}"
REGION = r"auto|[a-z]{2}(-[a-z]+)+-\d+"
# MeterUsage's tag keys and values: letters, digits, space and + - = . _ : / @ (SPEC).
TAG_CHAR = r"[a-zA-Z0-9+ =._:/@-]"
MAX_TAGS = 5


@dataclass(frozen=True)
class CollectorConfig:
    type: str
    options: Mapping[str, Any]
    counter: bool
    kind: Kind  # what the dimension receives after counter differencing
    cumulative: bool  # readings are running totals (counter: true, or a byte counter)


@dataclass(frozen=True)
class Dimension:
    name: str
    collector: CollectorConfig
    aggregate: str
    scale: Decimal
    rounding: str
    decimals: int | None
    interval: int
    path: str  # where it sits in the file, for messages: dimensions[1]
    allocations: Mapping[str, str] | None = None  # tag key (what the buyer sees) -> label
    max_label_sets: int = 2500  # label sets kept apart per hour; further ones count under ()


@dataclass(frozen=True)
class MeteringConfig:
    region: str
    endpoint_url: str | None
    send_window: int
    startup_check: bool
    on_check_failure: str | None = None  # exit | continue; None: exit on ecs/eks, else continue


@dataclass(frozen=True)
class RegisterUsage:
    """`register_usage:`: RegisterUsage at start (hourly-priced container products)."""

    public_key_version: int
    public_key: str | None = None  # PEM file: verify the signed answer with it


@dataclass(frozen=True)
class Hook:
    command: tuple[str, ...]
    after: int
    timeout: int


@dataclass(frozen=True)
class Registration:
    listen: str  # host:port the fulfillment handler serves on
    redirect: str  # where a registered buyer goes: {customer_aws_account_id}, {license_arn}, ...


@dataclass(frozen=True)
class Saas:
    customer_label: str  # the label that names the customer in every dimension
    idle_zero: bool  # each hour, send 0 for every known customer without usage
    registration: Registration | None


@dataclass(frozen=True)
class Config:
    product_code: str
    state_dir: Path
    metering: MeteringConfig
    interval: int
    dimensions: tuple[Dimension, ...]
    on_metering_failure: Hook | None
    on_recovery: Hook | None
    source: Path
    version: int = 1
    platform: str = "auto"  # auto | ec2 | ecs | eks (agent/platform.py)
    register_usage: RegisterUsage | None = None
    mode: str = "instance"  # instance (MeterUsage) | saas (BatchMeterUsage, customers)
    saas: Saas | None = None  # set exactly when mode is saas


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
                    }
                )
            ),
            doc="optional: serve the fulfillment URL (the buyer's registration POST)",
        ),
    }
)

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
    }
)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:  # `{{a: b}}` or `? [a, b]`: a mapping or list as a key
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{describe(key)} as a key; a key must be a plain word",
                key_node.start_mark,
            ) from None
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {describe(key)}", mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def resolve_path(cli_path: str | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(cli_path or env.get(ENV_CONFIG) or DEFAULT_PATH)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(path), f"config file not found (pass -c PATH or set {ENV_CONFIG})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(str(path), "is a directory; expected a YAML file") from None
    except PermissionError:
        raise ConfigError(str(path), "permission denied; run as a user that can read it") from None
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(where, f"YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"YAML error: {e}") from None
    except RecursionError:
        raise ConfigError(
            str(path), "nested too deeply for a config (thousands of levels); check the file"
        ) from None


def load(path: Path, registry: Registry | None = None) -> Config:
    """Read and validate a config file; raises ConfigError naming the offending key."""
    data = read_yaml(path)
    if data is None:
        raise ConfigError(str(path), "the file is empty; see config.example.yaml")
    if not isinstance(data, Mapping):
        raise ConfigError(str(path), f"expected a mapping at the top; found {describe(data)}")
    return parse(data, path, registry or Registry())


def parse(data: Mapping[str, Any], source: Path, registry: Registry) -> Config:
    errors: list[ConfigError] = []
    top = collect(errors, TOP.parse, data, "")
    if top is None:  # still judge every collector, so one pass shows every mistake
        raw_dims = data.get("dimensions")
        for i, raw in enumerate(raw_dims if isinstance(raw_dims, list) else []):
            if isinstance(raw, Mapping) and "collector" in raw:
                collect(
                    errors, _collector, raw["collector"], f"dimensions[{i}].collector", registry
                )
        raise_all(errors, f"{source}")
    metering = METERING.parse({}, "metering") if top["metering"] is None else top["metering"]
    sampling = SAMPLING.parse({}, "sampling") if top["sampling"] is None else top["sampling"]
    dimensions = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(top["dimensions"]):
        path = f"dimensions[{i}]"
        name = raw["name"]
        if name in seen:
            errors.append(ConfigError(f"{path}.name", f'"{name}" is already used by {seen[name]}'))
        seen[name] = path
        collector = collect(errors, _collector, raw["collector"], f"{path}.collector", registry)
        if collector is not None:
            dim = collect(errors, _dimension, raw, collector, path, sampling["interval"])
            dimensions.append(dim)
            if dim is not None and dim.allocations:
                collect(errors, _producible, dim, registry)
    register = collect(errors, _register_usage, top["register_usage"])
    saas = _saas(top, errors)
    if saas is not None:
        for dim in dimensions:
            if dim is not None:
                collect(errors, _names_customers, dim, saas.customer_label, registry)
    raise_all(errors, f"{source}")
    hook = top["on_metering_failure"]
    recovery = top["on_recovery"]
    return Config(
        version=top["version"],
        product_code=top["product_code"],
        state_dir=Path(top["state_dir"]),
        metering=MeteringConfig(**metering),
        interval=sampling["interval"],
        dimensions=tuple(dimensions),
        on_metering_failure=Hook(tuple(hook["command"]), hook["after"], hook["timeout"])
        if hook
        else None,
        on_recovery=Hook(tuple(recovery["command"]), 0, recovery["timeout"]) if recovery else None,
        source=source,
        platform=top["platform"],
        register_usage=register,
        mode=top["mode"],
        saas=saas,
    )


def _saas(top: Mapping[str, Any], errors: list[ConfigError]) -> Saas | None:
    """The `saas:` section, defaults filled in, exactly when `mode: saas`."""
    raw = top["saas"]
    if top["mode"] != "saas":
        if raw is not None:
            errors.append(
                ConfigError(
                    "saas", "is only read with mode: saas; set mode: saas or remove the section"
                )
            )
        return None
    section = SAAS.parse({}, "saas") if raw is None else raw
    reg = section["registration"]
    if reg:
        from agent.fulfillment import check_redirect  # the fields the handler fills in

        try:
            check_redirect(reg["redirect"])
        except ConfigError as e:
            errors.append(e)
    return Saas(
        customer_label=section["customer_label"],
        idle_zero=section["idle_zero"],
        registration=Registration(reg["listen"], reg["redirect"]) if reg else None,
    )


def _register_usage(raw: Mapping[str, Any] | None) -> RegisterUsage | None:
    if raw is None:
        return None
    key = raw["public_key"]
    if key is not None:
        problem = public_key_problem(Path(key))
        if problem:
            raise ConfigError("register_usage.public_key", problem)
    return RegisterUsage(public_key_version=raw["public_key_version"], public_key=key)


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


def traps(cfg: Config) -> list[str]:
    """Valid settings that bill what a seller rarely means; `check` prints them as warnings.

    Why: a config can be valid and still wrong for the image it is baked into: an emulator endpoint
    left in bills nothing, and `up` rounding below the billed step bills a whole step for a crumb.
    """
    from agent.aggregate import to_quantity
    from agent.host.locks import is_loopback

    found = []
    if is_loopback(cfg.metering.endpoint_url):
        found.append(
            f"metering.endpoint_url: {cfg.metering.endpoint_url} is on this machine (the "
            "emulator?): an image baked with it bills nothing; remove it before baking"
        )
    for dim in cfg.dimensions:
        step = Decimal(1).scaleb(-(dim.decimals or 0))
        if dim.rounding != "up" or dim.scale >= step:
            continue
        billed = to_quantity(Decimal(3), dim.scale, "up", dim.decimals).text
        unit = "a whole unit" if dim.decimals is None else f"a whole {step}"
        fix = "add decimals" if dim.decimals is None else "raise decimals"
        found.append(
            f"{dim.path}.rounding ({dim.name}): up with scale {dim.scale} and "
            f"{'no decimals' if dim.decimals is None else f'decimals {dim.decimals}'} bills "
            f"{unit} for any usage in an hour: 3 counted bill {billed} "
            f"(3 x {dim.scale} = {Decimal(3) * dim.scale}); {fix} or use rounding: nearest"
        )
    return found


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


def _collector(raw: Any, path: str, registry: Registry) -> CollectorConfig:
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"expected a mapping with a `type`; found {describe(raw)}")
    if "type" not in raw:
        known = ", ".join(registry.names())
        raise ConfigError(f"{path}.type", f"required key is missing (known: {known})")
    if not isinstance(raw["type"], str):
        raise ConfigError(f"{path}.type", f"expected a string; found {describe(raw['type'])}")
    cls = registry.get(raw["type"], f"{path}.type")
    values = collector_section(cls).parse(raw, path)
    counter = values.pop("counter")
    values.pop("type")
    cls.validate(values, path)
    kind = cls.kind(values)
    if counter and kind == "increment":
        raise ConfigError(
            f"{path}.counter", f'"{raw["type"]}" already yields increments; remove counter: true'
        )
    cumulative = counter or cls.cumulative(values)
    return CollectorConfig(
        type=raw["type"],
        options=values,
        counter=counter,
        kind="increment" if counter else kind,
        cumulative=cumulative,
    )


def _dimension(
    raw: dict[str, Any], collector: CollectorConfig, path: str, interval: int
) -> Dimension:
    aggregate = raw["aggregate"] or ("sum" if collector.kind == "increment" else "max")
    if collector.kind == "increment" and aggregate in LEVEL_ONLY:
        raise ConfigError(
            f"{path}.aggregate",
            f"{aggregate} needs levels, but this collector yields increments; use sum",
        )
    interval = raw["interval"] or interval
    return Dimension(
        name=raw["name"],
        collector=_with_timeout(collector, interval, path),
        aggregate=aggregate,
        scale=raw["scale"],
        rounding=raw["rounding"],
        decimals=raw["decimals"],
        interval=interval,
        path=path,
        allocations=raw["allocations"]["tags"] if raw["allocations"] else None,
        max_label_sets=raw["max_label_sets"],
    )


def _producible(dim: Dimension, registry: Registry) -> None:
    """Every label an allocation tag maps must be one the collector can produce (`labels()`;
    None: it cannot tell, e.g. Prometheus series or a plugin). Why at load: a tag that can never
    get a value would silently bill everything untagged."""
    assert dim.allocations is not None
    cls = registry.get(dim.collector.type, f"{dim.path}.collector.type")
    try:
        known = cls(dim.collector.options, Sources()).labels()
    except Exception:  # a plugin that cannot be built is reported by sampling.build_collector
        return
    if known is None:
        return
    errors = []
    have = ", ".join(sorted(known)) or "none"
    for key, label in dim.allocations.items():
        if label not in known:
            errors.append(
                ConfigError(
                    f"{dim.path}.allocations.tags.{key}",
                    f'label "{label}" is not one this {dim.collector.type} collector produces '
                    f"(it produces: {have}); a log pattern names it as a group (?P<{label}>...)",
                )
            )
    raise_all(errors)


def _names_customers(dim: Dimension, label: str, registry: Registry) -> None:
    """SaaS mode: every dimension must be able to carry the customer label (`labels()`; None:
    it cannot tell). Why at load: usage that never names a customer is never billed."""
    cls = registry.get(dim.collector.type, f"{dim.path}.collector.type")
    try:
        known = cls(dim.collector.options, Sources()).labels()
    except Exception:  # a plugin that cannot be built is reported by sampling.build_collector
        return
    if known is not None and label not in known:
        have = ", ".join(sorted(known)) or "none"
        raise ConfigError(
            f"{dim.path}.collector",
            f'cannot name the customer: saas.customer_label "{label}" is not a label this '
            f"{dim.collector.type} collector produces (it produces: {have}); in SaaS mode every "
            f"dimension needs it, e.g. a log pattern group (?P<{label}>...)",
        )


def _with_timeout(collector: CollectorConfig, interval: int, path: str) -> CollectorConfig:
    """Every read has a total deadline: `timeout`, default 10 s, never longer than the interval
    (a read still running at the next instant would make the rounds pile up)."""
    timeout = collector.options.get("timeout")
    if timeout is not None and timeout > interval:
        raise ConfigError(
            f"{path}.collector.timeout",
            f"{timeout}s is longer than the dimension's sampling interval ({interval}s); "
            f"use at most {interval}s",
        )
    resolved = timeout if timeout is not None else min(DEFAULT_TIMEOUT, interval)
    return replace(collector, options={**collector.options, "timeout": resolved})


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The config format as JSON Schema (draft 2020-12), from the tables the loader uses."""
    registry = registry or Registry()
    schema = TOP.schema()
    variants = []
    for name in registry.names():
        try:
            cls = registry.get(name, "collector.type")
        except ConfigError:
            continue  # a broken plugin is reported by check, not by schema
        s = collector_section(cls).schema()
        s["properties"]["type"] = {"const": name}
        variants.append(s)
    dim = schema["properties"]["dimensions"]["items"]
    dim["properties"]["collector"] = {"oneOf": variants}
    schema.update(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://github.com/metering-agent/metering-agent/config.schema.json",
            "title": "metering-agent config",
        }
    )
    return schema
