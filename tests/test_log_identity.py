"""How the log collector knows a file (agent/collectors/streams.py, evidence.py), tried against the assumptions
it makes about the world: files that begin alike, inodes that come back, a device number that
changes, a symlink switched to another file, a generation deleted before it was read, a read cut
by its deadline, a copy where the collector cannot see it. Rotation is done here with the same
filesystem calls logrotate makes (rename, gzip, unlink, truncate), so each step lands exactly
between two readings; `tests/test_logrotate*.py` drives the real logrotate.

The oracle is always what the test wrote: the matching lines it appended, counted as it wrote them.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.collectors import SourceMissing, Sources, logblocks
from agent.collectors import log as log_module
from agent.collectors.evidence import crc_combine, judge
from agent.collectors.log import MAX_HELD, QUIET, LogCollector
from agent.collectors.logfiles import Files
from agent.collectors.streams import Stream

PATTERN = '"request":"GET /api/'


def collector(path: Path | str, **options: Any) -> LogCollector:
    opts = {
        "path": str(path),
        "pattern": PATTERN,
        "mode": "count",
        "start_at": "beginning",
        "encoding": "utf-8",
        "max_line_bytes": 65536,
        **options,
    }
    LogCollector.validate(opts, "collector")
    return LogCollector(opts, Sources())


class Log:
    """A JSON log whose lines all begin with the same 160 bytes (nginx `escape=json` with the
    constant fields first) and the number that tells them apart last; `written` counts the
    matching lines appended."""

    def __init__(self, path: Path) -> None:
        self.path, self.n, self.written = path, 0, 0

    def line(self) -> bytes:
        self.n += 1
        hit = self.n % 3 != 0
        request = f"GET /api/v1/orders/{self.n}" if hit else f"GET /static/{self.n}.js"
        self.written += hit
        return (
            '{"host":"shop.example.com","proto":"HTTP/1.1","remote":"10.0.0.1",'
            '"agent":"Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",'
            f'"request":"{request}","status":200,"seq":{self.n}}}\n'
        ).encode()

    def write(self, count: int, path: Path | None = None) -> None:
        with open(path or self.path, "ab") as f:
            f.write(b"".join(self.line() for _ in range(count)))


class Tail:
    """Reads like the daemon: each reading's state feeds the next; `restart` drops the collector
    (its open files) as a kill -9 would, keeping the committed state."""

    def __init__(self, make: Any, state: dict | None = None) -> None:
        self.make, self.c, self.state, self.total = make, make(), state, Decimal(0)
        self.unread: list[Any] = []

    def read(self, in_time: Any = None) -> Decimal:
        reading = (
            self.c.read(self.state) if in_time is None else self.c.read_within(self.state, in_time)
        )
        self.state = reading.state
        self.total += reading.value
        self.unread.extend(reading.unread)
        return reading.value

    def restart(self) -> None:
        self.c.close()
        self.c = self.make()


def gzip_file(path: Path, into: Path) -> None:
    """What logrotate's compress does: write NAME.gz, then unlink NAME."""
    with gzip.open(into, "wb") as z:
        z.write(path.read_bytes())
    path.unlink()


def shift(folder: Path, name: str, keep: int) -> None:
    """logrotate's numbered copies: NAME.k(.gz) -> NAME.k+1(.gz), the oldest beyond `keep` gone."""
    for k in range(keep, 0, -1):
        for suffix in ("", ".gz"):
            src = folder / f"{name}.{k}{suffix}"
            if src.exists():
                if k == keep:
                    src.unlink()
                else:
                    src.rename(folder / f"{name}.{k + 1}{suffix}")


def create_rotation(log: Log, keep: int = 30) -> Path:
    """logrotate's `create` rotation in its own order: the numbered copies shifted, NAME renamed
    to NAME.1 and NAME created anew (a new inode: the old one is still in use). Returns NAME.1."""
    folder = log.path.parent
    shift(folder, log.path.name, keep)
    first = folder / f"{log.path.name}.1"
    log.path.rename(first)
    log.path.touch()
    return first


def inside_the_next_scan(monkeypatch: pytest.MonkeyPatch, step: Callable[[], None]) -> Any:
    """Run `step` (a rotation) inside the next reading, once it has scanned the folder for copies
    and before it looks at the names it found (Files._copy_paths), as a racing logrotate would.
    Returns the real scan, which is back in place once the step has run."""
    scan = Files._copy_paths

    def scan_then_step(files: Files, bases: set[str]) -> list[str]:
        names = scan(files, bases)
        monkeypatch.setattr(Files, "_copy_paths", scan)
        step()
        return names

    monkeypatch.setattr(Files, "_copy_paths", scan_then_step)
    return scan


