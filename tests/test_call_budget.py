"""The account's call budget (sending/budget.py): slots one interval apart across processes that
share the state directory, as the send child and the fulfillment handler child do; the limits'
pure parts (limits.py)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

from agent.clock import Clock
from agent.fulfillment import limits
from agent.sending.budget import CallBudget
from tests.conftest import ROOT

TAKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent.clock import Clock
    from agent.sending.budget import CallBudget
    budget = CallBudget(Path(sys.argv[1]), Clock(), interval=float(sys.argv[2]))
    for _ in range(int(sys.argv[3])):
        print(repr(budget.take()), flush=True)
    """
)


def test_two_processes_share_one_pace(tmp_path: Path) -> None:
    interval, each = 0.05, 12
    cmd = [sys.executable, "-c", TAKER, str(tmp_path / "api-budget"), str(interval), str(each)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    starts = sorted(float(line) for p in procs for line in p.communicate(timeout=30)[0].split())
    assert all(p.returncode == 0 for p in procs) and len(starts) == 2 * each
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) > interval * 0.9  # never two calls closer than the pace, whoever made them


def test_reserve_refuses_beyond_max_wait_and_takes_nothing(tmp_path: Path) -> None:
    clock = Clock()
    a = CallBudget(tmp_path / "b", clock, interval=1.0)
    b = CallBudget(tmp_path / "b", clock, interval=1.0)
    assert a.reserve() == 0.0
    wait = b.reserve(max_wait=5)
    assert wait is not None and 0.9 < wait <= 1.0
    assert a.reserve(max_wait=0.5) is None  # the next slot is ~2 s away
    assert 1.9 < (a.reserve() or 0) <= 2.0  # the refusal took no slot


def test_a_slot_far_ahead_is_a_clock_step_and_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    a = CallBudget(tmp_path / "b", clock, interval=1.0)
    a.reserve()
    (tmp_path / "b").write_bytes(__import__("struct").pack("<d", clock.time() + 3600))
    assert a.reserve(max_wait=1) == 0.0


def test_without_the_file_the_pace_is_this_processs_own(tmp_path: Path) -> None:
    budget = CallBudget(tmp_path / "missing-dir" / "b", Clock(), interval=1.0)
    assert budget.reserve() == 0.0
    assert budget.reserve(max_wait=0.5) is None


def test_rate_allows_its_burst_then_its_pace() -> None:
    rate = limits.Rate(per_second=2.0, burst=3)
    assert [rate.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rate.take(100.0) == 0.5
    assert rate.take(100.5) == 0.0 and rate.take(100.5) == 0.5


def test_client_rates_forget_the_least_recent() -> None:
    rates = limits.ClientRates(per_second=0.1, burst=1, kept=2)
    assert rates.take("a", 0) == 0 and rates.take("b", 0) == 0
    assert rates.take("a", 1) > 0  # a is limited
    rates.take("c", 1)  # b, the least recently seen, is forgotten
    assert rates.take("b", 1) == 0


def test_answer_cache_expires_and_is_bounded() -> None:
    cache: limits.AnswerCache[str] = limits.AnswerCache(seconds=10, kept=2)
    cache.put("k1", "302", 0)
    assert cache.get("k1", 9.9) == "302" and cache.get("k1", 10) is None
    for key in ("k2", "k3", "k4"):
        cache.put(key, key, 0)
    assert cache.get("k2", 1) is None and cache.get("k4", 1) == "k4"
    assert limits.token_key("abc") != "abc" and len(limits.token_key("abc")) == 64
    assert limits.retry_after(0.01) == "1" and limits.retry_after(2.2) == "3"
