"""The log collector against Debian's real `logrotate`, a fast writer and simulated kill -9.

Each scenario: a writer appends about 2,000 lines a second (unique, half of them matching), the
real `logrotate -f` rotates every ~1.2 s with one configuration, and the collector is read through
the real sampling and ledger path (positions committed with their samples). Three times in the
run the agent "dies": the in-memory collector is dropped (once with a reading taken but never
committed) and rebuilt from the ledger. The oracle: the matching lines in every file on disk at the
end (live file and every copy, decompressed), counted line by line, equal the ledger's total.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from agent import config
from agent.ledger import Ledger
from agent.sampling import Sampler
from tests.conftest import PRODUCT
from tests.rotation import LOGROTATE, PATTERN, RATE, Writer, line, on_disk

pytestmark = pytest.mark.skipif(
    not os.access(LOGROTATE, os.X_OK),
    reason=f"{LOGROTATE} is not installed (apt-get install logrotate)",
)
T0 = 1_800_000_000.0  # sample instants: one hour, one second apart


class HandlerWriter(threading.Thread):
    """Python's RotatingFileHandler: rolls over by itself, several times between two readings."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.stop, self.n = path, threading.Event(), 0

    def run(self) -> None:
        handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=20_000, backupCount=500)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.Logger(f"writer-{id(self)}")
        logger.addHandler(handler)
        start = time.monotonic()
        while not self.stop.is_set():
            due = max(int((time.monotonic() - start) * RATE), self.n + 1)
            for i in range(self.n, due):
                logger.info(line(i).rstrip("\n"))
            self.n = due
            time.sleep(0.005)
        handler.close()


class Rotator(threading.Thread):
    """Runs the real logrotate: at the scenario's call, or on its own every `every` seconds."""

    def __init__(self, root: Path, conf: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.root, self.conf, self.every = root, conf, every
        self.stop, self.rotations = threading.Event(), 0

    def rotate(self) -> None:
        subprocess.run(
            [LOGROTATE, "-f", "-s", str(self.root / "logrotate.state"), str(self.conf)],
            check=True,
            capture_output=True,
        )

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.rotate()
            self.rotations += 1


class Agent:
    """The daemon's sampling path without the scheduler: Sampler.take, then Ledger.record_sample
    with the position, in one transaction. `kill9` drops everything held in memory."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg, self.dim, self.i = cfg, cfg.dimensions[0], 0
        self.start()

    def start(self) -> None:
        self.ledger = Ledger(self.cfg.state_dir)
        self.sampler = Sampler(self.cfg)

    def sample(self, commit: bool = True) -> None:
        self.i += 1
        t = T0 + self.i
        s = self.sampler.take(self.dim, t, self.ledger.position(self.dim.name))
        assert s.error is None or s.error.startswith("source missing"), s.error
        if commit and s.value is not None:
            self.ledger.record_sample(self.dim.name, t, s.value, 1.0, s.state, carry=True)

    def kill9(self) -> None:
        self.ledger.close()
        self.start()

    def billed(self) -> Decimal:
        with self.ledger.transaction() as db:
            return sum((p.value for p in self.ledger.points(db, self.dim.name, T0)), Decimal(0))


def run_scenario(
    tmp_path: Path,
    rotate_conf: str | None,
    extra_options: str = "",
    live: str = "logs/access.log",
    path_option: str | None = None,
    writer_cls: type[threading.Thread] = Writer,
    seconds: float = 6.0,
    interval: float = 0.25,
    prepare: Callable[[Path], None] | None = None,
    racing: float = 0.0,
) -> tuple[int, Decimal, int]:
    """`racing`: logrotate runs on its own every `racing` seconds, so that rotations land in the
    middle of readings (otherwise it runs between two readings)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    if prepare:
        prepare(tmp_path)
    log = tmp_path / live
    log.write_text(line(-1) + line(-2))  # present at the first reading: start_at end skips it
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n"
        "dimensions:\n  - name: api_requests\n"
        f"    collector: {{type: log, path: '{path_option or log}', pattern: '{PATTERN}'"
        f"{extra_options}}}\n"
    )
    agent = Agent(config.load(cfg_file))
    agent.sample()
    skipped = on_disk(logs)
    conf = tmp_path / "logrotate.conf"
    if rotate_conf is not None:
        conf.write_text(f"{log} {{\n  rotate 500\n  missingok\n  nocompress\n{rotate_conf}\n}}\n")
    writer = writer_cls(log)
    writer.start()  # type: ignore[attr-defined]
    rotator = Rotator(tmp_path, conf, racing)
    if racing:
        rotator.start()
    start = time.monotonic()
    next_rotation, kills, rotations = start + 1.0, [1.7, 3.1, 4.4], 0
    try:
        while time.monotonic() - start < seconds:
            time.sleep(interval)
            now = time.monotonic() - start
            if kills and now >= kills[0]:
                kills.pop(0)
                if len(kills) == 1:
                    agent.sample(commit=False)  # read, then die before the commit
                agent.kill9()
            if rotate_conf is not None and not racing and time.monotonic() >= next_rotation:
                rotator.rotate()
                rotations += 1
                next_rotation = time.monotonic() + 1.2
            agent.sample()
    finally:
        rotator.stop.set()
        if racing:
            rotator.join()
            rotations = rotator.rotations
        writer.stop.set()  # type: ignore[attr-defined]
        writer.join()  # type: ignore[attr-defined]
    for _ in range(2):
        agent.sample()
    return on_disk(logs) - skipped, agent.billed(), rotations