def test_json_logs_that_begin_alike_under_debians_nginx_rotation(tmp_path: Path) -> None:
    """Debian's nginx stanza (rotate 14, compress, delaycompress, create): each rotation renames
    the live file to .1, compresses the previous .1 into .2.gz. Every file and every copy begins
    with the same bytes. Before: a new .gz was taken for the oldest stream that began alike and
    billed again from its offset."""
    log = Log(tmp_path / "access.log")
    log.write(3)
    t = Tail(lambda: collector(log.path))
    t.read()
    for _ in range(20):
        log.write(7)
        t.read()
        log.write(5)  # written after the reading, before the rotation
        shift(tmp_path, "access.log", 14)
        if (tmp_path / "access.log.2").exists():
            gzip_file(tmp_path / "access.log.2", tmp_path / "access.log.2.gz")
        log.path.rename(tmp_path / "access.log.1")
        log.write(2, tmp_path / "access.log.1")  # the application has not reopened yet
        log.path.touch()
        log.write(1)
    for _ in range(3):
        t.read()
    assert t.total == log.written
    assert t.unread == []


@pytest.mark.parametrize("delay", [False, True], ids=["compress", "delaycompress"])
def test_json_logs_rotated_and_compressed_between_readings(tmp_path: Path, delay: bool) -> None:
    """`rotate 2` + `compress`: copies are compressed and deleted faster than they are read; each
    generation that begins alike is still one stream of its own."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(4)
    t.read()
    for i in range(15):
        log.write(6)
        if i % 2:
            t.read()
        log.write(3)
        shift(tmp_path, "access.log", 2)
        plain = tmp_path / "access.log.1"
        log.path.rename(plain)
        log.path.touch()
        if not delay:
            gzip_file(plain, tmp_path / "access.log.1.gz")
        elif (tmp_path / "access.log.2").exists():
            gzip_file(tmp_path / "access.log.2", tmp_path / "access.log.2.gz")
        log.write(2)
    for _ in range(3):
        t.read()
    assert t.total == log.written


def test_a_generation_never_seen_plain_is_read_from_its_copy(tmp_path: Path) -> None:
    """Created, filled, rotated and compressed between two readings: only its .gz is ever seen,
    and it begins like every other generation: it is new content, read whole, once."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(5)
    t.read()
    for k in range(1, 4):
        log.write(5)
        log.path.rename(tmp_path / f"access.log-{k}")
        log.write(9)  # a whole generation between two readings
        gzip_file(log.path, tmp_path / f"access.log-{k}b.gz")
        log.path.touch()
        log.write(2)
        t.read()
        t.read()
    assert t.total == log.written


