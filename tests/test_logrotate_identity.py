"""Issue 21: the log collector's two identity assumptions, tested on the real filesystem.

SPEC: a file is one stream for as long as it exists (device and inode, guarded against inode reuse
by its content); two different files are never one stream, even when every line begins with the
same bytes; a compressed copy continues the stream whose bytes it holds, judged by all that was read
of that stream, not by a fixed-length prefix.
"""

from __future__ import annotations

import os
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from agent import config
from tests.conftest import PRODUCT
from tests.rotation import LOGROTATE, PATTERN, Agent, matching, nginx_json

pytestmark = [
    pytest.mark.e2e,  # Debian's real logrotate, as in tests/test_logrotate*.py
    pytest.mark.skipif(
        not os.access(LOGROTATE, os.X_OK),
        reason=f"{LOGROTATE} is not installed (apt-get install logrotate)",
    ),
]


def _agent(tmp_path: Path, log: Path) -> Agent:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        "dimensions:\n  - name: api_requests\n"
        f"    collector: {{type: log, path: '{log}', pattern: '{PATTERN}'}}\n"
    )
    return Agent(config.load(cfg))


def _append(path: Path, lines: list[str]) -> int:
    """Append whole lines; return how many of them match."""
    with open(path, "a") as f:
        f.write("".join(lines))
    return matching(lines)


def _on_the_same_inode(path: Path, ino: int, hold: Path, text: str) -> bool:
    """Create `path` with `text` until the filesystem gives it inode `ino` (ext4 hands a freed
    inode out again at once; tmpfs never does). Each miss is kept aside in `hold` so that the next
    try gets another number (`hold` must exist before the old file is deleted: making a folder
    takes an inode too). False if it never repeats within 500 tries."""
    for i in range(500):
        path.write_text(text)
        if os.stat(path).st_ino == ino:
            return True
        os.rename(path, hold / f"miss-{i}")
    return False


@pytest.mark.parametrize("agent_down", [True, False], ids=["agent-down", "agent-running"])
def test_a_new_log_on_a_reused_inode_with_the_same_first_line_is_read_from_its_start(
    tmp_path: Path, agent_down: bool
) -> None:
    """The log is deleted and a new one created that gets the same inode number and begins with
    the same line (JSON lines: the same first 229 bytes too), longer than the offset read in the
    old one: every line of the new file is billed. `agent-down`: deleted and re-created while
    the agent is dead (kill -9, nothing held open); `agent-running`: the agent reads twice
    in between (the old file gone), then the new file appears."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (tmp_path / "hold").mkdir()
    log = logs / "app.log"
    first = nginx_json(1)
    log.write_text(first + "".join(nginx_json(n) for n in range(2, 50)))  # before us: not billed
    agent = _agent(tmp_path, log)
    agent.sample()
    owed = _append(log, [nginx_json(n) for n in range(50, 450)])
    agent.sample()
    ino = os.stat(log).st_ino
    if agent_down:
        agent.kill9()
    log.unlink()
    if not agent_down:
        agent.sample()
        agent.sample()
    new = [first, *(nginx_json(n) for n in range(100_001, 101_000))]  # longer than the old offset
    if not _on_the_same_inode(log, ino, tmp_path / "hold", "".join(new)):
        pytest.skip(f"{tmp_path}'s filesystem gave inode {ino} to no new file in 500 tries")
    owed += matching(new)
    agent.sample()
    agent.sample()
    assert agent.billed() == owed, f"billed {agent.billed()}, owed {owed}"
    assert agent.unread == []


@pytest.mark.parametrize("agent_down", [False, True], ids=["agent-running", "killed-between"])
def test_two_files_that_begin_alike_rotated_and_compressed_between_readings(
    tmp_path: Path, agent_down: bool
) -> None:
    """JSON lines (the same first 229 bytes in every line). File A is read, written on, rotated
    and compressed at once (`compress` without `delaycompress`); file B, which begins like A and
    is longer than what was read of A, is written and rotated and compressed too; then a third
    file C. Between two readings: A's rest, B and C are each billed once. `killed-between`: the
    agent dies after reading A, so nothing is held open and A's copy must be told from B's by
    their content."""
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "access.log"
    log.write_text(nginx_json(0) + nginx_json(1))  # there at the first reading: not billed
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 10\n  create\n  compress\n}}\n")

    def rotate() -> None:
        subprocess.run(
            [LOGROTATE, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
            check=True,
            capture_output=True,
        )

    agent = _agent(tmp_path, log)
    agent.sample()
    owed = _append(log, [nginx_json(n) for n in range(2, 300)])  # A
    agent.sample()
    if agent_down:
        agent.kill9()
    owed += _append(log, [nginx_json(n) for n in range(300, 400)])  # A's rest, unread
    rotate()  # A -> access.log.1.gz
    owed += _append(log, [nginx_json(n) for n in range(10_000, 10_600)])  # B
    rotate()  # B -> access.log.1.gz, A -> access.log.2.gz
    owed += _append(log, [nginx_json(n) for n in range(20_000, 20_050)])  # C
    assert sorted(p.name for p in logs.iterdir()) == [
        "access.log",
        "access.log.1.gz",
        "access.log.2.gz",
    ]
    agent.sample()
    agent.sample()
    billed = agent.billed()
    assert billed == owed, f"billed {billed}, owed {owed} ({billed - Decimal(owed):+})"
    assert agent.unread == []
