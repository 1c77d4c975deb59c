"""HTTP probes: a number from the product's own stats endpoint, or whether it is up.

`format: json` takes a JMESPath `query` (jmespath ships with boto3); `prometheus` a metric name with
optional label matchers (`http_requests_total{code="200"}`), summing the matching series; `text` a
regex whose first group is the number. `mode: up` is 1 for a 2xx answer and 0 otherwise.

A Prometheus reading carries each matching series on its own (`Reading.series`, keyed by its label
set) with its OpenMetrics/prometheus_client `_created` time as the series' epoch, so `counter: true`
differences each series separately. The body may be the classic text format or OpenMetrics
(`exposition.py`); a line that cannot be parsed fails the reading.

Bounded: the body is capped, redirects to another host refused, and `timeout` is a total deadline
for the whole probe (connect, headers, body, redirects): urllib's own timeout is per socket
operation, so a server trickling a byte every 2 s would never time out; at the deadline the
connection's socket is shut down. A failed probe raises CollectorError: that round records no
sample and `status` counts it.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import heapq
import http.client
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Protocol

from agent.collectors import exposition
from agent.collectors.base import (
    MAX_LABEL_SETS,
    Collector,
    CollectorError,
    Kind,
    NotYet,
    Reading,
    Sources,
    fold,
    label_set,
    series_key,
    series_labels,
)
from agent.errors import ConfigError
from agent.fields import Enum, Field, Int, MapOf, Str

_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*$")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _jmespath_call_problem(node: Any) -> str | None:
    """A function call jmespath would refuse only when the query runs (an unknown name, the
    wrong number of arguments), found in the compiled tree: a typo is the config's error (78),
    not a source that does not answer."""
    from jmespath.functions import Functions

    table = Functions().FUNCTION_TABLE
    stack = [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, dict):
            continue
        stack.extend(n.get("children") or ())
        if n.get("type") != "function_expression":
            continue
        name, given = n.get("value"), len(n.get("children") or ())
        if name not in table:
            hint = difflib.get_close_matches(str(name), list(table), n=1)
            known = f"did you mean {hint[0]}()?" if hint else "see jmespath.org for the functions"
            return f"unknown function {name}(); {known}"
        signature = table[name]["signature"]
        variadic = bool(signature) and signature[-1].get("variadic")
        if (given < len(signature)) if variadic else (given != len(signature)):
            want = f"{'at least ' if variadic else ''}{len(signature)}"
            return f"{name}() takes {want} argument(s); the query gives it {given}"
    return None


class HttpCollector(Collector):
    type_name = "http"
    options: ClassVar[Mapping[str, Field]] = {
        "url": Field(Str(r"https?://\S+", hint="expected an http:// or https:// URL"),
                     required=True, doc="the endpoint to probe"),
        "method": Field(Enum(("GET", "POST", "HEAD")), default="GET"),
        "headers": Field(MapOf(Str(min_len=0)), doc="extra request headers"),
        "format": Field(Enum(("json", "prometheus", "text")), default="json"),
        "query": Field(Str(), doc="json: JMESPath; prometheus: metric{label=\"v\"}; text: regex"),
        "label": Field(Str(r"[a-zA-Z_][a-zA-Z0-9_]*", hint="expected a label name"),
                       doc="json: the query gives an object of numbers, keyed by this label"),
        "mode": Field(Enum(("value", "up")), default="value",
                      doc="value: the queried number; up: 1 for a 2xx answer, else 0"),
        "max_bytes": Field(Int(1024, 64 << 20), default=1 << 20, doc="response body cap"),
    }  # fmt: skip

    @classmethod
    def validate(cls, options: dict[str, Any], path: str) -> None:
        if options["mode"] == "up":
            return
        query = options.get("query")
        if not query:
            raise ConfigError(f"{path}.query", f"required for format {options['format']}")
        fmt = options["format"]
        if options.get("label") and fmt != "json":
            raise ConfigError(f"{path}.label", "only format: json takes label")
        if fmt == "json":
            import jmespath
            from jmespath.exceptions import JMESPathError

            try:
                parsed = jmespath.compile(query)
            except JMESPathError as e:
                msg = str(e).splitlines()[0]
                raise ConfigError(f"{path}.query", f"invalid JMESPath: {msg}") from None
            problem = _jmespath_call_problem(parsed.parsed)
            if problem:
                raise ConfigError(f"{path}.query", f"invalid JMESPath: {problem}")
        elif fmt == "prometheus":
            parse_selector(query, f"{path}.query")
        else:
            try:
                compiled = re.compile(query)
            except re.error as e:
                raise ConfigError(f"{path}.query", f"invalid regular expression: {e}") from None
            if compiled.groups < 1:
                raise ConfigError(f"{path}.query", "needs a group (...) around the number")

    @classmethod
    def kind(cls, options: Mapping[str, Any]) -> Kind:
        return "level"

    def __init__(self, options: Mapping[str, Any], sources: Sources) -> None:
        super().__init__(options, sources)
        self.deadline = Deadline(0)  # the probe in progress: one at a time per collector
        self.opener = sources.extra.get("http_opener") or bounded_opener(self)
        self.selector = (
            parse_selector(self.config["query"], "query")
            if self.config["format"] == "prometheus" and self.config["mode"] == "value"
            else None
        )

    def read(self, state: dict[str, Any] | None) -> Reading:
        status, body = self._fetch()
        if self.config["mode"] == "up":
            return Reading(Decimal(1 if 200 <= status < 300 else 0))
        if not 200 <= status < 300:
            raise CollectorError(f"{self.config['url']} answered HTTP {status}")
        fmt = self.config["format"]
        if fmt == "json":
            return self._json(body)
        if fmt == "prometheus":
            assert self.selector is not None
            text = body.decode("utf-8", errors="replace")
            # OpenMetrics ends with `# EOF`: without it the answer was cut short, and series
            # missing from it would look gone (and new when they come back).
            openmetrics = self._content_type.startswith("application/openmetrics-text")
            try:
                return prometheus_reading(
                    text, *self.selector, require_eof=openmetrics, keep=self.keep_label
                )
            except exposition.ExpositionError as e:
                raise CollectorError(f"{self.config['url']}: {e}") from None
        return Reading(self._text(body))

    _content_type = ""

    def _fetch(self) -> tuple[int, bytes]:
        url = self.config["url"]
        req = urllib.request.Request(
            url, method=self.config["method"], headers=self.config.get("headers") or {}
        )
        limit = int(self.config["max_bytes"])
        timeout = float(self.config.get("timeout") or DEFAULT_TIMEOUT)
        deadline = self.deadline = Deadline(timeout)
        try:
            with self.opener.open(req, timeout=deadline.remaining()) as resp:
                body = resp.read(limit + 1)
                status = resp.status
                self._content_type = (resp.headers.get("Content-Type") or "").strip().lower()
        except urllib.error.HTTPError as e:
            if self.config["mode"] == "up":
                return e.code, b""
            raise CollectorError(f"{url} answered HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            if self.config["mode"] == "up":
                return 0, b""
            if deadline.passed():  # shut down by the reaper, or the last per-op timeout
                raise CollectorError(late(url, timeout)) from None
            reason = getattr(e, "reason", e)
            raise CollectorError(f"{url} unreachable: {reason}") from None
        finally:
            deadline.cancel()
        if deadline.expired:  # the socket was shut down mid-answer: the body may be cut short
            if self.config["mode"] == "up":
                return 0, b""
            raise CollectorError(late(url, timeout))
        if len(body) > limit:
            raise CollectorError(f"{url} answered more than {limit} bytes (max_bytes)")
        return status, body

    def labels(self) -> frozenset[str] | None:
        """json with `label`: that label; prometheus: any (the series' own); else none."""
        if self.config["mode"] == "up" or self.config["format"] == "text":
            return frozenset()
        if self.config["format"] == "json":
            label = self.config.get("label")
            return frozenset([label]) if label else frozenset()
        return None

    def _json(self, body: bytes) -> Reading:
        import json

        import jmespath
        from jmespath.exceptions import JMESPathError

        try:
            data = json.loads(body)
        except ValueError as e:
            raise CollectorError(f"{self.config['url']} did not answer JSON: {e}") from None
        what = f"JMESPath {self.config['query']!r}"
        try:
            found = jmespath.search(self.config["query"], data)
        except JMESPathError as e:  # a type the answer holds, e.g. sum() of an object
            raise CollectorError(f"{what} on this answer: {str(e).splitlines()[0]}") from None
        label = self.config.get("label")
        if not label:
            return Reading(number(found, what))
        if not isinstance(found, dict):
            raise CollectorError(f"{what} gave {type(found).__name__}, not an object of numbers")
        breakdown: dict[tuple[tuple[str, str], ...], Decimal] = {}
        for key, value in found.items():
            part = label_set({label: str(key)})
            if part not in breakdown and len(breakdown) >= MAX_LABEL_SETS:
                part = fold(part, self.keep_label)
            breakdown[part] = breakdown.get(part, Decimal(0)) + number(value, f"{what}[{key!r}]")
        # each key is a series: with `counter: true` each is differenced on its own (a key that
        # disappears or resets is not netted against the others)
        series = [({label: str(key)}, number(v, f"{what}[{key!r}]")) for key, v in found.items()]
        return Reading.of_series(series, breakdown=breakdown)

    def _text(self, body: bytes) -> Decimal:
        m = re.search(self.config["query"], body.decode("utf-8", errors="replace"))
        if m is None:
            raise CollectorError(f"pattern {self.config['query']!r} not found in the answer")
        return number(m.group(1), f"pattern {self.config['query']!r}")


DEFAULT_TIMEOUT = 10.0
PROCESS_START = "process_start_time_seconds"  # prometheus_client's and most exporters' own


def late(url: str, timeout: float) -> str:
    return f"{url} gave no complete answer within the {timeout:g} s timeout"


class Deadline:
    """A total deadline for one probe, shared by every connection it opens (redirects too).

    Each connection's socket gets a per-operation timeout no longer than what is left, and is
    handed to the reaper, which shuts it down when the deadline passes: that ends a read which a
    server keeps alive by trickling bytes. `cancel()` at the end of the probe.
    """

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.expired = False
        self.done = False

    def remaining(self) -> float:
        return max(0.001, self.end - time.monotonic())

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self.end - 0.05

    def watch(self, sock: socket.socket) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            self.expire(sock)
            return
        current = sock.gettimeout()
        sock.settimeout(left if current is None else min(current, left))
        _REAPER.add(self, sock)

    def expire(self, sock: socket.socket) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            # The plain socket's shutdown, also under TLS: it wakes a blocked recv with EOF.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self.done = True


class _Reaper:
    """One daemon thread for every probe of the process: shuts down the sockets of probes whose
    deadline passed (a thread per probe would cost more CPU than the probe itself)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline, socket.socket]] = []
        self._count = 0
        self._thread: threading.Thread | None = None

    def add(self, deadline: Deadline, sock: socket.socket) -> None:
        with self._cond:
            self._count += 1
            heapq.heappush(self._heap, (deadline.end, self._count, deadline, sock))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="http deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _end, _n, deadline, sock = heapq.heappop(self._heap)
                    if not deadline.done:
                        deadline.expire(sock)
                self._cond.wait(self._heap[0][0] - now if self._heap else None)


_REAPER = _Reaper()


class Probe(Protocol):
    """What a bounded connection needs of its owner: the deadline of the probe in progress."""

    deadline: Deadline


def bounded_opener(probe: Probe) -> urllib.request.OpenerDirector:
    """An opener whose connections live under `probe.deadline` and follow same-host redirects
    only; the promql collector reads through one too."""
    return urllib.request.build_opener(
        _SameHostRedirects(), _DeadlineHTTPHandler(probe), _DeadlineHTTPSHandler(probe)
    )


class _GuardedHTTP(http.client.HTTPConnection):
    probe: Probe

    def connect(self) -> None:
        super().connect()
        self.probe.deadline.watch(self.sock)


class _GuardedHTTPS(http.client.HTTPSConnection):
    probe: Probe

    def connect(self) -> None:
        super().connect()
        self.probe.deadline.watch(self.sock)


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    """Opens connections that put their socket under the probe's current deadline."""

    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_connection, _GuardedHTTP, self.probe), req)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(
            functools.partial(_connection, _GuardedHTTPS, self.probe),
            req,
            context=self._context,  # type: ignore[attr-defined]
        )


