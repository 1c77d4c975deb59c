"""Log-line counters: every matching line on disk counted once, whatever rotation did to the file.

A file's content is known by a fingerprint of its first bytes (a hash of up to 128 bytes), not by
its name or inode: the file renamed by `create` rotation, the copy that `copytruncate` leaves, the
`.gz` that `compress` makes of it and the same file moved to an `olddir` all carry the same
fingerprint, so they are one *stream* with one saved offset. Each reading lists the live files
(`path`, symlinks followed to the real folder) and their copies (`NAME.*`, `NAME-*` beside each live
file, and the `rotated` glob), groups them by stream and reads each stream once, from its offset, in
the longest plain file that carries it, or through gzip/bz2/xz when only a compressed copy is left.
A fingerprint never seen before is new content (a late file, or one created and rotated away
between two readings) and is read from its beginning; `start_at` applies only to the live files
present at the dimension's first reading, and copies present then count as already billed.

Positions travel in the Reading's state, which the ledger commits in the same transaction as the
count it produced: kill -9 at any moment neither loses nor repeats a line. The state holds one small
entry per stream still on disk; a stream that no file carries any more is forgotten after a few
readings in which its file is known to be gone or to hold other content (a listing that raced a
rename, or a file renamed away before it could be opened, is no proof: see `_keep`). A file is
recorded as read only when its whole content is behind the stream's offset.

Reads are binary, in large blocks, never decoding (bad bytes cannot crash it); a partial last line
waits for its newline; a line longer than `max_line_bytes` is judged by its first bytes and the rest
skipped, so memory stays bounded whatever the file holds.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import hashlib
import logging
import lzma
import os
import stat
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, ClassVar, Protocol

from agent.aggregate import LabelSet
from agent.collectors.base import (
    MAX_LABEL_SETS,
    Collector,
    CollectorError,
    Reading,
    SourceMissing,
    Sources,
    fold,
)
from agent.collectors.linecount import LineMatcher
from agent.errors import ConfigError
from agent.fields import Enum, Field, Int, Regex, Str

log = logging.getLogger(__name__)

BLOCK = 4 << 20
FINGERPRINT = 128  # bytes
FORGET_AFTER = 3  # readings in a row in which no file carried a stream, before it is forgotten
STATE_VERSION = 2
# Compressed copies are known by their magic bytes, whatever their name.
MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
OPENERS: dict[str, Callable[..., Any]] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
DECOMPRESS_ERRORS = (EOFError, zlib.error, OSError, lzma.LZMAError, ValueError)


class _Readable(Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
    def readinto(self, buffer: Any, /) -> int | None: ...


@dataclass
class ReadStats:
    """What the last reading did, for `sample` (lines are counted only when asked: it costs)."""

    lines: int = 0
    matched: Decimal = Decimal(0)
    files: list[str] = field(default_factory=list)


@dataclass
class _File:
    path: str
    st: os.stat_result
    live: bool
    key: str
    codec: str | None = None
    head: bytes = b""
    stream: dict[str, Any] | None = None
    quick: bool = False  # unchanged since the last reading, which read it to its end
    unopened: bool = False  # its name held another file, or none, when it was to be opened
    opened: str = ""  # where it was found when opened, if a rename moved it since the listing


class LogCollector(Collector):
    type_name = "log"
    produces = "increment"
    options: ClassVar[Mapping[str, Field]] = {
        "path": Field(Str(r"/.*", hint="expected an absolute path or glob"), required=True,
                      doc="an absolute file path or glob; new matching files are picked up"),
        "pattern": Field(Regex(), required=True,
                         doc="Python regex searched in each line, matched in linear time: no"
                             " backreferences, lookarounds, atomic groups or possessive repeats"),
        "mode": Field(Enum(("count", "sum")), default="count",
                      doc="count matching lines, or sum the named group (?P<value>...)"),
        "start_at": Field(Enum(("end", "beginning")), default="end",
                          doc="where to start in the files present at the first reading"),
        "rotated": Field(Str(r"/.*", hint="expected an absolute glob"),
                         doc="where rotated copies go, besides NAME.* and NAME-* (olddir)"),
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
        from agent.collectors.linecount import check_pattern  # (hyperscan: log patterns only)

        try:
            check_pattern(options["pattern"], encoding)
        except ValueError as e:
            raise ConfigError(f"{path}.pattern", str(e)) from None

    def __init__(self, options: Mapping[str, Any], sources: Sources) -> None:
        super().__init__(options, sources)
        self.glob = self.config["path"]
        self.rotated = self.config.get("rotated")
        self.max_line = int(self.config["max_line_bytes"])
        self.matcher = LineMatcher(
            self.config["pattern"], self.config["mode"], self.config["encoding"]
        )
        self.count_lines = False  # `sample` turns it on to report lines read
        self._parts: dict[LabelSet, Decimal] = {}  # this reading's usage per label set
        self.last = ReadStats()
        self._warned: set[str] = set()

    def count_labels(self, on: bool) -> None:
        self.matcher.count_labels(on)

    def labels(self) -> frozenset[str] | None:
        """The pattern's named groups other than `value`."""
        return frozenset(self.matcher.labels)

    def probe(self) -> None:
        if not self._live_paths():
            raise SourceMissing(f"no file matches {self.glob}")

    # -- listing -----------------------------------------------------------------------------

    def _live_paths(self) -> list[str]:
        """Real paths of the files `path` names, minus those that are copies of another of them."""
        names = sorted(glob.glob(self.glob)) if glob.has_magic(self.glob) else [self.glob]
        real: dict[str, None] = {}  # ordered, without repeats
        for name in names:
            target = os.path.realpath(name)
            if os.path.isfile(target):
                real[target] = None
        rotated = self._rotated_paths()
        others = set(real)
        return [p for p in real if p not in rotated and not _is_copy(p, others)]

    def _rotated_paths(self) -> set[str]:
        if not self.rotated:
            return set()
        return {os.path.realpath(p) for p in glob.glob(self.rotated)}

    def _copy_paths(self, bases: set[str]) -> list[str]:
        """Where rotation may have put each base's content: the base itself when it is no longer
        live, NAME.* and NAME-* beside it, and the `rotated` glob."""
        by_dir: dict[str, set[str]] = {}
        for base in bases:
            by_dir.setdefault(os.path.dirname(base), set()).add(os.path.basename(base))
        out: list[str] = []
        for directory, names in sorted(by_dir.items()):
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError:
                continue
            prefixes = tuple(n + "." for n in names) + tuple(n + "-" for n in names)
            out.extend(e.path for e in entries if e.name in names or e.name.startswith(prefixes))
        out.extend(sorted(self._rotated_paths()))
        return out

    # -- reading -----------------------------------------------------------------------------

    def read(self, state: dict[str, Any] | None) -> Reading:
        first = state is None
        streams = _load_streams(state)
        self.last = ReadStats()
        self._parts = {}
        self.matcher.keep_label = self.keep_label
        live = self._live_paths()
        bases = set(live) | {s["base"] for s in streams if s.get("base")}
        files: dict[str, _File] = {}
        for path, is_live, st in self._list(live, bases):
            key = f"{st.st_dev}:{st.st_ino}"
            if key not in files:
                files[key] = _File(path, st, is_live, key)
        if not files and not first:
            raise SourceMissing(f"no file matches {self.glob}")

        self._assign(files, streams)

        # Group: known streams, then new content by its own fingerprint.
        groups: dict[int, tuple[dict[str, Any], list[_File]]] = {}
        copies: dict[bytes, list[_File]] = {}
        new: list[tuple[bytes, list[_File]]] = []
        for f in files.values():
            if f.stream is not None:
                groups.setdefault(id(f.stream), (f.stream, []))[1].append(f)
            elif f.head and f.live:
                new.append((f.head, [f]))  # each new live file is its own content
            elif f.head:
                copies.setdefault(f.head, []).append(f)
        for head, group in new:
            # A new copy of a new live file (copytruncate's copy, made before its truncate) is
            # the same content when it is no longer than the live file.
            same = copies.get(head, [])
            if not first and same and max(c.st.st_size for c in same) <= group[0].st.st_size:
                group.extend(copies.pop(head))
        new.extend(copies.items())
        for head, group in new:
            s = self._new_stream(head, group, first)
            streams.append(s)
            groups[id(s)] = (s, group)

        total = Decimal(0)
        bad_before = self.matcher.bad_values
        for s, group in groups.values():
            value, finished = self._advance(s, group)
            total += value
            # Files whose whole content is behind the offset (or unchanged) are skipped while they
            # stay as they are; one whose read did not happen (renamed over or gone since the
            # listing) is not, whatever its size, so that its lines are read at the next reading.
            s["ids"] = {
                f.key: [f.st.st_size, f.st.st_mtime_ns]
                for f in group
                if f.quick
                or (f.codec is None and f.st.st_size <= s["off"])
                or f.key in finished
                or s.get("done")
            }
            s["miss"] = 0
            carriers = [f for f in group if f.codec is None] or group
            s["home"] = max(carriers, key=lambda f: f.st.st_size).st.st_ino
            if any(f.live for f in group):
                s["base"] = next(f.path for f in group if f.live)
        kept = self._keep(streams, groups, files, bases)
        bad = self.matcher.bad_values - bad_before
        if bad:
            problem = (
                f"{bad} matching line(s) in {self.glob} had a (?P<value>...) that is not a "
                "finite decimal and added 0"
            )
        self.last.matched = (
            total if self.matcher.mode == "count" else Decimal(self.matcher.matched_lines)
        )
        state = {"v": STATE_VERSION, "streams": kept}
        breakdown = self._parts if self.matcher.parts is not None else None
        if bad:
            return Reading(total, state, problem=problem, breakdown=breakdown)
        return Reading(total, state, breakdown=breakdown)

    def _list(self, live: list[str], bases: set[str]) -> list[tuple[str, bool, os.stat_result]]:
        """(path, live, stat) of the live files, then of the places their copies may be."""
        out = []
        for path, is_live in [(p, True) for p in live] + [
            (p, False) for p in self._copy_paths(bases)
        ]:
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone between the listing and now
            if stat.S_ISREG(st.st_mode):
                out.append((path, is_live, st))
        return out

    def _keep(
        self,
        streams: list[dict[str, Any]],
        groups: Mapping[int, Any],
        files: Mapping[str, _File],
        bases: set[str],
    ) -> list[dict[str, Any]]:
        """The streams to keep: each one carried by a file this reading, and each other one
        until FORGET_AFTER readings (since a file last carried it) have found its file gone.

        A stream forgotten while its file is still there would be read again from its start, so a
        miss counts only once its file is known to be gone or to hold other content: a file that
        was listed but not looked into (renamed over or removed between the listing and its open)
        may still carry it, and a file missing from the listing is looked for once more, since a
        rename racing the listing (a name moved from the part not yet listed to the part already
        listed) hides a file from it.
        """
        listed = {f.st.st_ino for f in files.values()}
        unopened = {f.st.st_ino for f in files.values() if f.unopened}
        missing = [
            s
            for s in streams
            if id(s) not in groups and s.get("home") not in unopened and not _still_there(s, listed)
        ]
        again: set[int] = set()
        if any(s.get("home") not in listed for s in missing):
            again = {st.st_ino for _, _, st in self._list(self._live_paths(), bases)} - listed
        kept = []
        gone = {id(s) for s in missing if s.get("home") not in again}
        for s in streams:
            if id(s) in gone:
                s["miss"] = s.get("miss", 0) + 1
                if s["miss"] >= FORGET_AFTER:
                    continue
            kept.append(s)
        return kept

    def _assign(self, files: dict[str, _File], streams: list[dict[str, Any]]) -> None:
        """Give each file the stream whose content it carries, if any.

        In order: files unchanged since the last reading; each stream's home file (the inode it
        was last read from, its fingerprint intact and not shorter than the offset); then copies
        (files that are not live) by fingerprint. A live file is known by its home inode only: a
        new file that begins like an old one (a log of identical lines, a banner) is new content.
        """
        by_id = {k: s for s in streams for k in s.get("ids", {})}
        rest = []
        for f in files.values():
            s = by_id.get(f.key)
            if s is not None and s["ids"][f.key] == [f.st.st_size, f.st.st_mtime_ns]:
                f.stream, f.quick = s, True
            else:
                rest.append(f)
        homes: dict[int, list[dict[str, Any]]] = {}
        for s in streams:
            if "home" in s:
                homes.setdefault(s["home"], []).append(s)
        for f in rest:
            self._fingerprint(f)
            if not f.head:
                continue
            # Several streams can name one inode (the old content of a truncated file, the new):
            # the one whose fingerprint the file still begins with, the latest first.
            for s in reversed(homes.get(f.st.st_ino, [])):
                if _begins(f.head, s) and (f.codec is not None or f.st.st_size >= s["off"]):
                    f.stream = s
                    break
            if f.stream is None and not f.live:
                f.stream = _match(streams, f.head)

    def _fingerprint(self, f: _File) -> None:
        """Read the first bytes of f's content (through the decompressor for a compressed copy).

        A file that cannot be opened is a collector error (the count would be wrong); a
        compressed copy that cannot be decompressed (still being written, or damaged) is left
        out of this reading and looked at again at the next one."""
        try:
            raw = _open_same(f)
        except (_Moved, FileNotFoundError):
            f.unopened = True  # renamed over or removed since the listing: next reading
            return
        except OSError as e:
            raise CollectorError(f"cannot read {f.path}: {e.strerror}") from None
        with raw:
            head = raw.read(FINGERPRINT)
            if not f.live:
                f.codec = next((c for m, c in MAGIC.items() if head.startswith(m)), None)
            if f.codec is None:
                f.head = head
                return
            try:
                raw.seek(0)
                with OPENERS[f.codec](raw, "rb") as z:
                    f.head = z.read(FINGERPRINT)
            except DECOMPRESS_ERRORS:
                f.head = b""

    def _new_stream(self, head: bytes, group: list[_File], first: bool) -> dict[str, Any]:
        s: dict[str, Any] = {
            "fp": _hash(head),
            "fl": len(head),
            "off": 0,
            "skip": False,
            "path": group[0].path,
            "base": next((f.path for f in group if f.live), ""),
        }
        if not first:
            return s  # appeared after the first reading: read from its beginning
        live = [f for f in group if f.live]
        if live and self.config["start_at"] == "beginning":
            return s
        plain = live or [f for f in group if f.codec is None]
        if plain:
            longest = max(plain, key=lambda f: f.st.st_size)
            s["off"], s["skip"] = self._end_of_complete_lines(longest)
        else:
            s["done"] = True  # an archive that was there before us: billed before our time
        return s

    def _advance(self, s: dict[str, Any], group: list[_File]) -> tuple[Decimal, set[str]]:
        """Read what the stream gained, from the best file that carries it. Returns the value and
        the compressed copies that are known to hold nothing more."""
        if s.get("done"):
            return Decimal(0), set()
        plain = [f for f in group if f.codec is None]
        fresh = [f for f in plain if not f.quick]
        if fresh:
            # The longest plain carrier; one shorter than the offset (a copy that copytruncate
            # made before lines it then lost) has nothing to add.
            return self._read_plain(s, max(fresh, key=lambda f: f.st.st_size)), set()
        if plain:
            return Decimal(0), set()  # every plain carrier is unchanged: nothing new
        finished: set[str] = set()
        for f in group:
            if f.quick:
                continue
            if f.codec == "gz" and _gzip_size(f) == s["off"] % (1 << 32):
                finished.add(f.key)  # read to its end already, from the file it was made of
                continue
            value = self._read_compressed(s, f)
            if value is not None:
                finished.add(f.key)
                return value, finished
        return Decimal(0), finished

    def _read_plain(self, s: dict[str, Any], f: _File) -> Decimal:
        try:
            with _open_same(f) as fh:
                size = os.fstat(fh.fileno()).st_size
                head = fh.read(FINGERPRINT)
                if not _begins(head, s):
                    return Decimal(0)  # truncated and rewritten since listed: next reading
                value, off, skip, parts = self._consume(fh, s["off"], s["skip"], size)
                if not _begins(os.pread(fh.fileno(), s["fl"], 0), s):
                    # Truncated (copytruncate) and written again while being read: the bytes
                    # read may belong to two contents. Nothing is kept; the next reading finishes
                    # the old content from its copy, and reads the new from its start.
                    return Decimal(0)
                s["off"], s["skip"] = off, skip
        except (FileNotFoundError, _Moved):
            return Decimal(0)  # gone or renamed over since the listing: next reading
        except OSError as e:
            raise CollectorError(f"cannot read {f.path}: {e.strerror}") from None
        self._add_parts(parts)
        self._extend_fingerprint(s, head)
        s["path"] = f.opened or f.path
        self.last.files.append(s["path"])
        return value

    def _read_compressed(self, s: dict[str, Any], f: _File) -> Decimal | None:
        """Finish a stream from a compressed copy; None when the copy cannot be read whole yet."""
        assert f.codec is not None
        try:
            with _open_same(f) as raw, OPENERS[f.codec](raw, "rb") as z:
                value, off, skip, parts = self._consume(z, s["off"], s["skip"], None)
        except (FileNotFoundError, _Moved):
            return None
        except DECOMPRESS_ERRORS as e:
            if f.path not in self._warned:
                self._warned.add(f.path)
                log.warning("%s: cannot decompress %s yet (%s); will retry", self.glob, f.path, e)
            return None
        s["off"], s["skip"], s["path"] = off, skip, f.opened or f.path
        self._add_parts(parts)
        self.last.files.append(s["path"])
        return value

    def _add_parts(self, parts: Mapping[LabelSet, Decimal]) -> None:
        """Add a kept read's usage per label set to the reading's; beyond MAX_LABEL_SETS label
        sets, a new one's usage goes under `()`."""
        mine = self._parts
        for key, value in parts.items():
            if key not in mine and len(mine) >= MAX_LABEL_SETS:
                key = fold(key, self.keep_label)
            mine[key] = mine.get(key, Decimal(0)) + value

    def _extend_fingerprint(self, s: dict[str, Any], head: bytes) -> None:
        if s["fl"] < FINGERPRINT and len(head) > s["fl"] and _hash(head[: s["fl"]]) == s["fp"]:
            s["fp"], s["fl"] = _hash(head), len(head)

    def _end_of_complete_lines(self, f: _File) -> tuple[int, bool]:
        size = f.st.st_size
        window = min(size, self.max_line)
        try:
            with _open_same(f) as fh:
                fh.seek(size - window)
                tail = fh.read(window)
        except (OSError, _Moved):
            return size, False
        nl = tail.rfind(b"\n")
        if nl >= 0:
            return size - window + nl + 1, False
        return size, size > 0  # inside a line longer than the cap: skip its rest

    def _consume(
        self, f: _Readable, offset: int, skip: bool, size: int | None
    ) -> tuple[Decimal, int, bool, dict[LabelSet, Decimal]]:
        """Match complete lines from `offset` up to `size` (None: to the end of the stream);
        returns (value, new offset, skip, value per label set)."""
        value = Decimal(0)
        remaining = (size - offset) if size is not None else 1 << 62
        if remaining <= 0:
            return value, offset, skip, {}
        self.matcher.take_parts()  # (nothing left over from a read that was not kept)
        f.seek(offset)
        buf = bytearray(min(BLOCK, remaining) + self.max_line + 1)
        view = memoryview(buf)
        base, have = offset, 0  # file offset of buf[0]; bytes held
        count_lines = self.count_lines
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
                    if count_lines:
                        self.last.lines += buf.count(b"\n", start, last)
                else:
                    last = start
                tail = end - last
                if tail > self.max_line:
                    value += self.matcher.match_line(bytes(buf[last : last + self.max_line]))
                    self.last.lines += 1
                    base, have, skip = base + end, 0, True
                    continue
                buf[:tail] = buf[last:end]
                base, have = base + last, tail
        finally:
            view.release()
        return value, base, skip, self.matcher.take_parts()


