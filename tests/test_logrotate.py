"""The log collector against Debian's real `logrotate`, a fast writer and simulated kill -9.

Each scenario: a writer appends about 2,000 lines a second (unique, half of them matching), the
real `logrotate -f` rotates every ~1.2 s with one configuration, and the collector is read through
the real sampling and ledger path (positions committed with their samples). Three times in the
run the agent "dies": the in-memory collector is dropped (once with a reading taken but never
committed) and rebuilt from the ledger. The oracle is the writer's own count of the matching lines
it wrote (see tests/rotation.py); where logrotate deleted nothing, the matching lines on disk at the
end must equal it too. With copytruncate, which loses lines itself, the oracle is what is on disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from agent import config
from tests.rotation import (
    LOGROTATE,
    Agent,
    HandlerWriter,
    assert_billed_as_on_disk,
    assert_billed_as_written,
    run_scenario,
)

pytestmark = [
    pytest.mark.skipif(
        not os.access(LOGROTATE, os.X_OK),
        reason=f"{LOGROTATE} is not installed (apt-get install logrotate)",
    ),
    pytest.mark.e2e,  # about 6 s each
]


def test_create(tmp_path: Path) -> None:
    assert_billed_as_written(run_scenario(tmp_path, "  create"))


def test_copytruncate(tmp_path: Path) -> None:
    assert_billed_as_on_disk(run_scenario(tmp_path, "  copytruncate"))


def test_copytruncate_with_a_path_glob_that_matches_the_copies(tmp_path: Path) -> None:
    glob = str(tmp_path / "logs" / "access.log*")
    assert_billed_as_on_disk(run_scenario(tmp_path, "  copytruncate", path_option=glob))


def test_compress_without_delaycompress(tmp_path: Path) -> None:
    assert_billed_as_written(run_scenario(tmp_path, "  create\n  compress"))


def test_compress_with_delaycompress(tmp_path: Path) -> None:
    assert_billed_as_on_disk(run_scenario(tmp_path, "  copytruncate\n  compress\n  delaycompress"))


def test_dateext(tmp_path: Path) -> None:
    assert_billed_as_written(
        run_scenario(tmp_path, "  create\n  dateext\n  dateformat -%Y%m%d-%H%M%S")
    )


def test_olddir(tmp_path: Path) -> None:
    def make_old(root: Path) -> None:
        (root / "old").mkdir()

    old = tmp_path / "old"
    assert_billed_as_written(
        run_scenario(
            tmp_path,
            f"  create\n  compress\n  olddir {old}",
            extra_options=f", rotated: '{old}/*'",
            prepare=make_old,
            disk=("logs", "old"),
        )
    )


def test_symlinked_path_follows_rotation_in_the_real_folder(tmp_path: Path) -> None:
    link_dir = tmp_path / "current"

    def make_link(root: Path) -> None:
        link_dir.mkdir()
        (link_dir / "app.log").symlink_to(root / "logs" / "access.log")

    assert_billed_as_written(
        run_scenario(tmp_path, "  create", path_option=str(link_dir / "app.log"), prepare=make_link)
    )


def test_rotating_file_handler_rolls_over_several_times_between_readings(tmp_path: Path) -> None:
    outcome = run_scenario(tmp_path, None, writer_cls=HandlerWriter, seconds=5.0, interval=1.0)
    copies = list((tmp_path / "logs").glob("access.log.*"))
    assert len(copies) >= 20  # several rollovers between two readings
    assert_billed_as_written(outcome, min_rotations=0)


@pytest.mark.parametrize(
    "rotate_conf",
    ["  create", "  create\n  compress", "  create\n  compress\n  delaycompress"],
    ids=["create", "compress", "delaycompress"],
)
def test_rotations_racing_the_readings(tmp_path: Path, rotate_conf: str) -> None:
    """logrotate shifting every copy's name (.1 -> .2, .2.gz -> .3.gz, ...) while a reading lists,
    opens and reads them. (Not copytruncate: a reading inside its copy-to-truncate window bills
    lines the truncate then removes, as docs/log-files.md says.)"""
    assert_billed_as_written(
        run_scenario(tmp_path, rotate_conf, racing=0.3, interval=0.2, rotations=8),
        min_rotations=8,
    )


def test_state_stays_small(tmp_path: Path) -> None:
    """Streams of copies that are gone are forgotten: the saved state is bounded by the disk."""
    run_scenario(tmp_path, "  create\n  compress", seconds=4.0)
    for copy in (tmp_path / "logs").glob("access.log.*"):
        copy.unlink()
    agent = Agent(config.load(tmp_path / "config.yaml"))
    for _ in range(4):
        agent.sample()
    state = agent.ledger.position("api_requests")
    assert state is not None
    assert len(state["collector"]["streams"]) == 1
    shutil.rmtree(tmp_path / "logs")
