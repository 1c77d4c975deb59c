"""Log-line counters: every matching line counted once, across rotation, restarts and crashes.

A file is known by device + inode plus a fingerprint of its first bytes, so rename rotation (the
renamed file is finished before it is let go, like Fluent Bit's rotate_wait), copytruncate (the file
got shorter than the saved offset, or its first bytes changed), delete + recreate and inode reuse
are all told apart. Positions travel in the Reading's state, which the ledger commits in the same
transaction as the count it produced: kill -9 at any moment neither loses nor repeats a line.

Reads are binary, in large blocks, never decoding (bad bytes cannot crash it); a partial last line
waits for its newline; a line longer than `max_line_bytes` is judged by its first bytes and the rest
skipped, so memory stays bounded whatever the file holds.
"""

from __future__ import annotations

import codecs
import glob
import io
import logging
import os
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, ClassVar

from agent.collectors.base import Collector, CollectorError, Reading, SourceMissing, Sources
from agent.collectors.linecount import LineMatcher
from agent.errors import ConfigError
from agent.fields import Enum, Field, Int, Regex, Str

log = logging.getLogger(__name__)

BLOCK = 4 << 20
FINGERPRINT = 128  # bytes
ROTATE_WAIT_READS = 5  # a file that left the glob is followed until this many reads add nothing


