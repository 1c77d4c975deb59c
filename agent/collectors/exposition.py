"""The Prometheus text exposition format and OpenMetrics, read strictly enough to bill from.

Both formats share the sample line `name{label="value",...} value [timestamp]`; OpenMetrics adds
float timestamps in seconds, exemplars (`... # {trace_id="x"} 1.0 1700000000.5`), `# UNIT` and the
closing `# EOF`, and names a counter's family without its `_total` suffix. Label values are
unescaped exactly as the format says (`\\\\` -> `\\`, `\\"` -> `"`, `\\n` -> newline; any other
backslash is kept, as prometheus_client's own parser does), so `C:\\\\new` stays `C:\\new`.

A line that is not a comment and cannot be parsed raises `ExpositionError` naming the line: a
reading taken from a body we only half understood could bill the wrong amount, so the whole
reading fails and `status` counts it.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
# A term inside braces: `label="value"`, `"quoted.label"="value"`, or a quoted metric name alone.
_TERM = rf"(?:(?:{_LABEL_NAME}|{_QUOTED})[ \t]*=[ \t]*{_QUOTED}|{_QUOTED})"
_LABELS = rf"\{{[ \t]*(?:{_TERM}[ \t]*(?:,[ \t]*{_TERM}[ \t]*)*,?[ \t]*)?\}}"
_FLOAT = r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[Ii]nf(?:inity)?|NaN|nan)"
_SAMPLE = re.compile(
    rf"(?P<name>{_NAME})?[ \t]*(?P<labels>{_LABELS})?[ \t]+(?P<value>{_FLOAT})"
    rf"(?:[ \t]+(?P<ts>{_FLOAT}))?"
    rf"(?:[ \t]+#[ \t]+(?P<exemplar>{_LABELS})[ \t]+{_FLOAT}(?:[ \t]+{_FLOAT})?)?[ \t]*"
)
_TERM_PARTS = re.compile(
    rf"[ \t]*(?:(?P<key>{_LABEL_NAME}|{_QUOTED})[ \t]*=[ \t]*(?P<value>{_QUOTED})"
    rf"|(?P<name>{_QUOTED}))[ \t]*,?"
)
_ESCAPE = re.compile(r'\\[\\n"]')
_ESCAPES = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}
_METADATA = re.compile(
    rf"#[ \t]+(?P<kind>HELP|TYPE|UNIT)[ \t]+(?P<name>{_NAME}|{_QUOTED})(?:[ \t]|$)"
)


class ExpositionError(ValueError):
    """A line of the body that is neither a comment nor a valid sample."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: str  # as written; the caller converts the values it uses


@dataclass
class Exposition:
    samples: list[Sample] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)  # family (as declared) -> type
    eof: bool = False  # the body ended with OpenMetrics' `# EOF`


def unescape(text: str) -> str:
    """Decode a label value's escapes as the exposition format defines them."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], text)


def _unquote(text: str) -> str:
    if not text.startswith('"'):
        return text
    return unescape(text[1:-1]) if "\\" in text else text[1:-1]


def parse(text: str, names: Collection[str] | None = None) -> Exposition:
    """The samples (of the metrics in `names`, default all) and every `# TYPE` of a classic or
    OpenMetrics body. Every line is checked: ExpositionError on the first bad one."""
    out = Exposition()
    eof = False
    # Lines end at "\n" only: str.splitlines() would also split inside a label value at \x1e,
    # \x85 or U+2028, which the format allows unescaped.
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t\r")
        if eof:
            if line:
                raise ExpositionError(f"line {number}: text after # EOF: {_show(raw)}")
            continue
        if not line:
            continue
        if line.startswith("#"):
            if line == "# EOF":
                eof = out.eof = True
                continue
            meta = _METADATA.match(line)
            if meta and meta.group("kind") == "TYPE":
                kind = line[meta.end() :].strip()
                if not kind:
                    raise ExpositionError(f"line {number}: TYPE without a type: {_show(raw)}")
                out.types[_unquote(meta.group("name"))] = kind
            continue  # HELP, UNIT and free comments carry nothing we bill from
        m = _SAMPLE.fullmatch(line)
        if m is None:
            raise ExpositionError(f"line {number}: not a valid sample: {_show(raw)}")
        name = m.group("name")
        if names is None or name is None or name in names:
            sample = _sample(m, name, number, raw)
            if names is None or sample.name in names:
                out.samples.append(sample)
    return out


def _sample(m: re.Match[str], name: str | None, number: int, raw: str) -> Sample:
    labels: dict[str, str] = {}
    body = (m.group("labels") or "{}")[1:-1]
    for term in _TERM_PARTS.finditer(body):
        if term.group("name") is not None:
            if name is not None:
                raise ExpositionError(f"line {number}: metric name given twice: {_show(raw)}")
            name = _unquote(term.group("name"))
            continue
        key = _unquote(term.group("key"))
        if key in labels:
            raise ExpositionError(f"line {number}: label {key} given twice: {_show(raw)}")
        labels[key] = _unquote(term.group("value"))
    if "__name__" in labels:
        if name is not None:
            raise ExpositionError(f"line {number}: metric name given twice: {_show(raw)}")
        name = labels.pop("__name__")
    if not name:
        raise ExpositionError(f"line {number}: sample without a metric name: {_show(raw)}")
    return Sample(name, labels, m.group("value"))


def _show(line: str) -> str:
    return repr(line if len(line) <= 120 else line[:117] + "...")
