"""`metering-agent prepare-image`: the state dir made ready to bake, never under a running agent."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from agent.commands import image
from agent.config import load
from agent.errors import EX_CONFIG, AgentError, LockHeld
from agent.host.locks import StateLock
from agent.ledger import Ledger
from tests.conftest import PRODUCT, run_cli


def bake_state(tmp_path: Path) -> tuple[Path, Path, list[Path]]:
    """A config and a state dir as a seller's test run leaves them; returns (config, state, the
    files the agent made)."""
    state = tmp_path / "state"
    early, late = tmp_path / "early.log", tmp_path / "late.log"
    early.write_text("GET /\n" * 3)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
product_code: {PRODUCT}
state_dir: {state}
metering: {{send_window: 10m}}
dimensions:
  - name: early_requests
    collector: {{type: log, path: {early}, pattern: GET, start_at: beginning}}
  - name: late_requests
    collector: {{type: log, path: {late}, pattern: GET}}
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
"""
    )
    ledger = Ledger(state)  # the real ledger, WAL files and all
    ledger.close()
    (state / "health.json").write_text(json.dumps({"ok": True}))
    (state / "config.running.yaml").write_text(config.read_text())
    moved = state / "ledger.db.instance-i-0build.1700000000"
    moved.write_text("")
    for name in ("lock", "send.lock"):
        (state / name).write_text("123\n")
    made = sorted(p for p in state.iterdir())
    (state / "seller-notes.txt").write_text("not the agent's\n")
    return config, state, made


def test_prepare_image_removes_the_agents_files_and_says_what_first_boot_reads(
    tmp_path: Path,
) -> None:
    config, state, made = bake_state(tmp_path)
    assert state / "ledger.db" in made
    result = run_cli("prepare-image", "--yes", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert sorted(state.iterdir()) == [state / "image.json", state / "seller-notes.txt"]
    (logged,) = json.loads((state / "image.json").read_text())["logs"]
    assert (logged["path"], logged["length"]) == (str(tmp_path / "early.log"), len("GET /\n") * 3)
    removed = {line.split(" ", 1)[1] for line in result.stdout.splitlines() if "removed " in line}
    # reading the ledger for unsent hours may leave its -wal/-shm: removed as well
    assert removed - {f"{state}/ledger.db-wal", f"{state}/ledger.db-shm"} == {str(p) for p in made}
    boot = result.stdout.split("the buyer's first boot:")[1]
    early = next(line for line in boot.splitlines() if line.strip().startswith("early_requests:"))
    late = next(line for line in boot.splitlines() if line.strip().startswith("late_requests:"))
    assert "from the length each file has now" in early and "(18 bytes)" in early
    assert "no file in the image yet" in late
    assert "600 s" in boot  # the first record: end of hour + up to send_window
    assert "warning" not in result.stdout
    # a second run finds nothing to remove and succeeds
    again = run_cli("prepare-image", "--yes", "-c", str(config))
    assert again.returncode == 0 and "removed" not in again.stdout


@pytest.mark.parametrize("lock", ["lock", "send.lock"])
def test_prepare_image_refuses_while_an_agent_holds_the_state_dir(
    tmp_path: Path, lock: str
) -> None:
    config, state, _ = bake_state(tmp_path)
    held = StateLock(state, name=lock)
    held.acquire()  # as `run` (lock) or its sender child (send.lock) holds it
    before = sorted(state.iterdir())
    result = run_cli("prepare-image", "--yes", "-c", str(config))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert str(state / lock) in line and "systemctl stop metering-agent" in line
    assert sorted(state.iterdir()) == before  # nothing removed
    with pytest.raises(LockHeld):
        image.prepare(load(config), yes=True, out=io.StringIO())


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prepare_image_asks_on_a_terminal_and_refuses_without_one(tmp_path: Path) -> None:
    config, _state, made = bake_state(tmp_path)
    cfg = load(config)
    with pytest.raises(AgentError, match="--yes"):
        image.prepare(cfg, yes=False, out=io.StringIO(), stdin=io.StringIO("y\n"))
    assert all(p.exists() for p in made)
    assert image.prepare(cfg, yes=False, out=io.StringIO(), stdin=Terminal("n\n")) == 1
    assert all(p.exists() for p in made)
    assert image.prepare(cfg, yes=False, out=io.StringIO(), stdin=Terminal("y\n")) == 0
    assert not any(p.exists() for p in made)


def test_prepare_image_on_a_bad_config_exits_78(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"product_code: {PRODUCT}\ndimensions: []\n")
    result = run_cli("prepare-image", "--yes", "-c", str(config))
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("accepted", [False, True])
def test_prepare_image_refuses_an_emulator_endpoint_left_in_the_config(
    tmp_path: Path, accepted: bool
) -> None:
    """An image baked with a loopback endpoint bills nothing: refused (78) with the fix, even
    when `warnings.accept` silences the warning for `check`, and nothing is removed."""
    config, state, _ = bake_state(tmp_path)
    before = sorted(state.iterdir())
    text = config.read_text().replace(
        "metering: {send_window: 10m}",
        "metering: {send_window: 10m, endpoint_url: 'http://127.0.0.1:8787'}",
    )
    if accepted:
        text += "warnings: {accept: [loopback_endpoint]}\n"
    config.write_text(text)
    result = run_cli("prepare-image", "--yes", "-c", str(config))
    assert result.returncode == 78
    (line,) = result.stderr.strip().splitlines()
    assert "metering.endpoint_url: http://127.0.0.1:8787 is on this machine" in line
    assert "remove it before baking" in line and "nothing was removed" in line
    assert sorted(state.iterdir()) == before
    assert result.stdout == ""


def test_prepare_image_names_the_unsent_hours_it_discards(tmp_path: Path) -> None:
    """A build machine that was subscribed billed real hours: those never sent are named."""
    from decimal import Decimal

    from agent.modes.instance import seal_hours

    config, state, _ = bake_state(tmp_path)
    cfg = load(config)
    h = 1_790_000_000 // 3600 * 3600
    ledger = Ledger(state)
    ledger.record_sample("vcpus", h + 10, Decimal(2), 60.0, None, carry=False)
    seal_hours(ledger, cfg, h + 3600 + 5, offset=0)
    assert len(ledger.pending()) >= 1
    ledger.close()
    result = run_cli("prepare-image", "--yes", "-c", str(config))
    assert result.returncode == 0, result.stderr
    (warning,) = [line for line in result.stdout.splitlines() if "never sent" in line]
    assert warning.startswith("warning [unsent_hours] the ledger holds 1 hour(s)")


def test_prepare_image_that_cannot_open_a_lock_says_so_in_one_line(tmp_path: Path) -> None:
    """The unit's UMask makes the lock 0600, the service user's: a seller without sudo."""
    config, state, _ = bake_state(tmp_path)
    (state / "lock").unlink()
    (state / "lock").mkdir()  # as unopenable for reading as a 0600 file is to another user
    result = run_cli("prepare-image", "--yes", "-c", str(config))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert str(state / "lock") in line and "root" in line


def test_prepare_image_refuses_a_saas_config(tmp_path: Path) -> None:
    """A SaaS ledger is the seller's customers and unsent records: never removed for an image."""
    from tests.saas import saas_config

    cfg = saas_config(tmp_path, "http://127.0.0.1:9")
    ledger = Path(cfg.state_dir) / "ledger.db"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"x")
    assert image.prepare(cfg, yes=True, out=io.StringIO()) == 1
    assert ledger.read_bytes() == b"x"
