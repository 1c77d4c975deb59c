from __future__ import annotations

import uuid
from decimal import Decimal
from pathlib import Path

from agent.ledger import Ledger
from agent.modes.instance import seal_hours
from agent.windows import send_offset, span_for
from tests.billing import H, make_config

D = Decimal


def fill(ledger: Ledger, dim: str, start: float, n: int, value: str = "2", every: int = 60) -> None:
    for i in range(n):
        t = start + i * every
        ledger.record_sample(dim, t, D(value), span_for(t, every), None, carry=True)


def test_seals_past_hours_once_each(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpus", H, 60)
    fill(ledger, "vcpus", H + 3600, 10)
    assert seal_hours(ledger, cfg, H + 3599, offset=0) == []  # the hour is not over
    sealed = seal_hours(ledger, cfg, H + 3600 + 600, offset=42)
    assert [(s.dimension, s.hour, s.quantity, s.samples) for s in sealed] == [("vcpus", H, "2", 60)]
    assert seal_hours(ledger, cfg, H + 3600 + 660, offset=42) == []  # never twice
    (h,) = ledger.pending()
    assert h.timestamp == H + 59 * 60  # the hour's last sample, whole seconds
    assert h.next_attempt == H + 3600 + 42
    uuid.UUID(h.client_token)
    assert ledger.unsealed_sample_count() == 10  # the sealed hour's samples are gone


def test_a_suspend_across_hours_seals_each_hour_once(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpus", H + 3000, 3)
    fill(ledger, "vcpus", H + 3 * 3600 + 60, 2)  # woke up three hours later
    sealed = seal_hours(ledger, cfg, H + 3 * 3600 + 180, offset=0)
    assert [s.hour for s in sealed] == [H]  # the hours with no samples send nothing
    tokens = {h.client_token for h in ledger.pending()}
    assert len(tokens) == 1


def test_stop_seals_the_current_partial_hour(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "vcpu_hours", H, 20)  # 2 vCPUs for 20 minutes
    sealed = seal_hours(ledger, cfg, H + 1200, offset=0, include_current=True)
    assert [(s.dimension, s.quantity) for s in sealed] == [("vcpu_hours", "0.667")]


def test_each_seal_gets_its_own_token(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    for dim in ("vcpus", "vcpu_hours"):
        fill(ledger, dim, H, 2)
    seal_hours(ledger, cfg, H + 3700, offset=0)
    assert len({h.client_token for h in ledger.pending()}) == 2


def test_carried_only_hour_keeps_its_timestamp_in_the_hour(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "requests", H + 60, 1, "5")
    seal_hours(ledger, cfg, H + 120, offset=0, include_current=True)  # a stop at H+2min
    ledger.record_sample("requests", H + 180, D(3), 60, None, carry=True)  # restart, same hour
    sealed = seal_hours(ledger, cfg, H + 2 * 3600, offset=0)
    assert [(s.hour, s.quantity) for s in sealed] == [(H + 3600, "3")]
    h = next(x for x in ledger.pending() if x.hour == H + 3600)
    assert h.timestamp == H + 3600  # clamped into its own hour


def test_samples_of_a_removed_dimension_are_kept(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "gone", H, 2)
    assert seal_hours(ledger, cfg, H + 7200, offset=0) == []
    assert ledger.unsealed_sample_count() == 2


def test_zero_usage_sends_zero(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    ledger = Ledger(cfg.state_dir)
    fill(ledger, "requests", H, 3, "0")
    (s,) = seal_hours(ledger, cfg, H + 3600, offset=0)
    assert s.quantity == "0"


def test_send_offset_is_stable_and_spread() -> None:
    assert send_offset("i-0abc", 600) == send_offset("i-0abc", 600)
    offsets = [send_offset(f"i-{n:017x}", 600) for n in range(2000)]
    assert all(0 <= o < 600 for o in offsets)
    buckets = [sum(1 for o in offsets if b * 60 <= o < (b + 1) * 60) for b in range(10)]
    assert min(buckets) > 150  # roughly uniform: 200 expected per bucket
    assert send_offset("i-0abc", 0) == 0


def test_span_for_clips_to_the_hour() -> None:
    assert span_for(H + 60, 60) == 60
    assert span_for(H + 90, 60) == 30  # a start-up sample off the grid
    assert span_for(H + 3590, 3600) == 10