class _Moved(Exception):
    """The name now holds another file than the one listed."""


def _open_same(f: _File) -> Any:
    """Open the file that was listed as f (same device and inode): at its name, else where a
    rename in the same folder has put it since (rotation shifts names while a reading runs).

    _Moved when it is in neither place: it is looked at again at the next reading."""
    path: str | None = f.opened or f.path
    for _ in range(3):
        if path is None:
            break
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller's `with`
        except FileNotFoundError:
            pass
        else:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino) == (f.st.st_dev, f.st.st_ino):
                if path != f.path:
                    f.opened = path
                return fh
            fh.close()
        path = _named(os.path.dirname(f.path), f.st.st_ino)
    raise _Moved(f.path)


def _named(directory: str, ino: int) -> str | None:
    """The entry of `directory` whose inode is `ino` (the folder's own record; the open that
    follows checks it)."""
    try:
        with os.scandir(directory) as entries:
            return next((e.path for e in entries if e.inode() == ino), None)
    except OSError:
        return None


def _is_copy(path: str, others: set[str]) -> bool:
    """Whether `path` is named like a copy (NAME.*, NAME-*) of another of `others`."""
    for i, c in enumerate(path):
        if c in ".-" and i > 0 and path[:i] in others and "/" not in path[i:]:
            return True
    return False


