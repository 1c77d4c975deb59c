"""YAML config -> frozen dataclasses (`model.py`). Every error names its key:
`dimensions[2].collector.pattern`.

The field tables (`tables.py`) are the single definition of the format: the loader validates with
them and `metering-agent schema` prints them as JSON Schema.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from agent.collectors import Registry
from agent.collectors.base import Sources
from agent.config.model import (
    DEFAULT_PATH,
    DEFAULT_TIMEOUT,
    ENV_CONFIG,
    LEVEL_ONLY,
    CollectorConfig,
    Config,
    Dimension,
    Hook,
    MeteringConfig,
    Metrics,
    Notifications,
    RegisterUsage,
    Registration,
    Saas,
)
from agent.config.tables import (
    METERING,
    SAAS,
    SAMPLING,
    TOP,
    check_redirect,  # the fields the fulfillment handler fills in
    collector_section,
    public_key_problem,
)
from agent.errors import ConfigError
from agent.fields import ScalarFloat, collect, describe, raise_all
from agent.host import ownership
from agent.warnings import LOOPBACK_ENDPOINT, ROUNDING_UP, Kind


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


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    """A float that keeps its own text: decimal keys (`scale`) read the digits as written."""
    value = loader.construct_yaml_float(node)
    return ScalarFloat(value, str(node.value))


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _TextDumper(yaml.SafeDumper):
    """SafeDumper that writes a ScalarFloat as the text it was read from."""


_TextDumper.add_representer(
    ScalarFloat,
    lambda dumper, data: dumper.represent_scalar("tag:yaml.org,2002:float", data.text),
)


def dump_yaml(data: Any) -> str:
    """YAML text of `data` as `read_yaml` gave it: numbers keep the digits they were written with
    (`trial` writes the seller's config with its overrides this way)."""
    return yaml.dump(data, Dumper=_TextDumper, sort_keys=False)


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
        accepted_warnings=frozenset(top["warnings"]["accept"]) if top["warnings"] else frozenset(),
        metrics=None if top["metrics"] is None else Metrics(Path(top["metrics"]["textfile"])),
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
    reg, note = section["registration"], section["notifications"]
    if reg:
        try:
            check_redirect(reg["redirect"])
        except ConfigError as e:
            errors.append(e)
    return Saas(
        customer_label=section["customer_label"],
        idle_zero=section["idle_zero"],
        registration=Registration(
            reg["listen"], reg["redirect"], reg["max_connections"], reg["trusted_proxy"]
        )
        if reg
        else None,
        notifications=Notifications(note["queue_url"]) if note else None,
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


def traps(cfg: Config) -> list[tuple[Kind, str]]:
    """Valid settings that bill what a seller rarely means; `check`, `trial` and `prepare-image`
    print them as warnings (each of its kind, which `warnings.accept` can acknowledge).

    Why: a config can be valid and still wrong for the image it is baked into: an emulator endpoint
    left in bills nothing, and `up` rounding below the billed step bills a whole step for a crumb.
    """
    from agent.aggregate import exact, to_quantity

    found = []
    problem = loopback_endpoint(cfg)
    if problem:
        found.append((LOOPBACK_ENDPOINT, problem))
    for dim in cfg.dimensions:
        step = Decimal(1).scaleb(-(dim.decimals or 0))
        if dim.rounding != "up" or dim.scale >= step:
            continue
        billed = to_quantity(Decimal(3), dim.scale, "up", dim.decimals).text
        unit = "a whole unit" if dim.decimals is None else f"a whole {step}"
        fix = "add decimals" if dim.decimals is None else "raise decimals"
        found.append(
            (
                ROUNDING_UP,
                f"{dim.path}.rounding ({dim.name}): up with scale {exact(dim.scale)} and "
                f"{'no decimals' if dim.decimals is None else f'decimals {dim.decimals}'} bills "
                f"{unit} for any usage in an hour: 3 counted bill {billed} "
                f"(3 x {exact(dim.scale)} = {exact(Decimal(3) * dim.scale)}); {fix}, use "
                "rounding: nearest, "
                f"or add {ROUNDING_UP.name} to warnings.accept if it is meant",
            )
        )
    return found


def loopback_endpoint(cfg: Config) -> str | None:
    """What is wrong with a `metering.endpoint_url` on this machine (None: it is not): `check`
    warns of it, `prepare-image` refuses it."""
    from agent.host.locks import is_loopback

    if not is_loopback(cfg.metering.endpoint_url):
        return None
    return (
        f"metering.endpoint_url: {cfg.metering.endpoint_url} is on this machine (the "
        "emulator?): an image baked with it bills nothing; remove it before baking"
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


RUNNING_CONFIG = "config.running.yaml"  # the config the daemon runs, for its sender children


def snapshot_config(source: Path, state_dir: Path) -> tuple[Config, Path]:
    """Copy the config file into state_dir and load the copy; `keep_snapshot` then makes it the
    one the sender children read. So a child sends with exactly the config the daemon runs, not
    whatever the file says since (an edit not yet reloaded, or one a reload refused)."""
    tmp = state_dir / (RUNNING_CONFIG + ".new")
    shutil.copyfile(source, tmp)
    try:
        return dataclasses.replace(load(tmp), source=source), tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_snapshot(state_dir: Path, tmp: Path) -> None:
    os.replace(tmp, state_dir / RUNNING_CONFIG)
    ownership.adopt(state_dir, state_dir / RUNNING_CONFIG)
