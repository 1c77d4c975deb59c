"""The config as every layer reads it: frozen dataclasses and the format's constants.

No I/O and no imports of the agent's own: the loader (`loader.py`) builds these from the YAML, and
everything below the commands takes them as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

# What a collector yields, as agent.collectors.base.Kind (the same two words; the config does not
# import the collectors, which sit above it for the loader only).
Kind = Literal["level", "increment"]

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
    max_connections: int = 500  # open connections at most (fulfillment/server.py)
    trusted_proxy: str | None = None  # the proxy's address: its X-Forwarded-For names the client


@dataclass(frozen=True)
class Notifications:
    queue_url: str  # the SQS queue subscribed to the product's Marketplace SNS topic


@dataclass(frozen=True)
class Saas:
    customer_label: str  # the label that names the customer in every dimension
    idle_zero: bool  # each hour, send 0 for every known customer without usage
    registration: Registration | None
    notifications: Notifications | None = None  # subscription notifications (SQS)


@dataclass(frozen=True)
class Metrics:
    """`metrics:`: the agent's own state for monitoring (agent/daemon/metrics.py)."""

    textfile: Path  # node_exporter's textfile collector reads it (a *.prom file)


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
    platform: str = "auto"  # auto | ec2 | ecs | eks (agent/host/platform.py)
    register_usage: RegisterUsage | None = None
    mode: str = "instance"  # instance (MeterUsage) | saas (BatchMeterUsage, customers)
    saas: Saas | None = None  # set exactly when mode is saas
    accepted_warnings: frozenset[str] = frozenset()  # warnings.accept: names (agent.warnings)
    metrics: Metrics | None = None  # None: no metrics file

    @property
    def customer_label(self) -> str | None:
        """The label that names a record's customer in every dimension's usage (SaaS mode's
        `saas.customer_label`): the sampler keeps it; None where records have no customer."""
        return None if self.saas is None else self.saas.customer_label


def bills_alike(a: Dimension | None, b: Dimension) -> bool:
    """Same name, collector, aggregate, scale, rounding, decimals and interval (its place in the
    file aside): samples of one can be continued under the other. (Asked at each read: the same
    object, as it is unless a reload replaced the config, is answered without copying.)"""
    if a is b:
        return True
    return a is not None and dataclasses.replace(a, path="") == dataclasses.replace(b, path="")


def changed_dimensions(old: Config, new: Config) -> list[Dimension]:
    """The old config's dimensions that the new one drops or bills differently: their open hour
    cannot be continued."""
    now = {d.name: d for d in new.dimensions}
    return [d for d in old.dimensions if not bills_alike(now.get(d.name), d)]
