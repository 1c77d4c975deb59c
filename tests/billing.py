"""Helpers shared by the billing-loop tests."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent import config
from agent.aggregate import Quantity
from agent.ledger.hours import SealedHour
from agent.sending.outcomes import Outcome
from tests.conftest import PRODUCT

H = 1_800_000_000  # 2027-01-15T08:00:00Z, an hour boundary


def make_config(tmp_path: Path, extra: str = "", dims: str | None = None) -> config.Config:
    dims = (
        dims
        or """
      - name: vcpus
        collector: {type: system, metric: cpu_count}
      - name: requests
        collector: {type: system, metric: users, counter: true}
      - name: vcpu_hours
        collector: {type: system, metric: cpu_count}
        aggregate: integral
        decimals: 3
    """
    )
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        + textwrap.dedent(extra)
        + "dimensions:\n"
        + textwrap.indent(textwrap.dedent(dims).strip("\n"), "  ")
        + "\n"
    )
    return config.load(path)


@dataclass
class Call:
    product_code: str
    dimension: str
    timestamp: float
    quantity: Quantity
    client_token: str


@dataclass
class FakeClient:
    """Records every request; answers from a script, then 'sent'."""

    script: list[Outcome] = field(default_factory=list)
    dry_script: list[Outcome] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    dry_runs: int = 0

    def meter_usage(self, h: SealedHour) -> Outcome:
        self.calls.append(
            Call(h.product_code, h.dimension, h.timestamp, h.quantity, h.client_token)
        )
        if self.script:
            return self.script.pop(0)
        return Outcome("sent", record_id=f"rec-{h.dimension}-{h.timestamp // 3600}")

    def dry_run(
        self, product_code: str, dimension: str, decimals: int | None, now: float
    ) -> Outcome:
        self.dry_runs += 1
        if self.dry_script:
            return self.dry_script.pop(0)
        return Outcome("dryrun_ok", code="DryRunOperation")


def sealed_hour(
    dimension: str,
    timestamp: float,
    quantity: Quantity,
    client_token: str,
    product_code: str = PRODUCT,
) -> SealedHour:
    """A pending sealed hour as the sender hands it to a client."""
    ts = int(timestamp)
    return SealedHour(dimension, ts // 3600 * 3600, product_code, quantity, ts, client_token, 1, "",
                      "pending", None, 0, None, float(ts), float(ts), None)  # fmt: skip


def retry(code: str = "ThrottlingException") -> Outcome:
    return Outcome("retry", code=code, message="try later")


def tokens(calls: list[Call]) -> Iterator[str]:
    return (c.client_token for c in calls)