@pytest.mark.parametrize(
    "gz_name", ["access.log.1.gz", "access.log.0.gz"], ids=["plain_first", "gz_first"]
)
def test_a_generation_first_seen_mid_compress_is_billed_once(tmp_path: Path, gz_name: str) -> None:
    """`create` + `compress`, a generation created and rotated between two readings (a slow
    reading under load), and the next reading lists it while logrotate compresses it: its plain
    `.1` and its finished `.gz` both, before logrotate unlinks the `.1`. Neither is a known
    stream's: the first judged is new content, read whole; the other holds what that read, and
    adds nothing. Before: both were judged before either was read, so each was new content, and
    the generation was billed twice (a real-logrotate race, +447 in CI). Both orders of the
    listing (the `.gz` named to sort first too)."""
    folder = tmp_path / "logs"
    folder.mkdir()
    log = Log(folder / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(5)
    t.read()
    log.write(4)
    create_rotation(log)
    log.write(6)  # a generation no reading sees live
    gzip_file(folder / "access.log.1", folder / "access.log.1.gz")
    create_rotation(log)
    log.write(2)
    with gzip.open(folder / gz_name, "wb") as z:  # compressed, its .1 not unlinked yet
        z.write((folder / "access.log.1").read_bytes())
    t.read()
    (folder / "access.log.1").unlink()
    for _ in range(3):
        t.read()
    assert t.total == log.written
    assert t.unread == []


def test_a_symlink_switched_to_dated_files_finishes_each_target(tmp_path: Path) -> None:
    """`app.log -> app-<n>.log`, replaced atomically (svlogd style, or an application that dates
    its files); some dated files are the target at no reading at all, and lines keep arriving in
    the old target after the switch. No `rotated` needed: the target's dated siblings are
    looked at as copies are."""
    link = tmp_path / "app.log"
    log = Log(tmp_path / "app-0.log")
    log.write(3)
    link.symlink_to(log.path)
    t = Tail(lambda: collector(link))
    t.read()
    for n in range(1, 12):
        log.write(4)
        old = log.path
        log.path = tmp_path / f"app-{n}.log"
        log.write(2)
        tmp = tmp_path / "app.log.new"
        tmp.symlink_to(log.path)
        os.replace(tmp, link)
        log.write(3, old)  # the straggler in the file it left
        t.read()
        if n % 3 == 0:  # this target is replaced before the next reading, after one reading
            log.write(5)
            old, log.path = log.path, tmp_path / f"app-{n}b.log"
            log.write(1)
            tmp.symlink_to(log.path)
            os.replace(tmp, link)
            log.write(2, old)
    for _ in range(2):
        t.read()
    assert t.total == log.written
    assert t.unread == []


def test_a_deleted_generation_is_read_to_its_end_and_let_go(tmp_path: Path) -> None:
    """`rotate 0`: the rotated file is deleted at once. The open descriptor still reads it to its
    end; once that is committed it is closed, so it pins no disk space."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(2)
    t.read()
    for _ in range(5):
        log.write(6)  # never read while the file has a name
        gone = log.path.stat()
        log.path.unlink()
        log.write(3)
        t.read()
        t.read()
        assert (gone.st_dev, gone.st_ino) not in t.c._held
    assert t.total == log.written
    assert t.unread == []
    assert len(t.c._held) == 1


def test_a_deleted_generation_is_not_let_go_before_its_reading_is_committed(
    tmp_path: Path,
) -> None:
    """A reading that drained a deleted file but was never stored (the daemon dropped it) leaves
    the file open: the next reading, from the older state, reads those lines again."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(2)
    t.read()
    log.write(6)
    log.path.unlink()
    log.write(1)
    before = t.state
    assert t.c.read(before).value == 4  # drained, then dropped
    t.read()
    t.read()
    assert t.total == log.written


def test_an_inode_that_comes_back_is_new_content(tmp_path: Path) -> None:
    """A deleted file's inode number is handed to the next file created (ext4 does so at once;
    the collector first lets the deleted one go), the new file beginning with the same bytes:
    it is read from its start, held open or not, and the old one, read to its end, is not
    reported lost."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(3)
    t.read()
    reused = 0
    for k in range(6):
        log.write(4)
        t.read()
        ino = log.path.stat().st_ino
        log.path.unlink()
        t.read()  # drained
        with pytest.raises(SourceMissing):
            t.read()  # and let go: the inode is free, and no file is there
        log.write(2)  # the same first bytes as its predecessor, and maybe its inode
        reused += log.path.stat().st_ino == ino
        if k % 2:
            t.restart()  # nothing held: only the content can tell
        t.read()
    if not reused:
        pytest.skip("this filesystem did not hand an inode number back")
    assert t.total == log.written
    assert t.unread == []


def test_a_device_number_that_changes_across_a_restart_is_the_same_file(tmp_path: Path) -> None:
    """An overlay or a remount gives the filesystem another device number after a restart: the
    inode and the file's own bytes still say it is the same file, read on from its offset."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(5)
    t.read()
    log.write(4)
    t.read()
    t.restart()
    for s in t.state["streams"]:
        s["dev"] += 1000
    log.write(3)
    t.read()
    t.read()
    assert t.total == log.written


def test_a_read_stops_at_its_deadline_and_goes_on_next_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog larger than one read can take within the dimension's timeout: the read stops at
    a line boundary after a block, the position is saved, and the next reading goes on."""
    monkeypatch.setattr(logblocks, "BLOCK", 4096)
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path, max_line_bytes=256))
    log.write(400)
    values = []
    for _ in range(200):
        values.append(t.read(in_time=lambda: False))
        if t.total == log.written:
            break
    assert t.total == log.written
    assert len([v for v in values if v]) > 5  # it took several readings
    assert t.unread == []


def test_lines_in_a_copy_it_cannot_see_are_reported_not_silent(tmp_path: Path) -> None:
    """A restart, then rotation to a name the collector does not look at (`extension .log`:
    access-20261206.log) before its first reading: what was written after the last reading is
    out of sight. It is reported once, with the fix; with `rotated` set it is billed instead."""
    for rotated in (None, str(tmp_path / "access-*.log")):
        folder = tmp_path / ("with" if rotated else "without")
        folder.mkdir()
        log = Log(folder / "access.log")
        opts = {"rotated": rotated.replace(str(tmp_path), str(folder))} if rotated else {}
        t = Tail(lambda log=log, opts=opts: collector(log.path, **opts))
        log.write(3)
        t.read()
        log.write(4)
        t.restart()
        log.path.rename(folder / "access-20261206.log")
        log.path.touch()
        log.write(2)
        for _ in range(4):
            t.read()
        if rotated:
            assert t.total == log.written
            assert t.unread == []
        else:
            assert t.total == log.written - 3  # the 3 of the 4 that matched, out of sight
            assert len(t.unread) == 1
            assert "rotated" in t.unread[0].fix


def restarted_at_an_empty_generation(folder: Path) -> tuple[Log, Tail]:
    """A log in `folder` rotated (`create` + `compress`) after a reading, the new live file read
    empty (to byte 0: nothing to know it by), then the agent restarted (nothing held)."""
    folder.mkdir()
    log = Log(folder / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(5)
    t.read()
    create_rotation(log)
    gzip_file(folder / "access.log.1", folder / "access.log.1.gz")
    t.read()  # the new live file, empty: read to byte 0
    t.restart()
    return log, t


@pytest.mark.parametrize("copies", [1, 0])
def test_an_empty_generation_rotated_during_a_restart_is_billed_from_its_copy(
    tmp_path: Path, copies: int
) -> None:
    """`create` + `compress`: the agent's last committed reading saw the new live file empty (read
    to byte 0: nothing to know it by); the agent restarts, lines are written, logrotate compresses
    it away before the first reading. Its copy is new content, read whole: billed, and not
    reported as unread (CI saw that false report under real logrotate). With `rotate 0` there is
    no copy: the loss is reported."""
    folder = tmp_path / "logs"
    log, t = restarted_at_an_empty_generation(folder)
    before = log.written
    log.write(7)
    in_it = log.written - before
    # logrotate's order: rename, create the new file, compress, unlink (no inode reused)
    create_rotation(log)
    if copies:
        gzip_file(folder / "access.log.1", folder / "access.log.1.gz")
    else:
        (folder / "access.log.1").unlink()
    log.write(2)
    for _ in range(3):
        t.read()
    if copies:
        assert t.total == log.written and t.unread == []
    else:
        assert t.total == log.written - in_it  # the matching lines went with the file
        assert len(t.unread) == 1 and "read to byte 0" in t.unread[0].what


def test_an_empty_generation_a_listing_missed_is_not_read_again_by_its_inode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's last committed reading saw the new live file C empty (read to byte 0); it
    restarts (nothing held). Its first reading scans the folder, then logrotate renames C to .1,
    creates D and compresses C into .1.gz, then the reading stats the names it scanned: it finds
    D and C's .1.gz, not C's .1. The .gz is new content, read whole, and C is taken as held by it.
    The next reading finds C's .1 still there (logrotate has not unlinked it yet). Before: C was
    still known by its inode and read again from byte 0 (billed twice); now it is known by the
    content read, and its .1 is a copy of it."""
    folder = tmp_path / "logs"
    log, t = restarted_at_an_empty_generation(folder)  # the live file C, read to byte 0
    log.write(7)

    def rotate() -> None:
        create_rotation(log)
        log.write(2)
        with gzip.open(folder / "access.log.1.gz", "wb") as z:  # .1 not unlinked yet
            z.write((folder / "access.log.1").read_bytes())

    scan = inside_the_next_scan(monkeypatch, rotate)
    t.read()
    assert Files._copy_paths is scan  # the rotation did land inside that reading
    t.read()
    (folder / "access.log.1").unlink()
    for _ in range(3):
        t.read()
    assert t.total == log.written
    assert t.unread == []


