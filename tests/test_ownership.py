"""The state dir stays the service user's whoever ran a command first; user errors are one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.emulator import Emulator
from agent.errors import EX_CONFIG, EX_NOPERM
from agent.ledger import Ledger
from tests.conftest import PRODUCT, ROOT, run_cli

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory both root and `nobody` can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="metering-owner-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(where: Path, endpoint: str = "null") -> Path:
    path = where / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {where / 'state'}\n"
        f"metering: {{endpoint_url: {endpoint}, region: us-east-1}}\n"
        "dimensions:\n  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n"
    )
    path.chmod(0o644)
    return path


def as_nobody(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "agent", *args],
        capture_output=True, text=True, env=full, cwd=ROOT, timeout=60,
    )  # fmt: skip


def as_user(uid: int, gid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         sys.executable, "-m", "agent", *args],
        capture_output=True, text=True, env=dict(os.environ), cwd=ROOT, timeout=60,
    )  # fmt: skip


@as_root
def test_send_flush_as_root_leaves_files_the_service_user_owns(
    shared: Path, emulator: Emulator
) -> None:
    state = shared / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    cfg = config(shared, emulator.url)
    result = run_cli("send", "--flush", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    created = sorted(p.name for p in state.iterdir())
    assert "send.lock" in created and "ledger.db" in created
    for path in state.iterdir():
        assert (path.stat().st_uid, path.stat().st_gid) == (NOBODY, NOBODY), path
    # and the service user can then do the same
    again = as_nobody("send", "--flush", "-c", str(cfg))
    assert again.returncode == 0, again.stderr


@as_root
def test_another_user_is_told_whom_to_run_as(shared: Path) -> None:
    cfg = config(shared)
    (shared / "state").mkdir(mode=0o755)  # root's
    result = as_nobody("send", "--flush", "-c", str(cfg))
    assert result.returncode == EX_NOPERM
    (line,) = result.stderr.strip().splitlines()
    assert "sudo -u root metering-agent send --flush" in line


@as_root
def test_a_kubernetes_fsgroup_empty_dir_is_writable_by_the_pods_group(
    shared: Path, emulator: Emulator
) -> None:
    """An emptyDir under fsGroup: root-owned, the pod's group, mode 2777; uid 10001 runs there."""
    group = 10001
    state = shared / "state"
    state.mkdir()
    os.chown(state, 0, group)
    state.chmod(0o2777)
    cfg = config(shared, emulator.url)
    result = as_user(10001, group, "send", "--flush", "-c", str(cfg))
    assert result.returncode == 0, result.stderr
    assert (state / "ledger.db").stat().st_uid == 10001
    # a user of another group is still refused, even though the directory is world-writable
    other = as_user(10002, 10002, "send", "--flush", "-c", str(cfg))
    assert other.returncode == EX_NOPERM, other.stderr


@as_root
def test_status_on_an_unreadable_state_dir_is_one_line(shared: Path) -> None:
    cfg = config(shared)
    state = shared / "state"
    state.mkdir(mode=0o700)
    (state / "ledger.db").write_bytes(b"")
    result = as_nobody("status", "-c", str(cfg))
    assert result.returncode == EX_NOPERM
    (line,) = result.stderr.strip().splitlines()
    assert "sudo" in line and "metering-agent" in line and "Traceback" not in result.stderr


def test_deep_yaml_nesting_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("product_code: " + "[" * 3000 + "]" * 3000 + "\n")
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    (line,) = result.stderr.strip().splitlines()
    assert str(path) in line


@pytest.mark.parametrize("command", [["schema"], ["status"], ["report", "--since", "7d"]])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    cfg = config(tmp_path)
    args = [*command] if command == ["schema"] else [*command, "-c", str(cfg)]
    if command[0] != "schema":
        Ledger(tmp_path / "state").close()  # a ledger to read
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first byte
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=30)
    assert code in (0, 141) and "Traceback" not in err and "BrokenPipe" not in err, err