def _connection(
    cls: type[_GuardedHTTP] | type[_GuardedHTTPS], probe: Probe, *args: Any, **kw: Any
) -> http.client.HTTPConnection:
    conn = cls(*args, **kw)
    conn.probe = probe
    return conn


def number(value: Any, what: str) -> Decimal:
    if value is None:
        raise CollectorError(f"{what} matched nothing")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise CollectorError(f"{what} gave {type(value).__name__}, not a number")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise CollectorError(f"{what} gave {str(value)[:40]!r}, not a number") from None
    if not number.is_finite():
        raise CollectorError(f"{what} gave {value!r}, not a finite number")
    return number


Matcher = tuple[str, str, str]  # label, operator, value


def parse_selector(text: str, path: str) -> tuple[str, list[Matcher]]:
    """`name{label="v",other=~"re"}` -> (name, matchers); ConfigError if malformed."""
    m = _METRIC.match(text)
    if not m:
        raise ConfigError(path, f'expected a metric name with optional {{label="value"}}: {text!r}')
    name, body = m.group(1), (m.group(2) or "").strip()
    matchers: list[Matcher] = []
    pos = 0
    while pos < len(body):
        lm = _MATCHER.match(body, pos)
        if not lm:
            raise ConfigError(path, f"cannot parse label matcher at {body[pos:]!r}")
        label, op, value = lm.group(1), lm.group(2), _unescape(lm.group(3))
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as e:
                raise ConfigError(path, f"label {label}: invalid regex: {e}") from None
        matchers.append((label, op, value))
        pos = lm.end()
    return name, matchers


