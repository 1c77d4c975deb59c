"""The log collector counts every matching line exactly once, whatever happens to the file."""

from __future__ import annotations

import os
import tracemalloc
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.collectors import Sources, logfiles
from agent.collectors.log import FORGET_AFTER, LogCollector
from agent.errors import ConfigError
from tests.conftest import run_cli

HIT = b'10.0.0.1 "GET /api/v1/orders HTTP/1.1" 200\n'
MISS = b'10.0.0.2 "GET /static/app.js HTTP/1.1" 200\n'


def collector(path: Path | str, **options: Any) -> LogCollector:
    opts = {
        "path": str(path),
        "pattern": '"(GET|POST) /api/',
        "mode": "count",
        "start_at": "beginning",
        "encoding": "utf-8",
        "max_line_bytes": 65536,
        **options,
    }
    LogCollector.validate(opts, "collector")
    return LogCollector(opts, Sources())


class Tail:
    """Reads like the daemon does: each reading's state feeds the next."""

    def __init__(self, c: LogCollector, state: dict | None = None) -> None:
        self.c, self.state = c, state

    def read(self) -> Decimal:
        reading = self.c.read(self.state)
        self.state = reading.state
        return reading.value


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_start_at_beginning_and_end(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT * 3 + MISS)
    assert Tail(collector(log)).read() == 3
    end = Tail(collector(log, start_at="end"))
    assert end.read() == 0
    append(log, HIT)
    assert end.read() == 1


def test_start_at_end_counts_a_partial_line_once_completed(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT + HIT[:10])
    t = Tail(collector(log, start_at="end"))
    assert t.read() == 0
    append(log, HIT[10:])
    assert t.read() == 1


def test_partial_lines_wait_for_their_newline(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT[:20])
    t = Tail(collector(log))
    assert t.read() == 0
    append(log, HIT[20:-1])
    assert t.read() == 0
    append(log, b"\n" + HIT)
    assert t.read() == 2
    assert t.read() == 0


def test_rename_rotation_finishes_the_old_file(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT)
    t = Tail(collector(log))
    assert t.read() == 1
    append(log, HIT * 2)  # written after the last read, before rotation
    log.rename(tmp_path / "access.log.1")
    log.write_bytes(HIT * 4)  # the new file
    assert t.read() == 6
    append(tmp_path / "access.log.1", HIT)  # a straggler written through the old handle
    assert t.read() == 1
    assert len(t.state["streams"]) == 2
    (tmp_path / "access.log.1").unlink()
    for _ in range(FORGET_AFTER):
        assert t.read() == 0
    assert len(t.state["streams"]) == 1  # the copy is gone from disk: its stream is let go


def test_rename_rotation_across_a_restart(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT)
    state = Tail(collector(log)).c.read(None).state
    append(log, HIT * 2)
    log.rename(tmp_path / "access.log.1")
    log.write_bytes(HIT)
    assert Tail(collector(log), state).read() == 3  # a new process finds the renamed file by inode


def test_copytruncate(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT * 5)
    t = Tail(collector(log))
    assert t.read() == 5
    with open(log, "r+b") as f:  # copytruncate: the same inode, emptied
        f.truncate(0)
    append(log, HIT * 2)
    assert t.read() == 2


def test_copytruncate_refilled_past_the_old_offset(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT * 2)
    t = Tail(collector(log))
    assert t.read() == 2
    with open(log, "r+b") as f:
        f.truncate(0)
    append(log, MISS + HIT * 3)  # longer than before: only the fingerprint tells
    assert t.read() == 3


def test_delete_and_recreate(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT * 2)
    t = Tail(collector(log))
    assert t.read() == 2
    log.unlink()
    keep = tmp_path / "keep"  # make the old inode number unlikely to come straight back
    keep.write_bytes(b"x")
    log.write_bytes(HIT * 3)
    assert t.read() == 3


