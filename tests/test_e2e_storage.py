"""End to end: the agent's own storage fails under the real daemon (issue 23 §4).

- a state dir on a 2 MiB tmpfs filled by a file across an hour boundary, then freed;
- a ledger page damaged on disk (an index page: rebuilt at start; a table page while running);
- the state dir deleted while running;
- a 0-byte ledger, and a ledger whose -wal was deleted after kill -9.

The oracle is the log lines the test wrote and the records the emulator received, hour by hour.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.emulator import Emulator
from tests.conftest import PRODUCT, ROOT
from tests.e2e import Agent, faketime_env, ledger_samples, offset_to_before_boundary, wait_for

pytestmark = pytest.mark.e2e
LINE = "GET /api/v1/orders\n"


def write_config(tmp_path: Path, state: Path, emulator: Emulator) -> Path:
    log = tmp_path / "access.log"
    log.touch()
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {state}
            metering: {{endpoint_url: "{emulator.url}", send_window: 0}}
            sampling: {{interval: 1}}
            dimensions:
              - name: requests
                collector: {{type: log, path: {log}, pattern: 'GET /api/'}}
            """
        )
    )
    return config


def append(tmp_path: Path, n: int) -> int:
    with open(tmp_path / "access.log", "a") as f:
        f.write(LINE * n)
    return n


def cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def health(state: Path) -> dict[str, object]:
    try:
        return dict(json.loads((state / "health.json").read_text()))
    except (OSError, ValueError):
        return {}


def billed(emulator: Emulator) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in emulator.records():
        out[r.hour] = out.get(r.hour, 0) + int(r.quantity)
    return out


def fake_now(offset: int) -> float:
    return time.time() + offset


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs for the state dir (root only); unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system refuses (ENOSPC)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e
    return filler


def test_disk_full_across_an_hour_boundary(emulator: Emulator, tmp_path: Path, tmpfs: Path) -> None:
    """The disk fills 20 s before a boundary and frees 8 s after it: health, `status --check` and
    `status --json` say `disk full` within the round; one log line begins it and one ends it;
    the lines read while full are billed in the hour they were read, not the next."""
    state = tmpfs
    config = write_config(tmp_path, state, emulator)
    offset = offset_to_before_boundary(35)
    boundary = fake_now(offset) + 35
    fenv = faketime_env(offset, emulator.url)
    agent = Agent(config, fenv).start()
    before = after = 0
    try:
        wait_for("the first sample", lambda: ledger_samples(state) > 0, 30, agent)
        before += append(tmp_path, 100)
        wait_for("100 lines stored", lambda: so_far(config, fenv) == 100, 20, agent)
        filler = fill(state)
        before += append(tmp_path, 250)  # read while the disk is full, 15+ s before the boundary
        wait_for("health naming the full disk",
                 lambda: (health(state).get("storage") or {}).get("state") == "disk full", 10,
                 agent)  # fmt: skip
        assert health(state)["ok"] is False
        assert cli(config, "status", "--check", env=fenv).returncode == 1
        report = json.loads(cli(config, "status", "--json", env=fenv).stdout)
        assert report["health"]["storage"]["state"] == "disk full"
        assert "disk full" in report["health"]["reason"]
        wait_for("the boundary to pass", lambda: fake_now(offset) > boundary + 3, 60, agent)
        after += append(tmp_path, 70)  # the next hour, still full
        wait_for("the new hour's lines kept in memory",
                 lambda: fake_now(offset) > boundary + 7, 30, agent)  # fmt: skip
        assert (health(state).get("storage") or {}).get("state") == "disk full"
        filler.unlink()
        wait_for("health ok again", lambda: health(state).get("ok") is True, 30, agent)
        assert cli(config, "status", "--check", env=fenv).returncode == 0
        hour = int(boundary) - 3600
        wait_for("the full hour sent", lambda: billed(emulator).get(hour) is not None, 60, agent)
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
    out = agent.output()
    assert billed(emulator) == {hour: before, hour + 3600: after}
    assert out.count("storage: disk full since") == 1
    assert out.count("storage: disk full is over") == 1
    assert "Traceback" not in out


def so_far(config: Path, env: dict[str, str] | None = None) -> int | None:
    """The open hour's count so far, as `status --json` says (on the agent's fake clock)."""
    result = cli(config, "status", "--json", env=env)
    if result.returncode != 0:
        return None
    dims = json.loads(result.stdout)["dimensions"]
    value = dims[0]["current_hour_so_far"]
    return None if value is None else int(float(value))


def test_state_dir_deleted_while_running(emulator: Emulator, tmp_path: Path) -> None:
    """The state dir is deleted: the agent makes it again from the ledger it holds open (health
    names it, `status` sees `run` active again), every line is billed, SIGTERM exits 0."""
    state = tmp_path / "state"
    config = write_config(tmp_path, state, emulator)
    agent = Agent(config, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}).start()
    written = 0
    try:
        wait_for("the first sample", lambda: ledger_samples(state) > 0, 30, agent)
        written += append(tmp_path, 40)
        wait_for("40 lines stored", lambda: so_far(config) == 40, 20, agent)
        shutil.rmtree(state)
        written += append(tmp_path, 60)
        wait_for("the ledger restored", lambda: (state / "ledger.db").exists(), 20, agent)
        wait_for("100 lines in the restored ledger", lambda: so_far(config) == 100, 20, agent)
        assert "agent: running" in cli(config, "status").stdout
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
    out = agent.output()
    assert sum(billed(emulator).values()) == written
    assert out.count("storage: state dir gone since") == 1
    assert out.count("made it again and restored the ledger") == 1
    assert "Traceback" not in out


