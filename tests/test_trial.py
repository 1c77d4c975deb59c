"""`metering-agent trial`: the real daemon against the in-process emulator on a fast clock.

The oracle for the table is the emulator's own records (and, for the full hour, the machine's CPU
count: `vcpus` is its max, `vcpu_hours` its integral over a whole hour)."""

from __future__ import annotations

import io
import os
import textwrap
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.clock import iso_hour
from agent.commands import trial
from agent.emulator import Emulator
from tests.conftest import PRODUCT, run_cli

CONFIG = f"""
    product_code: {PRODUCT}
    state_dir: {{state}}
    metering:
      endpoint_url: https://metering.marketplace.us-east-1.amazonaws.com
    dimensions:
      - name: vcpus
        collector: {{{{type: system, metric: cpu_count}}}}
      - name: vcpu_hours
        collector: {{{{type: system, metric: cpu_count}}}}
        aggregate: integral
        decimals: 3
      - name: egress_gb
        collector: {{{{type: system, metric: net_sent_bytes}}}}
        scale: 0.000000001
        decimals: 6
{{extra}}"""

UNREACHABLE = """\
      - name: users
        collector: {type: http, url: "http://127.0.0.1:9/stats", query: users}
"""


class Stamped(io.StringIO):
    """Output that remembers the real time of each write."""

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.stamps.append((time.time(), text))
        return super().write(text)


def table_rows(text: str) -> dict[tuple[str, str], str]:
    """(hour, dimension) -> quantity, from the table `trial` prints."""
    rows: dict[tuple[str, str], str] = {}
    lines = text.splitlines()
    start = lines.index("MeterUsage received:") + 2  # past the header
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        hour, dimension, quantity = line.split()[:3]
        assert (hour, dimension) not in rows
        rows[(hour, dimension)] = quantity
    return rows


@pytest.mark.e2e
def test_trial_table_is_what_the_emulator_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept: list[Emulator] = []

    class KeptEmulator(Emulator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            kept.append(self)

    monkeypatch.setattr(trial, "Emulator", KeptEmulator)
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(CONFIG.format(state=state, extra=UNREACHABLE)))
    out = Stamped()
    code = trial.main(cfg, hours=1, speed=120, dimensions="vcpus,vcpu_hours,users", out=out)
    text = out.getvalue()

    (emulator,) = kept
    records = emulator.records()
    assert code == 1  # egress_gb is not in the listing: refused, as AWS would
    assert table_rows(text) == {(iso_hour(r.hour), r.dimension): r.quantity_text for r in records}
    assert {r.dimension for r in records} == {"vcpus", "vcpu_hours"}
    errors = [c for c in emulator.calls("error") if c["code"] != "DryRunOperation"]
    assert {c["request"]["UsageDimension"] for c in errors} == {"egress_gb"}
    assert {c["code"] for c in errors} == {"InvalidUsageDimensionException"}
    refused_lines = text.split("refused:\n")[1].splitlines()
    assert any("egress_gb" in line and "InvalidUsageDimension" in line for line in refused_lines)
    # the whole hour: the CPU count as max and as vCPU-hours
    cpus = psutil.cpu_count()
    (progress,) = [line for line in text.splitlines() if line.startswith("hour 1/1 ")]
    whole_hour = progress.split()[2].rstrip(":")
    whole = {r.dimension: r.quantity_text for r in records if iso_hour(r.hour) == whole_hour}
    assert whole["vcpus"] == str(cpus)
    # integral: the whole hour (a round up to one real second late still lands on its instant:
    # daemon.snap's tolerance scales with the clock's rate)
    assert Decimal(whole["vcpu_hours"]) == cpus
    # a dimension whose source never answered: named, not silently absent
    (missing,) = [line for line in text.splitlines() if line.startswith("trial: nothing received")]
    assert missing.endswith(f"{whole_hour} users")
    assert not state.exists()  # the config's own state dir is never touched
    # each trial hour's real start, said as it begins (the oracle: when it was written)
    (written, began) = next((t, line) for t, line in out.stamps if line.startswith("trial hour"))
    assert began.startswith(f"trial hour 1/1 ({whole_hour} on the agent's clock) began at ")
    start = began.split(" began at ", 1)[1].split(" real time", 1)[0]
    assert (
        abs(
            datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
            - written
        )
        < 1.5
    )
    assert began.rstrip().endswith("(30 s)")  # 3600 s at 120x
    assert text.index(began) < text.index(progress)