def prometheus_reading(
    text: str,
    name: str,
    matchers: list[Matcher],
    require_eof: bool = False,
    keep: str | None = None,
) -> Reading:
    """The matching series of `name`, each on its own, summed into the reading's value.

    A counter may be named with or without `_total` (OpenMetrics names the family without it,
    the classic format declares `NAME_total`); its `_created` samples are never summed, they mark
    each series' life (a re-created series gets a new one). A metric the body declares but with no
    matching series yet reads 0 (no request of that kind so far); a metric the body does not
    mention at all raises NotYet: an error for a level, so a typo in the selector never bills 0
    quietly, and for a counter a reading of nothing (see NotYet).

    Each counter series' start (`Reading.started`) is its `_created`, else the process's own
    `process_start_time_seconds` in the same answer (one unlabelled sample: this target's).
    """
    family = name[:-6] if name.endswith("_total") else name
    body = exposition.parse(text, {name, family + "_total", family + "_created", PROCESS_START})
    if require_eof and not body.eof:
        raise exposition.ExpositionError("OpenMetrics answer without # EOF: cut short?")
    is_counter = "counter" in (body.types.get(name), body.types.get(family + "_total"))
    is_counter = is_counter or body.types.get(family) == "counter"
    wanted = {name, family + "_total"} if is_counter else {name}
    created = {_labels_id(s.labels): s.value for s in body.samples if s.name == family + "_created"}
    process = [s for s in body.samples if s.name == PROCESS_START and s.name != name]
    process_start = _time(process[0].value) if len(process) == 1 else None
    series: dict[str, Decimal] = {}
    epochs: dict[str, str] = {}
    started: dict[str, Decimal] = {}
    known = name in body.types or (
        is_counter and (family in body.types or family + "_total" in body.types)
    )
    for s in body.samples:
        if s.name not in wanted:
            continue
        known = True
        if not all(_label_ok(s.labels.get(label, ""), op, want) for label, op, want in matchers):
            continue
        key = series_key(s.labels)
        series[key] = series.get(key, Decimal(0)) + number(s.value, f"metric {s.name}")
        mark = created.get(_labels_id(s.labels)) if is_counter else None
        if mark is not None:
            epochs[key] = _epoch(mark)
        begun = _time(mark) if mark is not None else process_start
        if begun is not None:
            started[key] = begun
    if not known:
        raise NotYet(f"the answer has no metric {name}")
    breakdown: dict[tuple[tuple[str, str], ...], Decimal] = {}
    for key, value in series.items():
        part = label_set(series_labels(key))
        if part not in breakdown and len(breakdown) >= MAX_LABEL_SETS:
            part = fold(part, keep)
        breakdown[part] = breakdown.get(part, Decimal(0)) + value
    total = sum(series.values(), Decimal(0))
    return Reading(
        total, series=series, epochs=epochs or None, breakdown=breakdown, started=started or None
    )


def _labels_id(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def prometheus_sum(text: str, name: str, matchers: list[Matcher]) -> Decimal:
    """Sum the samples of `name` whose labels satisfy every matcher."""
    return prometheus_reading(text, name, matchers).value


def _time(value: str) -> Decimal | None:
    """A time sample (seconds since the epoch) as a number; None when it is not a finite one."""
    try:
        number = Decimal(value)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _epoch(created: str) -> str:
    """`_created` in one canonical spelling, whichever format (and float repr) carried it."""
    try:
        return format(Decimal(created).normalize(), "f")
    except InvalidOperation:
        return created


def _label_ok(value: str, op: str, want: str) -> bool:
    if op == "=":
        return value == want
    if op == "!=":
        return value != want
    if op == "=~":
        return re.fullmatch(want, value) is not None
    return re.fullmatch(want, value) is None


def _unescape(value: str) -> str:
    return exposition.unescape(value)


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only within the same scheme, host and port."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise CollectorError(f"{req.full_url} redirected to another host ({new.netloc})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)