def assert_exact(result: tuple[int, Decimal, int], min_rotations: int = 3) -> None:
    expected, billed, rotations = result
    assert rotations >= min_rotations
    assert expected > 3000  # the writer really wrote
    assert billed == expected


def test_create(tmp_path: Path) -> None:
    assert_exact(run_scenario(tmp_path, "  create"))


def test_copytruncate(tmp_path: Path) -> None:
    assert_exact(run_scenario(tmp_path, "  copytruncate"))


def test_copytruncate_with_a_path_glob_that_matches_the_copies(tmp_path: Path) -> None:
    glob = str(tmp_path / "logs" / "access.log*")
    assert_exact(run_scenario(tmp_path, "  copytruncate", path_option=glob))


def test_compress_without_delaycompress(tmp_path: Path) -> None:
    assert_exact(run_scenario(tmp_path, "  create\n  compress"))


def test_compress_with_delaycompress(tmp_path: Path) -> None:
    assert_exact(run_scenario(tmp_path, "  copytruncate\n  compress\n  delaycompress"))


def test_dateext(tmp_path: Path) -> None:
    assert_exact(run_scenario(tmp_path, "  create\n  dateext\n  dateformat -%Y%m%d-%H%M%S"))


def test_olddir(tmp_path: Path) -> None:
    def make_old(root: Path) -> None:
        (root / "old").mkdir()

    old = tmp_path / "old"
    expected, billed, rotations = run_scenario(
        tmp_path,
        f"  create\n  compress\n  olddir {old}",
        extra_options=f", rotated: '{old}/*'",
        prepare=make_old,
    )
    expected += on_disk(old)
    assert_exact((expected, billed, rotations))


def test_symlinked_path_follows_rotation_in_the_real_folder(tmp_path: Path) -> None:
    link_dir = tmp_path / "current"

    def make_link(root: Path) -> None:
        link_dir.mkdir()
        (link_dir / "app.log").symlink_to(root / "logs" / "access.log")

    assert_exact(
        run_scenario(tmp_path, "  create", path_option=str(link_dir / "app.log"), prepare=make_link)
    )


def test_rotating_file_handler_rolls_over_several_times_between_readings(tmp_path: Path) -> None:
    expected, billed, _ = run_scenario(
        tmp_path, None, writer_cls=HandlerWriter, seconds=5.0, interval=1.0
    )
    copies = list((tmp_path / "logs").glob("access.log.*"))
    assert len(copies) >= 20  # several rollovers between two readings
    assert billed == expected


@pytest.mark.parametrize(
    "rotate_conf",
    ["  create", "  create\n  compress", "  create\n  compress\n  delaycompress"],
    ids=["create", "compress", "delaycompress"],
)
def test_rotations_racing_the_readings(tmp_path: Path, rotate_conf: str) -> None:
    """logrotate shifting every copy's name (.1 -> .2, .2.gz -> .3.gz, ...) while a reading lists,
    opens and reads them. (Not copytruncate: a reading inside its copy-to-truncate window bills
    lines the truncate then removes, as the README says.)"""
    assert_exact(run_scenario(tmp_path, rotate_conf, racing=0.3, interval=0.2), min_rotations=8)


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
