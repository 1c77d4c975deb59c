"""Declarative config fields: each one validates a YAML value and describes itself as JSON Schema.

The loader (`config/loader.py`), the collectors' option tables and the `schema` command all use
these, so what the loader accepts and what the schema documents cannot drift apart.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from agent.errors import ConfigError

_DURATION = re.compile(r"^\s*([0-9]+)\s*(s|m|h)?\s*$")  # [0-9]: ECMA-262's \d
# A number written as a string; the same text is the JSON Schema's pattern (ECMA-262 reads it
# alike). Positive: a non-zero digit before any exponent.
_MANTISSA = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*"
_NUMBER_TEXT = r"\s*[+-]?" + _MANTISSA
_UNSIGNED_TEXT = r"\s*\+?" + _MANTISSA
_POSITIVE_TEXT = r"\s*\+?(?=[^eE]*[1-9])" + _MANTISSA
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600}


class ScalarFloat(float):
    """A YAML float that keeps the text it was written as (the loader makes these), so that a
    decimal key reads `0.000000000931322574615478515625` as those digits, never through a binary
    float. Anywhere else it is the float YAML says it is."""

    text: str

    def __new__(cls, value: float, text: str) -> ScalarFloat:
        made = super().__new__(cls, value)
        made.text = text
        return made

    def __reduce__(self) -> tuple[Any, tuple[float, str]]:  # copy and pickle keep the text
        return (ScalarFloat, (float(self), self.text))


def _written(value: int | float) -> str:
    """A number's text as the config wrote it, where the loader kept it (ScalarFloat)."""
    text = getattr(value, "text", None)
    if isinstance(text, str):
        plain = text.replace("_", "")  # YAML 1.1 allows 1_000.5
        if re.fullmatch(_NUMBER_TEXT, plain):
            return plain
    return str(value)


