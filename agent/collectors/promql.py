"""Usage summed across a fleet: raw counters from a Prometheus-compatible HTTP API.

`type: promql` asks `url`'s instant-query endpoint (`/api/v1/query`; Prometheus, Thanos, Mimir,
Amazon Managed Prometheus) for `query`, which must return raw counters (`app_requests_total`,
not `increase(...)`: PromQL extrapolates increases over the samples it has, which is an estimate,
not a bill). Each returned series is a running total of its own (`Reading.series`, keyed by its
whole label set), so the sampler differences each with the agent's counter rules: a reset counts
the new value, a series first seen after the first reading counts whole. In SaaS mode every
series must carry the customer label; the breakdown splits the usage by it.

A series missing from one answer is carried at its last value (for a day): Prometheus drops a
target's series from instant queries while a scrape fails (staleness markers), and a series that
comes back unchanged must not count whole again. One that comes back lower restarted: it counts
its new value. The counters live on other machines, so this machine's reboot resets none of them.

Errors are the round's collector error (no sample, `status` counts it): unreachable, a non-2xx
answer (with the API's own `error`), a result that is not an instant vector, a value that is not
a finite non-negative number, a series without the customer label. Reads are bounded as the
`http` collector's are: a total deadline and a capped body.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from agent.clock import Clock
from agent.collectors.base import Collector, CollectorError, Kind, Reading, Sources, series_key
from agent.collectors.http import DEFAULT_TIMEOUT, Deadline, bounded_opener, late, number
from agent.collectors.sigv4 import CredentialSource, canonical_query, fetch_in_child, sign_get
from agent.errors import ConfigError
from agent.fields import Field, Int, Section, Str

ENDPOINT = "/api/v1/query"
CARRY_FOR = 86_400.0  # seconds a series missing from the answers keeps its last value
MAX_CARRIED = 10_000  # at most this many missing series carried (the longest missing go first)


def _one_auth(values: dict[str, Any], path: str) -> None:
    given = [k for k, v in values.items() if v is not None]
    if len(given) != 1:
        raise ConfigError(
            path, f"expected exactly one of bearer_file, basic, sigv4; found {len(given)}"
        )


AUTH = Section(
    {
        "bearer_file": Field(Str(), doc="a file holding the bearer token (read at each query)"),
        "basic": Field(
            Section(
                {
                    "username": Field(Str(), required=True),
                    "password_file": Field(Str(), required=True, doc="read at each query"),
                }
            ),
            doc="HTTP basic auth",
        ),
        "sigv4": Field(
            Section(
                {
                    "region": Field(
                        Str(r"[a-z]{2}(-[a-z]+)+-\d", hint="expected a region such as us-east-1"),
                        required=True,
                    ),
                    "service": Field(Str(r"[a-z0-9-]+"), default="aps"),
                }
            ),
            doc="AWS Signature V4 (Amazon Managed Prometheus), credentials of the default chain",
        ),
    },
    doc="how to authenticate: exactly one of bearer_file, basic, sigv4",
    check=_one_auth,
)


class PromqlCollector(Collector):
    type_name = "promql"
    options: ClassVar[Mapping[str, Field]] = {
        "url": Field(Str(r"https?://[^\s?#]+", hint="expected an http(s) URL without a query"),
                     required=True, doc="a Prometheus-compatible HTTP API (before /api/v1/query)"),
        "query": Field(Str(), required=True, doc="an instant query returning raw counters"),
        "auth": Field(AUTH),
        "max_bytes": Field(Int(1024, 256 << 20), default=16 << 20, doc="response body cap"),
    }  # fmt: skip
    produces: ClassVar[Kind] = "increment"
    local_counters = False  # the fleet's counters: this machine's reboot resets none

    @classmethod
    def cumulative(cls, options: Mapping[str, Any]) -> bool:
        return True  # raw counters, always differenced

    def __init__(self, options: Mapping[str, Any], sources: Sources) -> None:
        super().__init__(options, sources)
        base = self.config["url"].rstrip("/")
        base = base if base.endswith(ENDPOINT) else base + ENDPOINT
        self.url = f"{base}?{canonical_query({'query': self.config['query']})}"
        self.deadline = Deadline(0)
        self.opener = sources.extra.get("http_opener") or bounded_opener(self)
        wall = sources.extra.get("wall_clock") or Clock()  # SigV4 needs the real time
        self.wall = wall
        auth = self.config.get("auth") or {}
        self.sigv4 = auth.get("sigv4")
        timeout = float(self.config.get("timeout") or DEFAULT_TIMEOUT)
        fetch = sources.extra.get("aws_credentials") or functools.partial(fetch_in_child, timeout)
        self.creds = CredentialSource(wall.time, fetch) if self.sigv4 else None

    def labels(self) -> frozenset[str] | None:
        return None  # the query's series decide

    def read(self, state: dict[str, Any] | None) -> Reading:
        data = self._query()
        found = self._series(data)
        carried = dict((state or {}).get("last") or {})
        at = max((t for _, t in found.values()), default=None)
        last: dict[str, list[Any]] = {k: [str(v), t] for k, (v, t) in found.items()}
        series = {k: v for k, (v, _) in found.items()}
        gone = sorted(
            (
                (k, kept)
                for k, kept in carried.items()
                if k not in found and (at is None or at - float(kept[1]) <= CARRY_FOR)
            ),
            key=lambda item: -float(item[1][1]),
        )
        for key, kept in gone[:MAX_CARRIED]:
            series[key] = Decimal(kept[0])
            last[key] = kept
        problem = None
        if data.get("warnings"):  # e.g. Thanos' partial answers: billed, and shown in status
            problem = f"{self.config['url']} warned: {str(data['warnings'][0])[:200]}"
        # breakdown {}: the sampler breaks each increment down by its series' labels
        return Reading(
            sum(series.values(), Decimal(0)),
            state={"last": last},
            series=series,
            breakdown={},
            problem=problem,
        )

    def _series(self, data: dict[str, Any]) -> dict[str, tuple[Decimal, float]]:
        """Each returned series' counter value and evaluation time, keyed by its label set."""
        where = f"query {self.config['query']!r}"
        body = data.get("data")
        kind = body.get("resultType") if isinstance(body, dict) else None
        if kind != "vector":
            raise CollectorError(
                f"{where} gave a {kind or 'malformed'} result, not an instant vector of raw "
                "counters (e.g. app_requests_total, not a range or a scalar)"
            )
        result = body.get("result") if isinstance(body, dict) else None
        if not isinstance(result, list):
            raise CollectorError(f"{where}: the answer has no result list")
        out: dict[str, tuple[Decimal, float]] = {}
        customer = self.keep_label
        for item in result:
            try:
                labels = {str(k): str(v) for k, v in item["metric"].items()}
                t, text = item["value"]
                at = float(t)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CollectorError(f"{where}: a result item is not a sample") from None
            value = number(text, f"{where} series {series_key(labels)}")
            if value < 0:
                raise CollectorError(
                    f"{where} series {series_key(labels)} is {value}: a counter is never negative"
                )
            if customer is not None and not labels.get(customer):
                raise CollectorError(
                    f"{where} series {series_key(labels)} has no {customer} label "
                    "(saas.customer_label): keep it in the query's result, e.g. sum by "
                    f"({customer}, instance) (...)"
                )
            out[series_key(labels)] = (value, at)
        return out

    def _query(self) -> dict[str, Any]:
        """The API's JSON answer to the instant query; CollectorError unless it succeeded."""
        url = self.config["url"]
        timeout = float(self.config.get("timeout") or DEFAULT_TIMEOUT)
        limit = int(self.config["max_bytes"])
        req = urllib.request.Request(self.url, headers=self._auth_headers())
        deadline = self.deadline = Deadline(timeout)
        status = 200
        try:
            try:
                with self.opener.open(req, timeout=deadline.remaining()) as resp:
                    body = resp.read(limit + 1)
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read(4096)
                e.close()
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            if deadline.passed():
                raise CollectorError(late(url, timeout)) from None
            raise CollectorError(f"{url} unreachable: {getattr(e, 'reason', e)}") from None
        finally:
            deadline.cancel()
        if deadline.expired:  # shut down mid-answer: the body may be cut short
            raise CollectorError(late(url, timeout))
        if len(body) > limit:
            raise CollectorError(f"{url} answered more than {limit} bytes (max_bytes)")
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        said = ""
        if isinstance(data, dict) and data.get("error"):
            said = f": {data.get('errorType', 'error')}: {str(data['error'])[:200]}"
        if not 200 <= status < 300:
            if status in (401, 403):
                if self.creds is not None:
                    self.creds.forget()
                said += " (check the collector's auth)"
            raise CollectorError(f"{url} answered HTTP {status}{said}")
        if not isinstance(data, dict):
            raise CollectorError(f"{url} did not answer the Prometheus API's JSON")
        if data.get("status") != "success":
            raise CollectorError(f"{url} answered status {data.get('status')!r}{said}")
        return data

    def _auth_headers(self) -> dict[str, str]:
        auth = self.config.get("auth") or {}
        if auth.get("bearer_file"):
            token = _secret(auth["bearer_file"], "auth.bearer_file")
            return {"Authorization": f"Bearer {token}"}
        if auth.get("basic"):
            user = auth["basic"]["username"]
            password = _secret(auth["basic"]["password_file"], "auth.basic.password_file")
            pair = base64.b64encode(f"{user}:{password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        if self.sigv4 and self.creds is not None:
            return sign_get(
                self.url,
                self.sigv4["region"],
                self.sigv4["service"],
                self.creds.get(),
                self.wall.now(),
            )
        return {}


def _secret(path: str, key: str) -> str:
    """A token or password from its file, read at each query so a rotated one is used."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CollectorError(f"{key}: cannot read {path}: {getattr(e, 'strerror', e)}") from None
    if not text:
        raise CollectorError(f"{key}: {path} is empty")
    return text