@pytest.mark.e2e
def test_trial_exits_0_when_every_hour_went_through(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(CONFIG.format(state=tmp_path / "state", extra="")))
    result = run_cli("trial", "-c", str(cfg), "--hours", "1", "--speed", "240", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    hours = sorted({h for h, _ in rows})
    assert len(hours) >= 2  # the warm-up hour and the trial's whole hour at least
    assert {d for _, d in rows} == {"vcpus", "vcpu_hours", "egress_gb"}
    assert not (tmp_path / "state").exists()


def test_trial_on_a_bad_config_exits_78_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"product_code: {PRODUCT}\ndimensions: []\n")
    result = run_cli("trial", "-c", str(cfg), "--hours", "1")
    assert result.returncode == 78
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_the_table_shows_allocations_and_refusals_when_there_are_any() -> None:
    from agent.emulator import Record

    h = 1_800_000_000 // 3600 * 3600
    alloc = [
        {"AllocatedUsageQuantity": 3, "Tags": [{"Key": "Tenant", "Value": "acme"}]},
        {"AllocatedUsageQuantity": 1},
    ]
    records = [
        Record("r1", "c", PRODUCT, "api", h, h + 3599, Decimal(4), "4", "t1", alloc),
        Record("r2", "c", PRODUCT, "vcpus", h, h + 3599, Decimal(2), "2", "t2"),
    ]
    refusal = trial.Refusal(h, "egress_gb", "InvalidUsageDimensionException", 3)
    outcome = trial.Outcome(records, [refusal], 0, h, 1, ["api", "vcpus", "egress_gb"], Path("/x"))
    text = trial.render(outcome)
    assert table_rows(text) == {(iso_hour(h), "api"): "4", (iso_hour(h), "vcpus"): "2"}
    api = next(line for line in text.splitlines() if " api " in line)
    assert api.split()[3:] == ["Tenant=acme:3", "untagged:1"]
    assert f"{iso_hour(h)}  egress_gb  InvalidUsageDimensionException  x3" in text


def test_a_speed_faster_than_the_config_can_bill_is_refused_in_one_line(tmp_path: Path) -> None:
    """interval 10 s: a round 1/5 s late must stay within 2.5 clock seconds, so 50x at most."""
    cfg = tmp_path / "config.yaml"
    text = textwrap.dedent(CONFIG.format(state=tmp_path / "state", extra=""))
    cfg.write_text(text.replace("dimensions:", "sampling: {interval: 10}\ndimensions:", 1))
    result = run_cli("trial", "-c", str(cfg), "--hours", "1", "--speed", "60")
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "--speed 60" in line and "50" in line
    assert not (tmp_path / "state").exists()


def group_alive(pgid: int) -> bool:
    """Whether a process of the process group `pgid` still runs (a zombie does not: it cannot
    write a byte)."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return False


def test_ctrl_c_stops_the_agent_before_its_files_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent runs in its own session (Ctrl-C does not reach it): the trial kills it first,
    then removes its temporary dir, so nothing writes there afterwards."""
    import tempfile
    import time

    cfg = tmp_path / "config.yaml"
    cfg.write_text(textwrap.dedent(CONFIG.format(state=tmp_path / "state", extra="")))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    children: list[Any] = []

    def interrupt(clock: Any, wall: Any, emulator: Any, proc: Any, *args: Any) -> bool:
        children.append(proc)
        deadline = time.monotonic() + 30
        while not list(scratch.glob("*/state/ledger.db")) and time.monotonic() < deadline:
            time.sleep(0.1)  # the agent is up and writing in the trial's state dir
        assert list(scratch.glob("*/state/ledger.db")), "the agent never started"
        raise KeyboardInterrupt

    monkeypatch.setattr(trial, "_wait_hour", interrupt)
    with pytest.raises(KeyboardInterrupt):
        trial.run(cfg, hours=1, speed=60, out=io.StringIO())
    (child,) = children
    assert child.poll() is not None  # killed, not left running
    # nothing can write there once no process of the agent's group is left (its sender too)
    deadline = time.monotonic() + 10
    while group_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not group_alive(child.pid), "a process of the killed agent's group is still running"
    assert list(scratch.iterdir()) == []