def _still_there(s: Mapping[str, Any], listed: set[int]) -> bool:
    """The file a stream was last read from is still at its path but was not listed (its folder
    could not be read): the stream is kept however long that lasts, so its content is never read
    again when the folder comes back."""
    try:
        ino = os.stat(s["path"]).st_ino
        return ino == s.get("home") and ino not in listed
    except OSError:
        return False


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _begins(head: bytes, s: Mapping[str, Any]) -> bool:
    return len(head) >= s["fl"] and _hash(head[: s["fl"]]) == s["fp"]


def _match(streams: list[dict[str, Any]], head: bytes) -> dict[str, Any] | None:
    """The stream whose fingerprint begins this content (the longest fingerprint wins)."""
    best: dict[str, Any] | None = None
    hashes: dict[int, str] = {}
    for s in streams:
        fl = s["fl"]
        if fl > len(head) or (best is not None and fl <= best["fl"]):
            continue
        if fl not in hashes:
            hashes[fl] = _hash(head[:fl])
        if hashes[fl] == s["fp"]:
            best = s
    return best


def _gzip_size(f: _File) -> int | None:
    """The uncompressed size mod 2**32 that a gzip file's trailer states (a hint, never trusted
    alone: a mismatch means the file is decompressed and read). Read from the listed file, never
    from whatever now has its name: another copy's size must not mark this one read."""
    try:
        with _open_same(f) as fh:
            fh.seek(-4, os.SEEK_END)
            return int.from_bytes(fh.read(4), "little")
    except (OSError, _Moved):
        return None


def _load_streams(state: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The saved streams, as fresh dicts; a position saved by version 1 (by inode) is converted."""
    if not state:
        return []
    if state.get("v") == STATE_VERSION:
        return [dict(s, ids=dict(s.get("ids", {}))) for s in state.get("streams", [])]
    streams = []
    for key, entry in dict(state.get("files", {})).items():
        fp = bytes.fromhex(entry["fp"])
        if not fp:
            continue
        streams.append(
            {
                "fp": _hash(fp),
                "fl": len(fp),
                "off": int(entry["offset"]),
                "skip": bool(entry.get("skip")),
                "path": entry["path"],
                "base": entry["path"],
                "ids": {},
                "home": int(key.split(":")[1]),
            }
        )
    return streams