def describe(value: Any) -> str:
    """A value as the user wrote it, for error messages."""
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def suggest(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
    return f'; did you mean "{close[0]}"?' if close else ""


def collect(errors: list[ConfigError], parse: Callable[..., Any], *args: Any) -> Any:
    """`parse(*args)`, keeping its ConfigErrors in `errors` (None then) instead of stopping at the
    first: the loader reports every mistake at once."""
    try:
        return parse(*args)
    except ConfigError as e:
        errors.extend(e.errors)
        return None


def raise_all(errors: list[ConfigError], where: str = "") -> None:
    if errors:
        raise ConfigError.of(errors, where)


class Spec:
    """A validator for one value."""

    def parse(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Spec):
    pattern: str | None = None
    min_len: int = 1
    max_len: int = 4096
    hint: str = ""

    def parse(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string; found {describe(value)}")
        if not self.min_len <= len(value) <= self.max_len:
            raise ConfigError(
                path, f"expected {self.min_len} to {self.max_len} characters; found {len(value)}"
            )
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ConfigError(path, f"{describe(value)} is not valid: {self.hint or self.pattern}")
        return value

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": self.min_len, "maxLength": self.max_len}
        if self.pattern:
            s["pattern"] = f"^(?:{self.pattern})$"
        return s


@dataclass(frozen=True)
class Int(Spec):
    minimum: int | None = None
    maximum: int | None = None

    def parse(self, value: Any, path: str) -> int:
        value = _whole(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected a whole number; found {describe(value)}")
        _check_range(value, self.minimum, self.maximum, path)
        return value

    def schema(self) -> dict[str, Any]:
        return _range_schema({"type": "integer"}, self.minimum, self.maximum)


@dataclass(frozen=True)
class Number(Spec):
    """A decimal number: as written in the YAML text (quoted or not; see ScalarFloat), else a
    float's shortest repr, never binary noise."""

    minimum: Decimal | None = None
    exclusive_minimum: bool = False

    def parse(self, value: Any, path: str) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(path, f"expected a number; found {describe(value)}")
        if isinstance(value, str) and not re.fullmatch(_NUMBER_TEXT, value):
            raise ConfigError(path, f"expected a number; found {describe(value)}")
        try:
            number = Decimal(value if isinstance(value, str) else _written(value))
        except InvalidOperation:
            raise ConfigError(path, f"expected a number; found {describe(value)}") from None
        if not number.is_finite():
            raise ConfigError(path, f"expected a finite number; found {describe(value)}")
        if self.minimum is not None and (
            number < self.minimum or (self.exclusive_minimum and number == self.minimum)
        ):
            bound = "greater than" if self.exclusive_minimum else "at least"
            raise ConfigError(path, f"expected a number {bound} {self.minimum}; found {value}")
        return number

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "number"}
        text = _NUMBER_TEXT
        if self.minimum is not None:
            key = "exclusiveMinimum" if self.exclusive_minimum else "minimum"
            s[key] = float(self.minimum)
            if self.minimum == 0:  # the string form's bound, where a pattern can say it
                text = _POSITIVE_TEXT if self.exclusive_minimum else _UNSIGNED_TEXT
        # Quoted numbers ("0.001") keep their exact decimal digits through YAML: both forms.
        return {"oneOf": [s, {"type": "string", "pattern": f"^{text}$"}]}


class Bool(Spec):
    def parse(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false; found {describe(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Duration(Spec):
    """Seconds as an integer, or a string such as `90s`, `10m`, `1h`."""

    minimum: int = 0
    maximum: int | None = None
    divides: int | None = None

    def parse(self, value: Any, path: str) -> int:
        seconds: int | None = None
        value = _whole(value)
        if isinstance(value, int) and not isinstance(value, bool):
            seconds = value
        elif isinstance(value, str):
            m = _DURATION.match(value)
            if m:
                seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds is None:
            raise ConfigError(
                path,
                f"expected a duration in seconds or like 90s, 10m, 1h; found {describe(value)}",
            )
        _check_range(seconds, self.minimum, self.maximum, path, unit=" s")
        if self.divides and self.divides % seconds:
            raise ConfigError(
                path, f"must divide {self.divides} s evenly (e.g. 10s, 1m, 5m); found {seconds} s"
            )
        return seconds

    def schema(self) -> dict[str, Any]:
        num = _range_schema({"type": "integer"}, self.minimum, self.maximum)
        text = {"type": "string", "pattern": _DURATION.pattern}
        return {"oneOf": [num, text]}


@dataclass(frozen=True)
class Enum(Spec):
    choices: tuple[str, ...]

    def parse(self, value: Any, path: str) -> str:
        if value not in self.choices:
            known = ", ".join(self.choices)
            hint = suggest(value, list(self.choices)) if isinstance(value, str) else ""
            raise ConfigError(path, f"expected one of {known}; found {describe(value)}{hint}")
        return str(value)

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.choices)}


@dataclass(frozen=True)
class Regex(Spec):
    """A Python regular expression; checked by compiling it."""

    group: str | None = None  # a named group the pattern must define, if any

    def parse(self, value: Any, path: str) -> str:
        text = Str().parse(value, path)
        try:
            compiled = re.compile(text)
        except re.error as e:
            raise ConfigError(path, f"invalid regular expression {describe(text)}: {e}") from None
        if self.group and self.group not in compiled.groupindex:
            raise ConfigError(
                path, f"the pattern needs a named group (?P<{self.group}>...); found none"
            )
        return text

    def schema(self) -> dict[str, Any]:
        return {**Str().schema(), "format": "regex"}


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def parse(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.parse(value, path)

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [self.inner.schema(), {"type": "null"}]}


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    min_items: int = 0

    def parse(self, value: Any, path: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list; found {describe(value)}")
        if len(value) < self.min_items:
            raise ConfigError(path, f"expected at least {self.min_items} item(s); found none")
        errors: list[ConfigError] = []
        items = tuple(
            collect(errors, self.item.parse, v, f"{path}[{i}]") for i, v in enumerate(value)
        )
        raise_all(errors)
        return items

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": self.item.schema(), "minItems": self.min_items}


@dataclass(frozen=True)
class MapOf(Spec):
    """A mapping from string keys to values of one kind (HTTP headers, allocation tags); `key`
    and the entry counts constrain the keys where the format does."""

    value: Spec
    key: Str | None = None
    min_items: int = 0
    max_items: int | None = None

    def parse(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping; found {describe(value)}")
        if len(value) < self.min_items or len(value) > (self.max_items or len(value)):
            raise ConfigError(
                path, f"expected {self.min_items} to {self.max_items} entries; found {len(value)}"
            )
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(path, f"keys must be strings; found {describe(k)}")
            if self.key is not None:
                self.key.parse(k, f"{path}.{k}")
            out[k] = self.value.parse(v, f"{path}.{k}")
        return out

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "object", "additionalProperties": self.value.schema()}
        if self.key is not None:
            s["propertyNames"] = self.key.schema()
        if self.min_items:
            s["minProperties"] = self.min_items
        if self.max_items is not None:
            s["maxProperties"] = self.max_items
        return s


@dataclass(frozen=True)
class Passthrough(Spec):
    """Accepts the value as it is, for a part that a later step validates with its own table."""

    described: Mapping[str, Any]

    def parse(self, value: Any, path: str) -> Any:
        return value

    def schema(self) -> dict[str, Any]:
        return dict(self.described)


@dataclass(frozen=True)
class Field:
    spec: Spec
    required: bool = False
    default: Any = None
    doc: str = ""


@dataclass(frozen=True)
class Section(Spec):
    """A mapping with a fixed set of keys; unknown keys are errors."""

    fields: Mapping[str, Field]
    doc: str = ""
    check: Callable[[dict[str, Any], str], None] | None = None

    def parse(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping; found {describe(value)}")
        known = list(self.fields)
        errors: list[ConfigError] = []
        for key in value:
            if key not in self.fields:
                where = f"{path}.{key}" if path else str(key)
                listing = ", ".join(known)
                hint = suggest(key, known) if isinstance(key, str) else ""
                errors.append(ConfigError(where, f"unknown key (known: {listing}{hint})"))
        out: dict[str, Any] = {}
        for key, field in self.fields.items():
            where = f"{path}.{key}" if path else key
            if key in value:
                out[key] = collect(errors, field.spec.parse, value[key], where)
            elif field.required:
                errors.append(ConfigError(where, "required key is missing"))
            else:
                out[key] = field.default
        raise_all(errors)
        if self.check:
            self.check(out, path)
        return out

    def schema(self) -> dict[str, Any]:
        props = {}
        for key, field in self.fields.items():
            prop = dict(field.spec.schema())
            if field.doc:
                prop["description"] = field.doc
            if field.default is not None and not isinstance(field.default, (Decimal, tuple)):
                prop["default"] = field.default
            props[key] = prop
        s: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
        required = [k for k, f in self.fields.items() if f.required]
        if required:
            s["required"] = required
        if self.doc:
            s["description"] = self.doc
        return s


def _whole(value: Any) -> Any:
    """2.0 is a whole number to JSON Schema (and to a YAML writer), so to the loader too."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_range(value: int, lo: int | None, hi: int | None, path: str, unit: str = "") -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "" if lo is None else str(lo)
        hi_s = "" if hi is None else str(hi)
        raise ConfigError(path, f"expected {lo_s}..{hi_s}{unit}; found {value}{unit}")


def _range_schema(s: dict[str, Any], lo: int | None, hi: int | None) -> dict[str, Any]:
    if lo is not None:
        s["minimum"] = lo
    if hi is not None:
        s["maximum"] = hi
    return s