def test_a_position_saved_by_the_previous_version_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT * 2 + MISS)
    st = os.stat(log)
    key = f"{st.st_dev}:{st.st_ino}"
    # version 1 kept positions by inode, with the first bytes in hex
    state = {
        "files": {
            key: {"path": str(log), "offset": len(HIT), "fp": HIT.hex(), "skip": False, "idle": 0}
        }
    }
    assert Tail(collector(log), state).read() == 1


def test_inode_reuse_is_caught_by_the_fingerprint(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(MISS * 2 + HIT * 2)
    st = os.stat(log)
    key = f"{st.st_dev}:{st.st_ino}"
    # a saved position for this very inode, but for a file that began differently
    state = {
        "files": {
            key: {"path": str(log), "offset": 10, "fp": HIT[:40].hex(), "skip": False, "idle": 0}
        }
    }
    assert Tail(collector(log), state).read() == 2


def test_glob_picks_up_new_files_from_their_start(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(HIT)
    t = Tail(collector(tmp_path / "*.log", start_at="end"))
    assert t.read() == 0
    (tmp_path / "b.log").write_bytes(HIT * 2)  # appeared after the first reading
    append(tmp_path / "a.log", HIT)
    assert t.read() == 3


def test_huge_lines_are_capped_and_counted_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    huge = b'"GET /api/' + b"x" * (8 << 20)
    log.write_bytes(HIT + huge + b"\n" + MISS + b"y" * (3 << 20) + b"\n" + HIT)
    tracemalloc.start()
    value = Tail(collector(log, max_line_bytes=4096)).read()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert value == 3
    assert peak < 12 << 20  # bounded by the block size, not the 11 MiB of lines


def test_a_huge_line_still_growing_is_counted_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b'"POST /api/' + b"z" * 10000)
    t = Tail(collector(log, max_line_bytes=1024))
    assert t.read() == 1
    append(log, b"z" * 10000)
    assert t.read() == 0
    append(log, b"\n" + HIT)
    assert t.read() == 1


def test_undecodable_bytes_never_crash(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(b"\xff\xfe\x00garbage\n" + HIT + b'\xc3\x28 "GET /api/x\n')
    assert Tail(collector(log)).read() == 2


def test_sum_mode(tmp_path: Path) -> None:
    log = tmp_path / "jobs.log"
    log.write_bytes(b"job done rows=10\njob done rows=2.5\nother rows=99\njob done rows=oops\n")
    c = collector(log, pattern=r"job done rows=(?P<value>\S+)", mode="sum")
    reading = c.read({"files": {}})  # a known log: read from its start
    assert reading.value == Decimal("12.5")
    assert reading.problem is not None and reading.problem.startswith("1 matching line(s)")
    append(log, b"job done rows=nan\njob done rows=1e61\njob done rows=4\n")
    reading = c.read(reading.state)
    assert reading.value == 4  # the lines that are numbers are billed; the position moves on
    assert reading.problem is not None and reading.problem.startswith("2 matching line(s)")
    assert c.read(reading.state).problem is None


def test_patterns_that_could_span_lines_stay_per_line(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"start\nend\nstart end\n")
    assert Tail(collector(log, pattern=r"start\s+end")).read() == 1
    assert Tail(collector(log, pattern=r"^start$")).read() == 1
    assert Tail(collector(log, pattern=r"(?i)START")).read() == 2


def test_missing_source(tmp_path: Path) -> None:
    from agent.collectors import SourceMissing

    c = collector(tmp_path / "nope.log", start_at="end")
    with pytest.raises(SourceMissing):
        c.probe()
    first = c.read(None)  # the first reading marks the dimension as sampled, with no file
    assert first.value == 0 and first.state is not None
    with pytest.raises(SourceMissing):
        c.read(first.state)


def test_a_file_that_appears_after_the_first_reading_is_read_from_its_start(
    tmp_path: Path,
) -> None:
    log = tmp_path / "late.log"
    t = Tail(collector(log, start_at="end"))
    assert t.read() == 0  # the product has not started yet
    log.write_bytes(HIT * 10 + MISS)
    assert t.read() == 10
    restarted = Tail(collector(tmp_path / "late2.log", start_at="end"))
    assert restarted.read() == 0
    (tmp_path / "late2.log").write_bytes(HIT * 4)
    assert Tail(collector(tmp_path / "late2.log", start_at="end"), restarted.state).read() == 4


def test_copies_present_at_the_first_reading_are_not_billed(tmp_path: Path) -> None:
    import gzip

    log = tmp_path / "access.log"
    (tmp_path / "access.log.1").write_bytes(HIT * 5)
    with gzip.open(tmp_path / "access.log.2.gz", "wb") as z:
        z.write(b"old " + HIT * 7)
    log.write_bytes(HIT * 3)
    t = Tail(collector(log))
    assert t.read() == 3  # start_at: beginning is about the live file, not its archives
    append(log, HIT)
    assert t.read() == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "sum"}, "mode: sum needs a named group (?P<value>...)"),
        ({"encoding": "utf-16"}, "not ASCII-compatible"),
        ({"encoding": "klingon"}, 'unknown encoding "klingon"'),
    ],
)
def test_option_errors(tmp_path: Path, options: dict, message: str) -> None:
    opts = {
        "path": "/x",
        "pattern": "a",
        "mode": "count",
        "start_at": "end",
        "encoding": "utf-8",
        "max_line_bytes": 65536,
        **options,
    }
    with pytest.raises(ConfigError) as info:
        LogCollector.validate(opts, "dimensions[0].collector")
    assert message in str(info.value)


