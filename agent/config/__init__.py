"""The seller's YAML. `model` holds the frozen dataclasses every layer reads, `tables` the field
tables (the format, and its JSON Schema), `loader` YAML -> model with every error naming its key.

This module is the front door for callers outside the agent (tests, benchmarks, a seller's
script): `from agent import config; config.load(path)`. Code inside `agent/` imports the module
that defines a name, so that what the config model needs stays at the bottom of the imports.
"""

from agent.config.loader import (
    json_schema,
    load,
    parse,
    public_key_problem,
    read_yaml,
    resolve_path,
    traps,
)
from agent.config.model import (
    AGGREGATES,
    DEFAULT_PATH,
    DEFAULT_SEND_WINDOW,
    DEFAULT_STATE_DIR,
    DEFAULT_TIMEOUT,
    ENV_CONFIG,
    LEVEL_ONLY,
    MAX_TAGS,
    PRODUCT_CODE,
    REGION,
    TAG_CHAR,
    CollectorConfig,
    Config,
    Dimension,
    Hook,
    Kind,
    MeteringConfig,
    Notifications,
    RegisterUsage,
    Registration,
    Saas,
)
from agent.config.tables import (
    DIMENSION_FIELDS,
    INTERVAL,
    METERING,
    REGISTER_USAGE,
    SAAS,
    SAMPLING,
    TOP,
    collector_section,
)
from agent.errors import ConfigError

__all__ = [
    "AGGREGATES",
    "DEFAULT_PATH",
    "DEFAULT_SEND_WINDOW",
    "DEFAULT_STATE_DIR",
    "DEFAULT_TIMEOUT",
    "DIMENSION_FIELDS",
    "ENV_CONFIG",
    "INTERVAL",
    "LEVEL_ONLY",
    "MAX_TAGS",
    "METERING",
    "PRODUCT_CODE",
    "REGION",
    "REGISTER_USAGE",
    "SAAS",
    "SAMPLING",
    "TAG_CHAR",
    "TOP",
    "CollectorConfig",
    "Config",
    "ConfigError",
    "Dimension",
    "Hook",
    "Kind",
    "MeteringConfig",
    "Notifications",
    "RegisterUsage",
    "Registration",
    "Saas",
    "collector_section",
    "json_schema",
    "load",
    "parse",
    "public_key_problem",
    "read_yaml",
    "resolve_path",
    "traps",
]