def test_a_file_renamed_between_the_scan_and_the_look_is_not_reported_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart (nothing held) a reading scans the folder, then logrotate renames the live
    file to .1 and creates a new one, then the reading looks at the names it scanned: the .1 is
    not among them. The file is still there, and the next reading reads it on by its inode: no
    line is lost, so nothing may be reported unread (health not ok). Before: it was reported as
    rotated away before the agent read it to its end."""
    folder = tmp_path / "logs"
    folder.mkdir()
    log = Log(folder / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(5)
    t.read()
    t.restart()
    log.write(7)

    def rotate() -> None:
        create_rotation(log)
        log.write(2)

    scan = inside_the_next_scan(monkeypatch, rotate)
    t.read()
    assert Files._copy_paths is scan  # the rotation did land inside that reading
    t.read()
    gzip_file(folder / "access.log.1", folder / "access.log.1.gz")
    for _ in range(3):
        t.read()
    assert t.total == log.written
    assert t.unread == []


def test_a_truncation_with_no_copy_in_sight_is_reported(tmp_path: Path) -> None:
    """`copytruncate` with `olddir` and no `rotated`: the live file is emptied under the
    collector, and the copy holding its last lines is out of sight."""
    log = Log(tmp_path / "access.log")
    (tmp_path / "old").mkdir()
    t = Tail(lambda: collector(log.path))
    log.write(3)
    t.read()
    log.write(6)
    (tmp_path / "old" / "access.log.1").write_bytes(log.path.read_bytes())
    os.truncate(log.path, 0)
    log.write(2)
    for _ in range(3):
        t.read()
    assert t.total == log.written - 4
    assert len(t.unread) == 1
    assert "copytruncate" in t.unread[0].fix


def test_copytruncate_copy_found_by_content(tmp_path: Path) -> None:
    """The copy is a new file: known by the CRC of everything read before the truncation."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(3)
    t.read()
    for k in range(4):
        log.write(6)
        copy = tmp_path / "access.log.1"
        if copy.exists():
            gzip_file(copy, tmp_path / f"access.log.{k + 2}.gz")
        copy.write_bytes(log.path.read_bytes())
        os.truncate(log.path, 0)
        log.write(2)
        t.read()
    t.read()
    assert t.total == log.written
    assert t.unread == []