def test_sample_command_counts_the_whole_file_with_start_at_beginning(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(HIT * 7 + MISS * 3)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"""product_code: abcd1234efgh5678ijkl90mn
state_dir: {tmp_path / "state"}
dimensions:
  - name: api_requests
    collector: {{type: log, path: {log}, pattern: '"(GET|POST) /api/', start_at: beginning}}
"""
    )
    result = run_cli("sample", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("api_requests 7  (raw 7, sum)")
    assert "log: 10 lines read, 7 matched" in result.stdout
    assert not (tmp_path / "state").exists()  # sample writes no state


def test_sample_shows_the_billed_units_after_scale_and_rounding(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes((HIT * 3 + MISS) * 5)
    config = tmp_path / "c.yaml"
    config.write_text(
        f"""product_code: abcd1234efgh5678ijkl90mn
state_dir: {tmp_path / "state"}
dimensions:
  - name: api_requests
    collector: {{type: log, path: {log}, pattern: '"(GET|POST) /api/', start_at: beginning}}
    scale: 0.001
    rounding: up
"""
    )
    result = run_cli("sample", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "billed units 0.015 (scale 0.001)" in result.stdout
    assert "an hour of only this reading sends 1 (rounding up)" in result.stdout
    assert "log: 20 lines read, 15 matched" in result.stdout


def lines(start: int, n: int) -> bytes:
    """Unique lines, every other one matching (real logs differ from line to line)."""
    return b"".join(
        (b'%d "GET /api/v1/orders/%d"\n' if i % 2 else b'%d "GET /static/%d"\n') % (i, i)
        for i in range(start, start + n)
    )


def copytruncate(log: Path, copy: Path) -> None:
    copy.write_bytes(log.read_bytes())
    with open(log, "r+b") as f:
        f.truncate(0)


def test_copytruncate_twice_between_readings_with_the_older_copy_compressed(
    tmp_path: Path,
) -> None:
    import gzip

    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 10))
    t = Tail(collector(log))
    assert t.read() == 5
    append(log, lines(10, 10))  # 5 more, not yet read when the first copytruncate comes
    copytruncate(log, tmp_path / "access.log.1")
    append(log, lines(20, 30))  # 15, in a file created and rotated away between two readings
    (tmp_path / "access.log.1").rename(tmp_path / "access.log.2")
    with gzip.open(tmp_path / "access.log.2.gz", "wb") as z:
        z.write((tmp_path / "access.log.2").read_bytes())
    (tmp_path / "access.log.2").unlink()
    copytruncate(log, tmp_path / "access.log.1")
    append(log, lines(50, 4))  # 2
    assert t.read() == 5 + 15 + 2
    assert t.read() == 0


def test_a_glob_over_the_copies_counts_each_line_once(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 10))
    t = Tail(collector(tmp_path / "access.log*"))
    assert t.read() == 5
    append(log, lines(10, 4))
    copytruncate(log, tmp_path / "access.log.1")
    append(log, lines(14, 6))
    assert t.read() == 2 + 3
    (tmp_path / "access.log.1").rename(tmp_path / "access.log-20261127")
    assert t.read() == 0