class LogCollector(Collector):
    type_name = "log"
    produces = "increment"
    options: ClassVar[Mapping[str, Field]] = {
        "path": Field(Str(r"/.*", hint="expected an absolute path or glob"), required=True,
                      doc="an absolute file path or glob; new matching files are picked up"),
        "pattern": Field(Regex(), required=True, doc="Python regex searched in each line"),
        "mode": Field(Enum(("count", "sum")), default="count",
                      doc="count matching lines, or sum the named group (?P<value>...)"),
        "start_at": Field(Enum(("end", "beginning")), default="end",
                          doc="where to start in files present before any position was saved"),
        "encoding": Field(Str(), default="utf-8", doc="an ASCII-compatible encoding"),
        "max_line_bytes": Field(Int(256, 16 << 20), default=65536,
                                doc="longer lines are judged by their first bytes"),
    }  # fmt: skip

    @classmethod
    def validate(cls, options: dict[str, Any], path: str) -> None:
        encoding = options["encoding"]
        try:
            codecs.lookup(encoding)
            ascii_compatible = "a-\n".encode(encoding) == b"a-\n"
        except (LookupError, UnicodeError):
            raise ConfigError(f"{path}.encoding", f'unknown encoding "{encoding}"') from None
        if not ascii_compatible:
            raise ConfigError(
                f"{path}.encoding", f'"{encoding}" is not ASCII-compatible; use utf-8 or latin-1'
            )
        try:
            options["pattern"].encode(encoding)
        except UnicodeEncodeError:
            raise ConfigError(
                f"{path}.pattern", f'the pattern cannot be written in "{encoding}"'
            ) from None
        if options["mode"] == "sum" and "(?P<value>" not in options["pattern"]:
            raise ConfigError(
                f"{path}.pattern", "mode: sum needs a named group (?P<value>...) holding a number"
            )

    def __init__(self, options: Mapping[str, Any], sources: Sources) -> None:
        super().__init__(options, sources)
        self.glob = self.config["path"]
        self.max_line = int(self.config["max_line_bytes"])
        self.matcher = LineMatcher(
            self.config["pattern"], self.config["mode"], self.config["encoding"]
        )

    def probe(self) -> None:
        if not self._matching_paths():
            raise SourceMissing(f"no file matches {self.glob}")

    def _matching_paths(self) -> list[str]:
        if glob.has_magic(self.glob):
            return sorted(glob.glob(self.glob))
        return [self.glob] if os.path.exists(self.glob) else []

    def read(self, state: dict[str, Any] | None) -> Reading:
        first_run = state is None
        saved: dict[str, dict[str, Any]] = dict((state or {}).get("files", {}))
        found: dict[str, tuple[str, os.stat_result, bool]] = {}  # key -> path, stat, in glob
        for path in self._matching_paths():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if os.path.isfile(path):
                found[_key(st)] = (path, st, True)
        for key, entry in saved.items():
            if key not in found:
                moved = _find_inode(os.path.dirname(entry["path"]), key)
                if moved:
                    found[key] = (moved[0], moved[1], False)
        if not found and not saved:
            raise SourceMissing(f"no file matches {self.glob}")
        total = Decimal(0)
        bad_before = self.matcher.bad_values
        files: dict[str, dict[str, Any]] = {}
        for key, (path, st, in_glob) in sorted(found.items(), key=lambda kv: kv[1][0]):
            try:
                value, entry = self._read_file(path, st, saved.get(key), first_run)
            except FileNotFoundError:
                continue  # gone between the listing and the open: nothing more to read
            except OSError as e:
                raise CollectorError(f"cannot read {path}: {e.strerror}") from None
            total += value
            if in_glob or entry["idle"] < ROTATE_WAIT_READS:
                files[key] = entry
        bad = self.matcher.bad_values - bad_before
        if bad:
            problem = (
                f"{bad} matching line(s) in {self.glob} had a (?P<value>...) that is not a "
                "finite decimal and added 0"
            )
            return Reading(total, {"files": files}, problem)
        return Reading(total, {"files": files})

    def _read_file(
        self, path: str, st: os.stat_result, entry: dict[str, Any] | None, first_run: bool
    ) -> tuple[Decimal, dict[str, Any]]:
        with open(path, "rb", buffering=0) as f:
            head = f.read(FINGERPRINT)
            size = os.fstat(f.fileno()).st_size
            if entry is not None:
                saved_fp = bytes.fromhex(entry["fp"])
                same = head[: len(saved_fp)] == saved_fp and size >= entry["offset"]
                offset = entry["offset"] if same else 0  # else truncated or a reused inode
                skip = bool(entry.get("skip")) if same else False
                idle = entry.get("idle", 0)
            elif first_run and self.config["start_at"] == "end":
                offset, skip = self._end_of_complete_lines(f, size)
                idle = 0
            else:
                offset, skip, idle = 0, False, 0  # appeared later (rotation): from the start
            before = offset
            value, offset, skip = self._consume(f, offset, skip, size)
        return value, {
            "path": path,
            "offset": offset,
            "fp": head.hex(),
            "skip": skip,
            "idle": 0 if offset != before else idle + 1,
        }

    def _end_of_complete_lines(self, f: io.FileIO, size: int) -> tuple[int, bool]:
        window = min(size, self.max_line)
        f.seek(size - window)
        tail = f.read(window)
        nl = tail.rfind(b"\n")
        if nl >= 0:
            return size - window + nl + 1, False
        return size, size > 0  # inside a line longer than the cap: skip its rest

    def _consume(
        self, f: io.FileIO, offset: int, skip: bool, size: int
    ) -> tuple[Decimal, int, bool]:
        """Match complete lines from `offset` up to `size`; returns (value, new offset, skip)."""
        value = Decimal(0)
        remaining = size - offset
        if remaining <= 0:
            return value, offset, skip
        f.seek(offset)
        buf = bytearray(min(BLOCK, remaining) + self.max_line + 1)
        view = memoryview(buf)
        base, have = offset, 0  # file offset of buf[0]; bytes held
        try:
            while remaining > 0:
                n = f.readinto(view[have : have + min(len(buf) - have, remaining)])
                if not n:
                    break
                remaining -= n
                end = have + n
                start = 0
                if skip:
                    nl = buf.find(b"\n", 0, end)
                    if nl < 0:
                        base, have = base + end, 0
                        continue
                    start, skip = nl + 1, False
                last = buf.rfind(b"\n", start, end) + 1
                if last > start:
                    value += self.matcher.scan(buf, start, last)
                else:
                    last = start
                tail = end - last
                if tail > self.max_line:
                    value += self.matcher.match_line(bytes(buf[last : last + self.max_line]))
                    base, have, skip = base + end, 0, True
                    continue
                buf[:tail] = buf[last:end]
                base, have = base + last, tail
        finally:
            view.release()
        return value, base, skip


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def _find_inode(directory: str, key: str) -> tuple[str, os.stat_result] | None:
    """A file we followed that left the glob (renamed by rotation): find it by inode."""
    try:
        entries = list(os.scandir(directory or "."))
    except OSError:
        return None
    for entry in entries:
        try:
            if entry.is_file() and _key(entry.stat()) == key:
                return entry.path, entry.stat()
        except OSError:
            continue
    return None