def test_a_start_at_the_end_hashes_what_it_skipped_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`start_at: end` on a big log: the bytes skipped are hashed a bounded part per reading
    (billing is not held up meanwhile); once hashed, the file's compressed copy is known."""
    monkeypatch.setattr(log_module, "CATCH_UP", 5000)
    log = Log(tmp_path / "access.log")
    log.write(300)  # before the agent: not billed
    skipped = log.written
    t = Tail(lambda: collector(log.path, start_at="end"))
    t.read()
    for _ in range(12):
        log.write(2)
        t.read()
    (s,) = t.state["streams"]
    assert "base" not in s  # all hashed, joined with what was hashed since
    assert s["crc"] == zlib.crc32(log.path.read_bytes()[: s["off"]])
    log.path.rename(tmp_path / "access.log.1")
    log.path.touch()
    t.read()
    gzip_file(tmp_path / "access.log.1", tmp_path / "access.log.1.gz")
    log.write(3)
    for _ in range(3):
        t.read()
    assert t.total == log.written - skipped


def test_a_position_saved_by_the_previous_version_goes_on_and_knows_its_copy(
    tmp_path: Path,
) -> None:
    """Version 2 knew a file by a hash of its first bytes: after an upgrade the position is kept
    and, once hashed, the file's compressed copy is not billed again."""
    import hashlib

    log = Log(tmp_path / "access.log")
    log.write(5)
    data = log.path.read_bytes()
    st = log.path.stat()
    v2 = {
        "v": 2,
        "streams": [
            {
                "fp": hashlib.blake2b(data[:128], digest_size=16).hexdigest(),
                "fl": 128,
                "off": len(data),
                "skip": False,
                "path": str(log.path),
                "base": str(log.path),
                "ids": {},
                "home": st.st_ino,
            }
        ],
    }
    billed_before = log.written
    t = Tail(lambda: collector(log.path), v2)
    log.write(4)
    t.read()
    log.path.rename(tmp_path / "access.log.1")
    log.path.touch()
    t.read()
    gzip_file(tmp_path / "access.log.1", tmp_path / "access.log.1.gz")
    log.write(2)
    t.read()
    t.read()
    assert t.total == log.written - billed_before


def test_files_held_open_stay_bounded(tmp_path: Path) -> None:
    """dateext without compression keeps every copy plain and on disk: renamed copies read to
    their end are closed after QUIET quiet readings, and never more than MAX_HELD are open."""
    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    log.write(2)
    t.read()
    for k in range(MAX_HELD + 20):
        log.write(1)
        log.path.rename(tmp_path / f"access.log-{k:04d}")
        log.path.touch()
        t.read()
        assert len(t.c._held) <= MAX_HELD
    for _ in range(QUIET + 1):
        t.read()
    assert len(t.c._held) == 1  # the live file
    assert t.total == log.written
    assert len(t.state["streams"]) == MAX_HELD + 21  # one per file still on disk