def test_finishes_a_file_from_its_gzip_copy(tmp_path: Path) -> None:
    import gzip

    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 10))
    t = Tail(collector(log))
    assert t.read() == 5
    append(log, lines(10, 10))
    with gzip.open(tmp_path / "access.log.1.gz", "wb") as z:  # compress without delaycompress
        z.write(log.read_bytes())
    log.unlink()
    log.write_bytes(lines(20, 2))
    assert t.read() == 5 + 1
    assert t.read() == 0


def test_a_symlinked_path_is_followed_to_where_rotation_happens(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "app.log").write_bytes(lines(0, 4))
    link = tmp_path / "current.log"
    link.symlink_to(real / "app.log")
    t = Tail(collector(link))
    assert t.read() == 2
    append(real / "app.log", lines(4, 6))
    (real / "app.log").rename(real / "app.log.1")
    (real / "app.log").write_bytes(lines(10, 2))
    assert t.read() == 3 + 1


def test_check_fails_a_log_dimension_whose_file_is_missing(tmp_path: Path, emulator) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"""product_code: abcd1234efgh5678ijkl90mn
state_dir: {tmp_path / "state"}
metering: {{endpoint_url: "{emulator.url}"}}
dimensions:
  - name: api_requests
    collector: {{type: log, path: {tmp_path / "nope.log"}, pattern: x}}
"""
    )
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    result = run_cli("check", "-c", str(config), env=env)
    assert result.returncode == 69
    assert "fail  collector api_requests: source missing: no file matches" in result.stdout


def test_state_stays_bounded_under_repeated_truncation(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 4))
    t = Tail(collector(log))
    total = t.read()
    for k in range(1, 12):
        with open(log, "r+b") as f:
            f.truncate(0)
        append(log, lines(k * 100, 4))
        total += t.read()
    assert total == 2 * 12
    assert len(t.state["streams"]) <= FORGET_AFTER