def damaged_table_page(ledger: Path) -> None:
    """Flip the bytes of the samples table's leaf page on disk (the WAL checkpointed first)."""
    db = sqlite3.connect(ledger)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = dict(db.execute("SELECT name, pageno FROM dbstat WHERE name = 'samples'").fetchall())
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    with open(ledger, "r+b") as f:
        f.seek((pages["samples"] - 1) * size)
        f.write(b"\xff" * 64)


def test_damaged_ledger_then_reset(emulator: Emulator, tmp_path: Path) -> None:
    """An index page damaged at rest is rebuilt at start (nothing lost); a table page damaged
    while running makes health not ok (`ledger damaged`); the next `run` exits 1 naming the file
    and reset-ledger, which refuses while `run` is active, then moves it aside."""
    state = tmp_path / "state"
    config = write_config(tmp_path, state, emulator)
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    agent = Agent(config, env).start()
    try:
        wait_for("the first sample", lambda: ledger_samples(state) > 0, 30, agent)
        append(tmp_path, 30)
        wait_for("30 lines stored", lambda: so_far(config) == 30, 20, agent)
        agent.kill9()
        db = sqlite3.connect(state / "ledger.db")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (index_page,) = db.execute(
            "SELECT pageno FROM dbstat WHERE name = 'samples_one_per_instant'"
        ).fetchone()
        db.close()
        with open(state / "ledger.db", "r+b") as f:
            f.seek((index_page - 1) * 4096 + 8)
            f.write(b"\xff" * 32)
        agent = Agent(config, env).start()
        append(tmp_path, 20)
        wait_for("50 lines after the index was rebuilt", lambda: so_far(config) == 50, 30, agent)
        assert "nothing lost" in agent.output()
        damaged_table_page(state / "ledger.db")
        db = sqlite3.connect(state / "ledger.db")  # another writer: the daemon's cache goes
        db.execute("UPDATE meta SET value = value WHERE key = 'instance_id'")
        db.close()
        append(tmp_path, 5)
        wait_for("health naming the damaged ledger",
                 lambda: (health(state).get("storage") or {}).get("state") == "ledger damaged",
                 20, agent)  # fmt: skip
        assert cli(config, "status", "--check").returncode == 1
        refused = cli(config, "reset-ledger", "--yes")
        assert refused.returncode == 1 and "`run` is active" in refused.stderr
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
    assert agent.output().count("storage: ledger damaged since") == 1
    assert "storage: state dir gone" not in agent.output()  # the stop names it as it is
    assert "Traceback" not in agent.output()
    again = subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert again.returncode == 1
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and str(state / "ledger.db") in lines[0]
    assert "metering-agent reset-ledger --yes" in lines[0]
    reset = cli(config, "reset-ledger", "--yes")
    assert reset.returncode == 0, reset.stderr
    assert not (state / "ledger.db").exists()
    # reset-ledger names where it moved it (the index damage at start may have been rebuilt
    # in place by REINDEX, or by a copy with the damaged file kept aside too)
    moved = Path(reset.stdout.strip().splitlines()[-1].split()[2].rstrip(";"))
    assert moved.name.startswith("ledger.db.damaged-") and moved.stat().st_size > 0


@pytest.mark.parametrize("how", ["truncated", "wal deleted"])
def test_empty_ledger_is_never_replaced_silently(
    emulator: Emulator, tmp_path: Path, how: str
) -> None:
    """A ledger truncated to 0 bytes, or whose -wal a kill -9 left and someone deleted: `status`
    names it with reset-ledger (not "start the agent to migrate it"), `run` exits 1 with one
    line, nothing is sent; after reset-ledger --yes the next `run` starts a new ledger."""
    state = tmp_path / "state"
    config = write_config(tmp_path, state, emulator)
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    agent = Agent(config, env).start()
    try:
        wait_for("the first sample", lambda: ledger_samples(state) > 0, 30, agent)
        append(tmp_path, 10)
        wait_for("10 lines stored", lambda: so_far(config) == 10, 20, agent)
    finally:
        agent.kill9()
    if how == "truncated":
        (state / "ledger.db").write_bytes(b"")
    else:
        assert (state / "ledger.db-shm").exists()
        (state / "ledger.db-wal").unlink()
    status = cli(config, "status")
    assert status.returncode == 1
    assert "reset-ledger --yes" in status.stderr and "migrate" not in status.stderr
    assert cli(config, "status", "--check").returncode == 1
    records = len(emulator.records())
    run = subprocess.run(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=60,
    )  # fmt: skip
    assert run.returncode == 1
    assert len(run.stderr.strip().splitlines()) == 1
    assert str(state / "ledger.db") in run.stderr and "reset-ledger --yes" in run.stderr
    assert len(emulator.records()) == records
    assert cli(config, "reset-ledger", "--yes").returncode == 0
    aside = list(state.glob("ledger.db.damaged-*"))
    assert aside and all(p.name.startswith("ledger.db.damaged-") for p in aside)
    agent = Agent(config, env).start()
    try:
        wait_for("a new ledger", lambda: ledger_samples(state) > 0, 30, agent)
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