def test_state_with_thirty_compressed_copies_stays_small(tmp_path: Path) -> None:
    import json

    log = Log(tmp_path / "access.log")
    t = Tail(lambda: collector(log.path))
    for _k in range(40):
        log.write(20)
        t.read()
        shift(tmp_path, "access.log", 30)
        log.path.rename(tmp_path / "access.log.1")
        log.path.touch()
        t.read()
        gzip_file(tmp_path / "access.log.1", tmp_path / "access.log.1.gz")
    for _ in range(4):
        t.read()
    assert t.total == log.written
    assert len(t.state["streams"]) == 31  # the live file and one per copy still on disk
    assert len(json.dumps(t.state)) < 31 * 400


def test_judge_parts_files_at_the_first_byte_that_differs() -> None:
    """Two streams whose first 10,000 bytes are the same; the candidate holds the second."""
    import io

    common = b"x" * 10_000
    a, b = common + b"A" * 500, common + b"B" * 700
    sa = Stream(1, off=len(a), ck=len(a), crc=zlib.crc32(a))
    sb = Stream(2, off=len(b), ck=len(b), crc=zlib.crc32(b))
    sa.points = [(4096, zlib.crc32(a[:4096]))]
    sb.points = [(4096, zlib.crc32(b[:4096]))]
    verdict = judge(io.BytesIO(b + b"more\n"), None, [sa, sb])
    assert verdict is not None and verdict.stream is sb and verdict.full
    assert judge(io.BytesIO(common + b"C" * 800), None, [sa, sb]) is None


def test_crc_combine_joins_two_parts() -> None:
    for a, b in [(b"", b"x"), (b"abc", b""), (os.urandom(999), os.urandom(77_777))]:
        assert crc_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_a_reload_keeps_the_files_a_log_dimension_holds_open(tmp_path: Path) -> None:
    """`systemctl reload` with the dimension unchanged: the same collector goes on, its deleted
    generation still held and read to its end; a dimension whose pattern changed gets a new
    collector, and the old one lets its files go."""
    from agent import config
    from agent.collecting.sampling import Sampler

    log = Log(tmp_path / "access.log")
    log.write(3)
    before = log.written  # start_at: end

    def load(pattern: str) -> config.Config:
        path = tmp_path / "config.yaml"
        path.write_text(
            f"product_code: abcd1234efgh5678ijkl90mn\nstate_dir: {tmp_path / 'state'}\n"
            "dimensions:\n  - name: api\n"
            f"    collector: {{type: log, path: '{log.path}', pattern: '{pattern}'}}\n"
        )
        return config.load(path)

    cfg = load(PATTERN)
    old = Sampler(cfg)
    dim = cfg.dimensions[0]
    first = old.take(dim, 0.0, None)
    log.write(6)
    log.path.unlink()  # deleted before the next reading: only the open file has its lines
    same = Sampler(load(PATTERN))
    same.carry_over(old)
    assert same.collectors["api"] is old.collectors["api"]
    assert same.take(dim, 1.0, first.state).value == log.written - before
    log.write(1)
    changed = Sampler(load(PATTERN.replace("GET", "POST")))
    kept = same.collectors["api"]
    changed.carry_over(same)
    assert changed.collectors["api"] is not kept
    assert kept._held == {}  # type: ignore[attr-defined]


def test_a_compressed_copy_gzip_has_only_begun_is_never_read_as_text(tmp_path: Path) -> None:
    """logrotate's compress creates NAME.1.gz empty, then gzip writes it: a reading between the
    two must not follow that file as a plain stream, or its compressed bytes are read as lines
    once written (with a pattern that matches any line, garbage billed). It is left for a later
    reading, which knows it as the copy it is."""
    folder = tmp_path / "logs"
    folder.mkdir()
    log = Log(folder / "access.log")
    t = Tail(lambda: collector(log.path, pattern="."))  # every line counts
    lines = 0
    with open(log.path, "ab") as f:
        f.write(b"".join(log.line() for _ in range(200)))
    lines += 200
    t.read()
    create_rotation(log)
    (folder / "access.log.1.gz").touch()  # gzip has opened its output, written nothing yet
    t.read()
    gzip_file(folder / "access.log.1", folder / "access.log.1.gz")
    for _ in range(3):
        t.read()
    assert t.total == lines and t.unread == []