def test_rotated_names_copies_that_the_path_glob_also_matches(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_bytes(lines(0, 4))
    (tmp_path / "app-20261126.log").write_bytes(lines(100, 10))  # yesterday's: history
    t = Tail(collector(tmp_path / "*.log", rotated=str(tmp_path / "app-*.log")))
    assert t.read() == 2
    append(log, lines(4, 4))
    log.rename(tmp_path / "app-20261127.log")  # logrotate dateext with `extension .log`
    log.write_bytes(lines(8, 2))
    assert t.read() == 2 + 1
    assert t.read() == 0


def test_a_damaged_compressed_copy_never_stops_the_count(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 4))
    t = Tail(collector(log))
    assert t.read() == 2
    (tmp_path / "access.log.3.bz2").write_bytes(b"BZh9" + b"\x00" * 100)
    (tmp_path / "access.log.2.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 60)
    append(log, lines(4, 4))
    assert t.read() == 2


class Rollovers:
    """Python's RotatingFileHandler rolling the log over at a chosen point inside a reading:
    right before the collector's N-th filesystem call (stat, scandir, open). Sweeping N puts the
    renames between every two steps of a reading (listing, stat, fingerprint, read) in turn,
    without relying on load or timing."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, log: Path) -> None:
        self.log, self.next, self.at, self.calls, self.fired = log, 1000, 0, 0, False
        self.every_open = self.next_open = False
        for name in ("stat", "scandir"):
            monkeypatch.setattr(os, name, self._hooked(getattr(os, name)))
        monkeypatch.setattr(logfiles, "open", self._hooked(open, opens=True), raising=False)

    def _hooked(self, call: Any, opens: bool = False) -> Any:
        def hooked(*args: Any, **kwargs: Any) -> Any:
            if self.at:
                self.calls += 1
                if self.calls == self.at:
                    self.at, self.fired = 0, True
                    self.roll_over()
            elif opens and (self.every_open or self.next_open):
                self.next_open = False
                self.roll_over()
            return call(*args, **kwargs)

        return hooked

    def arm(self, at: int) -> None:
        """Roll over before the at-th filesystem call of the next reading (0: never)."""
        self.at, self.calls = at, 0

    def roll_over(self) -> None:
        """access.log.K -> access.log.K+1 from the oldest down, access.log -> access.log.1, a new
        access.log with a few lines (what doRollover does, then the next records)."""
        prefix = self.log.name + "."
        numbers = [
            int(n[len(prefix) :]) for n in os.listdir(self.log.parent) if n.startswith(prefix)
        ]
        for k in sorted(numbers, reverse=True):
            os.rename(f"{self.log}.{k}", f"{self.log}.{k + 1}")
        os.rename(self.log, f"{self.log}.1")
        self.log.write_bytes(lines(self.next, 4))
        self.next += 4

    def write(self, n: int) -> None:
        append(self.log, lines(self.next, n))
        self.next += n


def matching_on_disk(folder: Path) -> int:
    return sum(p.read_bytes().count(b'"GET /api/') for p in folder.iterdir())


def test_rollovers_between_any_two_steps_of_a_reading_bill_each_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race in every reading (enough readings in a row for a stream to be forgotten),
    then quiet readings: the total equals what is on disk, for every point of the race."""
    at = 0
    while True:
        at += 1
        folder = tmp_path / str(at)
        folder.mkdir()
        log = folder / "access.log"
        log.write_bytes(lines(0, 6))
        churn = Rollovers(monkeypatch, log)
        t = Tail(collector(log))
        total, fired = t.read(), False
        for _ in range(FORGET_AFTER + 1):
            churn.write(6)
            churn.roll_over()  # a copy made between readings, read from its start
            churn.write(6)
            churn.arm(at)
            total += t.read()
            fired |= churn.fired
        churn.arm(0)
        total += t.read() + t.read()
        assert total == matching_on_disk(folder), f"rollover before filesystem call {at}"
        monkeypatch.undo()
        if not fired:
            break  # past the last filesystem call of a reading: every point was tried
    assert at > 6  # the sweep went through the listing's scandir and stats and the opens


def test_a_file_renamed_before_every_open_for_several_readings_is_neither_lost_nor_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log rolling over faster than a reading opens its files: no file can be looked into for
    more readings than a stream's grace, yet each stream is kept while its file is on disk."""
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 6))
    churn = Rollovers(monkeypatch, log)
    t = Tail(collector(log))
    total = t.read()
    churn.write(6)
    churn.every_open = True
    for _ in range(FORGET_AFTER + 1):
        total += t.read()
        churn.write(6)
    churn.every_open = False
    total += t.read() + t.read()
    assert total == matching_on_disk(tmp_path)


def test_a_file_renamed_between_the_listing_and_its_open_is_read_where_it_went(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotation shifts names while a reading runs: the file listed is found again by its inode,
    so the lines on disk when a reading starts are billed by that reading, not a later one."""
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 6))
    churn = Rollovers(monkeypatch, log)
    t = Tail(collector(log))
    total = t.read()
    for _ in range(3):
        churn.write(6)
        churn.roll_over()
        churn.write(6)
        before = matching_on_disk(tmp_path)
        churn.next_open = True  # after the listing, before the first file is opened
        total += t.read()
        assert not churn.next_open
        assert total >= before
    total += t.read()
    assert total == matching_on_disk(tmp_path)


def test_a_compressed_copy_is_never_judged_by_another_copys_trailer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two .gz copies trade names between the listing and the look at a trailer; the other one
    states the very size this stream was read to: the stream is still finished from its own."""
    import gzip

    at = 0
    while True:
        at += 1
        folder = tmp_path / str(at)
        folder.mkdir()
        log = folder / "access.log"
        log.write_bytes(lines(0, 10))
        t = Tail(collector(log))
        total = t.read()
        append(log, lines(10, 10))  # 5 more, then compressed away before the next reading
        with gzip.open(folder / "access.log.1.gz", "wb") as z:
            z.write(log.read_bytes())
        log.write_bytes(lines(100, 2))
        with gzip.open(folder / "access.log.2.gz", "wb") as z:  # as long as what was read
            z.write(b"#" * (len(lines(0, 10)) - 1) + b"\n")
        calls = {"n": 0}

        def swap_names(
            path: Any, *args: Any, _at: int = at, _dir: Path = folder, _n: dict = calls, **kw: Any
        ) -> Any:
            _n["n"] += 1
            if _n["n"] == _at:
                os.rename(_dir / "access.log.1.gz", _dir / "swap")
                os.rename(_dir / "access.log.2.gz", _dir / "access.log.1.gz")
                os.rename(_dir / "swap", _dir / "access.log.2.gz")
            return open(path, *args, **kw)

        monkeypatch.setattr(logfiles, "open", swap_names, raising=False)
        total += t.read()
        monkeypatch.undo()
        total += t.read()
        assert total == 5 + 5 + 1, f"names swapped before open {at}"
        if calls["n"] < at:
            break
    assert at > 3


class TruncatedWhileRead:
    """A file handle on which copytruncate (and the application's next lines) lands in the middle
    of the collector's read: the first block comes back short, then the file is copied, emptied
    and written again past where the read goes on."""

    def __init__(self, fh: Any, log: Path) -> None:
        self.fh, self.log, self.done = fh, log, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fh, name)

    def __enter__(self) -> TruncatedWhileRead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def readinto(self, buffer: Any) -> int:
        if self.done or os.fstat(self.fh.fileno()).st_ino != self.log.stat().st_ino:
            return self.fh.readinto(buffer)
        self.done = True
        n = self.fh.readinto(memoryview(buffer)[: len(buffer) // 2])
        copytruncate(self.log, self.log.parent / "access.log.1")
        append(self.log, lines(1000, 300))
        return n


def test_copytruncate_in_the_middle_of_a_read_never_mixes_two_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 10))
    t = Tail(collector(log))
    total = t.read()
    append(log, lines(10, 100))
    handles: list[TruncatedWhileRead] = []

    def opened(*args: Any, **kwargs: Any) -> Any:
        handles.append(TruncatedWhileRead(open(*args, **kwargs), log))  # noqa: SIM115
        return handles[-1]

    monkeypatch.setattr(logfiles, "open", opened, raising=False)
    t = Tail(collector(log), t.state)  # a restart: the file is opened again, through the hook
    total += t.read()
    monkeypatch.undo()
    assert any(h.done for h in handles)
    total += t.read() + t.read()
    assert total == 5 + 50 + 150 == matching_on_disk(tmp_path)


def test_copytruncate_in_the_middle_of_a_read_of_the_held_file_never_mixes_two_contents(
    tmp_path: Path,
) -> None:
    """The same, on the file the collector holds open between readings."""
    log = tmp_path / "access.log"
    log.write_bytes(lines(0, 10))
    t = Tail(collector(log))
    total = t.read()
    append(log, lines(10, 100))
    (held,) = t.c._held.values()
    held.fh = TruncatedWhileRead(held.fh, log)
    total += t.read()
    assert held.fh.done
    total += t.read() + t.read()
    assert total == 5 + 50 + 150 == matching_on_disk(tmp_path)
