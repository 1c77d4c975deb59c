"""Log-line counters: every matching line on disk counted once, whatever rotation did to the file.

Each reading lists the live files (`path`, a symlink followed to its target) and the places their
copies may be (`NAME.*`, `NAME-*` beside each file a stream was known by, and the `rotated` glob),
gives each file the stream it carries (`streams.py`: by inode, else by content), and reads each
stream once from its offset: from its plain file, or through the decompressor when only a
compressed copy holds what is left. A file that is not a known stream's is new content, read from
its beginning; `start_at` applies only to the live files present at the dimension's first reading,
and the copies present then are history.

The plain file being read is held open between readings (`_Held`), so a generation that rotation
renames out of sight or deletes is still read to its end from the open descriptor; a deleted one is
closed as soon as it is drained (it pins disk space while open) and the state that drained it was
committed, a renamed one once it has been quiet for a few readings. While held, no other file can
take its inode.

Positions travel in the Reading's state, which the ledger commits in the same transaction as the
count it produced: kill -9 at any moment neither loses nor repeats a line. A read that finds the
bytes it started from changed under it (truncated and written again while it read) keeps nothing.
The state holds one small entry per stream still on disk; a stream that nothing carries any more is
forgotten after a few readings. Usage the collector can tell went unread (a stream that vanished
before it was read to its end, a truncation with no copy of its earlier content in sight) is
reported once as `Unread`, with the fix.

Reads are binary, in large blocks, never decoding (bad bytes cannot crash it), and stop at the
read's deadline at a line boundary, to go on at the next reading; a partial last line waits for its
newline; a line longer than `max_line_bytes` is judged by its first bytes and the rest skipped.
"""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar

from agent.aggregate import LabelSet
from agent.collectors.base import (
    MAX_LABEL_SETS,
    Collector,
    CollectorError,
    Reading,
    SourceMissing,
    Sources,
    Unread,
    fold,
)
from agent.collectors.evidence import (
    Changed,
    Hasher,
    anchor,
    anchor_holds,
    catch_up,
    check,
    gzip_trailer,
    judge,
    legacy_head,
    plain_owner,
    tail_of,
)
from agent.collectors.linecount import LineMatcher, check_pattern
from agent.collectors.logblocks import Blocks, ReadStats
from agent.collectors.logfiles import (
    DECOMPRESS_ERRORS,
    MAGIC,
    OPENERS,
    Entry,
    Files,
    Moved,
    key_of,
    named,
    open_same,
    same,
)
from agent.collectors.streams import STATE_VERSION, Stream, blake, load_state
from agent.errors import ConfigError
from agent.fields import Enum, Field, Int, Regex, Str

log = logging.getLogger(__name__)

FORGET_AFTER = 3  # readings in a row in which nothing carried a stream, before it is forgotten
LOST_AFTER = 2  # readings a stream that lost its file waits for a copy before it is reported
QUIET = 3  # readings a renamed, read-to-its-end file stays open without growing
MAX_HELD = 64  # files held open per dimension; beyond, the quietest finished ones are closed
CATCH_UP = 64 << 20  # bytes a reading hashes of what a start at the end skipped
ROTATED_FIX = "set the log collector's `rotated` to a glob matching where the rotated copies go"


@dataclass
class _Held:
    """A file held open between readings."""

    fh: Any
    dev: int
    ino: int
    quiet: int = 0  # readings in a row it was read to its end without growing
    drained: int | None = None  # deleted and read to this offset: closed once that is committed


@dataclass
class _Carrier:
    """What a stream is read from this reading."""

    plain: Any = None  # an open file (held or opened now), positioned nowhere in particular
    entry: Entry | None = None  # where it was listed, if it was
    compressed: Entry | None = None
    codec: str = ""


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
        try:
            check_pattern(options["pattern"], encoding)
        except ValueError as e:
            raise ConfigError(f"{path}.pattern", str(e)) from None

    def __init__(self, options: Mapping[str, Any], sources: Sources) -> None:
        super().__init__(options, sources)
        self.glob = self.config["path"]
        self.files = Files(self.glob, self.config.get("rotated"))
        self.matcher = LineMatcher(
            self.config["pattern"], self.config["mode"], self.config["encoding"]
        )
        self.blocks = Blocks(self.matcher, int(self.config["max_line_bytes"]))
        self._parts: dict[LabelSet, Decimal] = {}  # this reading's usage per label set
        self._warned: set[str] = set()
        self._held: dict[tuple[int, int], _Held] = {}
        self._unread: list[Unread] = []
        # copies already judged by content, by (file, size, mtime): (stream id or 0, full)
        self._judged: dict[tuple[str, int, int], tuple[int, bool]] = {}

    @property
    def count_lines(self) -> bool:
        """`sample` turns it on to report the lines read (it costs a pass over the bytes)."""
        return self.blocks.count_lines

    @count_lines.setter
    def count_lines(self, on: bool) -> None:
        self.blocks.count_lines = on

    def report_lines(self, on: bool) -> None:
        """The metrics count lines read (a pass over the bytes, at memchr speed)."""
        self.count_lines = on

    @property
    def last(self) -> ReadStats:
        """What the last reading did, for `sample`."""
        return self.blocks.last

    def count_labels(self, on: bool) -> None:
        self.matcher.count_labels(on)

    def labels(self) -> frozenset[str] | None:
        """The pattern's named groups other than `value`."""
        return frozenset(self.matcher.labels)

    def probe(self) -> None:
        if not self.files.live_paths():
            raise SourceMissing(f"no file matches {self.glob}")

    def close(self) -> None:
        """Let go of every file held open (a reload that drops the dimension, tests)."""
        for held in self._held.values():
            held.fh.close()
        self._held.clear()

    def read(self, state: dict[str, Any] | None) -> Reading:
        return self.read_within(state, lambda: True)

    def read_within(self, state: dict[str, Any] | None, in_time: Callable[[], bool]) -> Reading:
        first = state is None
        streams, next_id = load_state(state)
        self.blocks.last = ReadStats()
        self._parts = {}
        self._unread = []
        self.matcher.keep_label = self.keep_label
        self._close_drained(streams)
        entries = self.files.entries([s.name for s in streams], [s.path for s in streams])
        if not any(e.live for e in entries.values()) and not first and not self._held:
            raise SourceMissing(f"no file matches {self.glob}")

        # 1. By inode: each stream's plain file, held open or listed, read on from its offset,
        # so that every stream is up to date before any other file is judged by its content.
        carriers: dict[int, _Carrier] = {}
        claimed: set[str] = set()
        lost_now: set[int] = set()
        total = Decimal(0)
        bad_before = self.matcher.bad_values
        for s in streams:
            carrier = self._find_plain(s, entries, lost_now)
            if carrier is not None:
                carriers[s.id] = carrier
                claimed.add(f"{s.dev}:{s.ino}")
                if not s.done:
                    total += self._advance(s, carrier, in_time)
        for s in streams:
            claimed.update(k for k in s.known if k in entries and same(entries[k], s.known[k]))
        # 2. By content: every other file is a copy of a stream (read on from the stream's
        # offset if it holds more), or new content (read from its start). Each is read as soon
        # as it is placed, so that the files judged after it know what it held: a generation
        # first seen mid-compress (its plain file and its finished .gz both listed) is new
        # content once, and its other file a copy of what was just read.
        found_copy: set[int] = set()
        new_copies = 0  # copies of content never seen, read from their first byte
        for key, entry in entries.items():
            if key in claimed:
                continue
            placed = self._place(entry, streams, first)
            if placed is None:
                continue
            s, carrier = placed
            if s.id < 0:
                s.id, next_id = next_id, next_id + 1
                streams.append(s)
                new_copies += not first and not entry.live and carrier is not None
            else:
                found_copy.add(s.id)
                s.lost = 0
            if carrier is not None and s.id not in carriers:
                carriers[s.id] = carrier
                if not s.done:
                    total += self._advance(s, carrier, in_time)
            elif carrier is not None and carrier.plain is not None:
                carrier.plain.close()
        self._judged = {k: v for k, v in self._judged.items() if k[0] in entries}
        drained = self._hold(streams, carriers)
        kept = self._keep(streams, carriers, entries, found_copy, lost_now, drained, new_copies)

        self.last.matched = (
            total if self.matcher.mode == "count" else Decimal(self.matcher.matched_lines)
        )
        new_state = {"v": STATE_VERSION, "next": next_id, "streams": [s.to_json() for s in kept]}
        breakdown = self._parts if self.matcher.parts is not None else None
        bad = self.matcher.bad_values - bad_before
        problem = None
        if bad:
            problem = (
                f"{bad} matching line(s) in {self.glob} had a (?P<value>...) that is not a "
                "finite decimal and added 0"
            )
        return Reading(
            total, new_state, problem=problem, breakdown=breakdown, unread=tuple(self._unread),
            lines=self.last.lines if self.count_lines else None,
        )  # fmt: skip

    def _find_plain(
        self, s: Stream, entries: Mapping[str, Entry], lost_now: set[int]
    ) -> _Carrier | None:
        """The plain file that carries `s` this reading, by its inode: held open, or listed and
        still holding the stream's bytes. A file whose bytes before the offset changed (truncated,
        rewritten, or a reused inode) is not the stream's any more: the stream loses it."""
        if s.ino is None:
            return None
        held = self._held.get((s.dev or 0, s.ino))
        entry = entries.get(f"{s.dev}:{s.ino}")
        if entry is None and held is None:
            # After a restart the device number may differ (an overlay, a remount, a position
            # an older agent saved without it): the inode and the stream's own bytes decide.
            entry = next(
                (e for e in entries.values() if e.st.st_ino == s.ino and e.st.st_dev != s.dev),
                None,
            )
        if held is None and entry is None:
            return None
        if held is None and entry is not None and same(entry, s.known.get(entry.key)):
            return None  # let go once read to its end and quiet, unchanged since
        try:
            fh = held.fh if held is not None else open_same(entry)  # type: ignore[arg-type]
        except (Moved, FileNotFoundError):
            return None  # renamed over or gone since the listing: looked for at the next reading
        except OSError as e:
            raise CollectorError(f"cannot read {entry.path if entry else s.path}: {e}") from None
        try:
            check(s, fh, held is not None)
        except Changed:
            if held is None:
                fh.close()
            self._lose(s, lost_now, truncated=held is not None)
            return None
        except OSError as e:
            raise CollectorError(f"cannot read {s.path}: {e}") from None
        if entry is not None and entry.st.st_dev != s.dev:
            s.dev = entry.st.st_dev
        return _Carrier(plain=fh, entry=entry)

    def _lose(self, s: Stream, lost_now: set[int], truncated: bool) -> None:
        """The stream's plain file is not its any more: its bytes may still be in a copy, which
        the listing looks for by content from now on. Held open, the file was truncated under
        the collector for sure: if it was being written, and no copy turns up, lines may have
        gone unread. Not held (after a restart), its inode may as well have been freed and
        given to a new file: nothing can be told."""
        released = self._held.pop((s.dev or 0, s.ino or 0), None)
        if released is not None:
            released.fh.close()
        s.dev = s.ino = None
        if truncated and (s.live or s.cut):
            s.lost = s.lost or 1
        else:
            s.fin = True
        s.live = False
        lost_now.add(s.id)

    def _place(
        self, entry: Entry, streams: list[Stream], first: bool
    ) -> tuple[Stream, _Carrier | None] | None:
        """The stream a file that no stream claimed by inode belongs to, with what to read it from
        now: the stream whose content it holds, or a new one (id -1) when it is new content; None
        when it is left for the next reading (renamed away, or still being compressed)."""
        try:
            with open_same(entry) as raw:
                magic = raw.read(6)
                codec = None
                if not entry.live:
                    codec = next((c for m, c in MAGIC.items() if magic.startswith(m)), None)
                trailer = gzip_trailer(raw) if codec == "gz" else None
            if not entry.live and codec is None and any(m.startswith(magic) for m in MAGIC):
                # empty, or too short to tell: a compressed copy gzip has only begun to write
                # would be followed as plain text (binary lines). Nothing to bill in it yet.
                return None
            if entry.live:
                return self._new_live(entry, first)
            if first:
                return self._history(entry, codec)
            verdict = self._owner(entry, codec, trailer, streams)
            if verdict is None:
                return None
            s, full, length = verdict
            if s is None:  # new content: a generation created and rotated away between readings
                fresh = Stream(-1, path=entry.path, name=entry.path)
                return fresh, self._carrier(fresh, entry, codec)
            if not full or (length is not None and length <= s.off):
                s.known[entry.key] = [entry.st.st_size, entry.st.st_mtime_ns]
                return s, None
            if codec is None and s.ino is None:
                return s, self._carrier(s, entry, None)  # its plain file now: read on from it
            if codec is not None:
                return s, _Carrier(compressed=entry, codec=codec)
            return s, None  # a longer plain copy while its own file still has the bytes
        except (Moved, FileNotFoundError):
            return None
        except OSError as e:
            raise CollectorError(f"cannot read {entry.path}: {e.strerror}") from None

    def _carrier(self, s: Stream, entry: Entry, codec: str | None) -> _Carrier:
        if codec is not None:
            return _Carrier(compressed=entry, codec=codec)
        s.dev, s.ino, s.path = entry.st.st_dev, entry.st.st_ino, entry.path
        return _Carrier(plain=open_same(entry), entry=entry)

    def _new_live(self, entry: Entry, first: bool) -> tuple[Stream, _Carrier]:
        s = Stream(-1, path=entry.path, name=entry.path, live=True)
        carrier = self._carrier(s, entry, None)
        if first and self.sources.image is not None:
            self._start_as_in_image(s, carrier, entry)
        elif first and self.config["start_at"] == "end":
            s.off, s.skip = self.blocks.end_of_complete_lines(entry)
            s.base = s.off  # hashed from its start at the next readings (`catch_up`)
        return s, carrier

    def _start_as_in_image(self, s: Stream, carrier: _Carrier, entry: Entry) -> None:
        """The instance's first boot: a plain file that holds a log of the image is read from
        the length it had there; any other from its beginning (it was not in the image)."""
        try:
            length = self.sources.image.length_in_image(carrier.plain.fileno(), entry.st.st_size)
        except OSError as e:
            raise CollectorError(f"cannot read {entry.path}: {e.strerror}") from None
        if length:
            s.off = s.base = length  # hashed from its start at the next readings (`catch_up`)

    def _history(self, entry: Entry, codec: str | None) -> tuple[Stream, _Carrier | None]:
        """A copy present at the dimension's first reading: billed before our time. A plain one
        is followed from its end (the application may still write to it); a compressed one is
        known by its inode only. At an instance's first boot (an image record), a copy is
        history only as far as the image held it: a plain copy is read on from its length in
        the image, and a copy the image did not hold is read from its beginning."""
        s = Stream(-1, path=entry.path, name=entry.path)
        if self.sources.image is not None and not self._in_image_whole(entry, codec):
            carrier = self._carrier(s, entry, codec)
            if codec is None:
                self._start_as_in_image(s, carrier, entry)
            return s, carrier
        if codec is not None:
            s.done = True
            s.known[entry.key] = [entry.st.st_size, entry.st.st_mtime_ns]
            return s, None
        carrier = self._carrier(s, entry, None)
        s.off, s.skip = self.blocks.end_of_complete_lines(entry)
        s.base = s.off
        return s, carrier

    def _in_image_whole(self, entry: Entry, codec: str | None) -> bool:
        """Whether the image held all of this copy (so it is history, as without a record): a
        compressed copy byte for byte, a plain one up to its last complete line."""
        try:
            with open_same(entry) as raw:
                length = self.sources.image.length_in_image(raw.fileno(), entry.st.st_size)
        except (Moved, FileNotFoundError):
            return True  # gone since the listing: nothing to read from it
        except OSError as e:
            raise CollectorError(f"cannot read {entry.path}: {e.strerror}") from None
        if length is None:
            return False
        if codec is not None:
            return length == entry.st.st_size
        return length >= self.blocks.end_of_complete_lines(entry)[0]

    def _owner(
        self,
        entry: Entry,
        codec: str | None,
        trailer: tuple[int, int] | None,
        streams: list[Stream],
    ) -> tuple[Stream | None, bool, int | None] | None:
        """(the stream a copy holds or None for new content, whether it holds all that was read of
        it, its length when known); None when it cannot be judged yet (a compressed file still
        being written). A gzip copy of a stream read to its end is known by its trailer alone."""
        if trailer is not None:
            value, size = trailer
            for s in streams:
                if s.ck and s.ck == s.off and s.crc == value and s.ck % (1 << 32) == size:
                    return s, True, s.ck
        cached = self._judged.get((entry.key, entry.st.st_size, entry.st.st_mtime_ns))
        if cached is not None:
            known = next((s for s in streams if s.id == cached[0]), None)
            if known is not None or cached[0] == 0:
                return known, cached[1], entry.st.st_size if codec is None else None
        try:
            with open_same(entry) as raw:
                if codec is None:
                    fast = plain_owner(raw.fileno(), entry.st.st_size, streams)
                    if fast is not None:
                        return fast, True, entry.st.st_size
                    verdict = judge(raw, entry.st.st_size, streams)
                    raw.seek(0)
                    head = legacy_head(raw, streams)
                else:
                    with OPENERS[codec](raw, "rb") as z:
                        verdict = judge(z, None, streams)
                    with open_same(entry) as again, OPENERS[codec](again, "rb") as z:
                        head = legacy_head(z, streams)
        except DECOMPRESS_ERRORS as e:
            if isinstance(e, (FileNotFoundError, Moved)):
                raise
            self._cannot_decompress(entry, e)
            return None
        owner: Stream | None = None
        full = False
        if verdict is not None:
            owner, full = verdict.stream, verdict.full
        else:
            for s in streams:  # a position an older agent saved, before its prefix is hashed
                if s.legacy is not None and s.base is not None:
                    digest, length = s.legacy
                    if len(head) >= length and blake(head[:length]) == digest:
                        owner, full = s, True
                        break
        self._judged[(entry.key, entry.st.st_size, entry.st.st_mtime_ns)] = (
            owner.id if owner is not None else 0,
            full,
        )
        return owner, full, entry.st.st_size if codec is None else None

    def _cannot_decompress(self, entry: Entry, e: BaseException) -> None:
        """A compressed copy still being written, or damaged: said once, tried again later."""
        if entry.path not in self._warned:
            self._warned.add(entry.path)
            log.warning("%s: cannot decompress %s yet (%s); will retry", self.glob, entry.path, e)

    def _advance(self, s: Stream, carrier: _Carrier, in_time: Callable[[], bool]) -> Decimal:
        """Read what the stream gained from its carrier."""
        if carrier.plain is not None:
            return self._read_plain(s, carrier, in_time)
        assert carrier.compressed is not None
        return self._read_compressed(s, carrier.compressed, carrier.codec, in_time)

    def _read_plain(self, s: Stream, carrier: _Carrier, in_time: Callable[[], bool]) -> Decimal:
        fh = carrier.plain
        entry = carrier.entry
        if entry is not None:
            s.path = entry.path
            s.live = entry.live
            if entry.live:
                s.name = entry.path
        else:
            s.live = False  # held open, out of the listing's sight (renamed away or deleted)
        try:
            fd = fh.fileno()
            st = os.fstat(fd)
            size = st.st_size
            s.size = size
            if s.base is not None:
                fh.seek(s.ck)
                # A deleted file is hashed whole now: its bytes go with it.
                catch_up(s, fh, CATCH_UP if st.st_nlink else s.base - s.ck)
            if s.off >= size:
                s.cut = False
                return Decimal(0)
            mark = anchor(s, fd)
            if mark is None:
                return Decimal(0)
            hasher = Hasher(s)
            fh.seek(s.off)
            value, off, skip, parts, cut = self.blocks.consume(fh, s, hasher, size, in_time)
            if not anchor_holds(fd, mark, hasher):
                # Truncated (copytruncate) and written again while being read: the bytes read
                # may belong to two contents. Nothing is kept; the next reading finds the old
                # content's copy and reads the new from its start.
                return Decimal(0)
            tail = tail_of(fd, off)
        except (FileNotFoundError, Moved):
            return Decimal(0)
        except OSError as e:
            raise CollectorError(f"cannot read {s.path}: {e.strerror}") from None
        s.skip, s.cut = skip, cut
        hasher.settle(s, off, tail)
        self._add_parts(parts)
        self.last.files.append(s.path)
        return value

    def _read_compressed(
        self, s: Stream, entry: Entry, codec: str, in_time: Callable[[], bool]
    ) -> Decimal:
        """Finish a stream from a compressed copy (its plain file is gone)."""
        s.path, s.live = entry.path, False
        try:
            with open_same(entry) as raw, OPENERS[codec](raw, "rb") as z:
                if s.base is not None:
                    z.seek(s.ck)
                    catch_up(s, z, s.base - s.ck)
                hasher = Hasher(s)
                z.seek(s.off)
                value, off, skip, parts, cut = self.blocks.consume(z, s, hasher, None, in_time)
        except (FileNotFoundError, Moved):
            return Decimal(0)
        except DECOMPRESS_ERRORS as e:
            self._cannot_decompress(entry, e)
            return Decimal(0)
        s.skip, s.cut = skip, cut
        hasher.settle(s, off, None)
        if not cut:
            s.known[entry.key] = [entry.st.st_size, entry.st.st_mtime_ns]
        self._add_parts(parts)
        self.last.files.append(s.path)
        return value

    def _add_parts(self, parts: Mapping[LabelSet, Decimal]) -> None:
        """Add a kept read's usage per label set to the reading's; beyond MAX_LABEL_SETS label
        sets, a new one's usage goes under `()`."""
        mine = self._parts
        for key, value in parts.items():
            if key not in mine and len(mine) >= MAX_LABEL_SETS:
                key = fold(key, self.keep_label)
            mine[key] = mine.get(key, Decimal(0)) + value

    def _hold(self, streams: list[Stream], carriers: Mapping[int, _Carrier]) -> set[int]:
        """Keep each stream's plain file open for the next reading, and let go of those that
        need it no more: deleted and drained (once that is committed: `_close_drained`), renamed
        and quiet for QUIET readings, or no stream's any more. Returns the drained streams."""
        wanted: dict[tuple[int, int], Stream] = {}
        drained: set[int] = set()
        for s in streams:
            carrier = carriers.get(s.id)
            if carrier is None or carrier.plain is None or s.ino is None:
                continue
            key = (s.dev or 0, s.ino)
            wanted[key] = s
            held = self._held.get(key)
            if held is None:
                held = self._held[key] = _Held(carrier.plain, key[0], key[1])
            elif held.fh is not carrier.plain:
                carrier.plain.close()
            try:
                st = os.fstat(held.fh.fileno())
            except OSError:
                continue
            finished = not s.cut and st.st_size == s.size and s.base is None
            if st.st_nlink == 0 and finished:
                held.drained = s.off
                drained.add(s.id)
                s.fin = True
            held.quiet = held.quiet + 1 if finished and not s.live else 0
            s.fin = s.fin and finished
        for key in [k for k in self._held if k not in wanted]:
            self._held.pop(key).fh.close()
        excess = len(self._held) - MAX_HELD
        for held in sorted(self._held.values(), key=lambda h: -h.quiet):
            if held.drained is None and held.quiet and (held.quiet >= QUIET or excess > 0):
                s = wanted[(held.dev, held.ino)]
                st = os.fstat(held.fh.fileno())
                s.fin = True
                s.known[key_of(st)] = [st.st_size, st.st_mtime_ns]
                self._held.pop((held.dev, held.ino)).fh.close()
                excess -= 1
        return drained

    def _close_drained(self, streams: list[Stream]) -> None:
        """Close the deleted files a reading drained, now that the state it produced is the one
        this reading starts from (a reading whose result was not stored reads them again)."""
        by_inode = {(s.dev or 0, s.ino): s for s in streams if s.ino is not None}
        for key, held in list(self._held.items()):
            s = by_inode.get(key)
            if held.drained is not None and (s is None or s.off >= held.drained):
                self._held.pop(key).fh.close()
                if s is not None:  # its file is gone for good, and its inode free for another
                    s.dev = s.ino = None
                    s.fin = True

    def _keep(
        self,
        streams: list[Stream],
        carriers: Mapping[int, _Carrier],
        entries: Mapping[str, Entry],
        found_copy: set[int],
        lost_now: set[int],
        drained: set[int],
        new_copies: int,
    ) -> list[Stream]:
        """The streams to keep: each one something carried this reading (its plain file, a
        copy known to hold it, a compressed copy read), and each other one until FORGET_AFTER
        readings have found nothing of it (a deleted file drained this reading is nothing's
        already). A stream that lost its file with usage it may not have read, and whose content
        no copy in sight holds, is reported once.

        A stream read to byte 0 has no content to be known by: a copy of it is new content, read
        whole. So each one that vanished is taken as held by one of the `new_copies` this
        reading read from their first byte (a file created empty, then written and rotated
        away while the agent restarted), and lets go of its inode; only those beyond that count
        are reported."""
        kept = []
        for s in streams:
            carried = (
                (s.id in carriers and s.id not in drained)
                or s.id in found_copy
                or (s.ino is not None and s.id not in drained and (s.dev or 0, s.ino) in self._held)
                or any(k in entries and same(entries[k], v) for k, v in s.known.items())
            )
            nothing_read = s.off == s.ck == 0 and s.ino is not None and not s.fin
            if not carried and nothing_read and new_copies:
                # Its content, if it had any, was in one of them: from now on it is known by
                # that content. Its file, if a listing only missed it (renamed between the
                # folder's scan and its stat) and the next finds it again, is judged as a copy
                # of what was read, not read from byte 0 by its inode a second time.
                new_copies -= 1
                s.fin = True
                s.dev = s.ino = None
            if carried:
                s.miss = 0
            elif not _still_there(s):
                s.miss += 1
            if s.ino is None and s.lost and s.id not in found_copy and s.id not in lost_now:
                s.lost += 1
            self._report(s, carried)
            if s.miss >= FORGET_AFTER:
                continue
            kept.append(s)
        return kept

    def _report(self, s: Stream, carried: bool) -> None:
        """Say once what a stream's loss cost, if it may have cost anything."""
        if s.said or s.done or s.fin:
            return
        unread = s.size - s.off if s.size > s.off else 0
        if s.lost >= LOST_AFTER:
            self._say(
                s,
                Unread(
                    f"{s.name}: its content was truncated or replaced under the agent at byte "
                    f"{s.off:,} and no copy of it was found; lines written after the last "
                    "reading are not billed",
                    ROTATED_FIX + " (or rotate with `create` rather than `copytruncate`)",
                    unread,
                ),
            )
        elif not carried and s.miss == 1 and s.ino is not None and (s.cut or s.live):
            # It vanished unread to its end (not held open: after a restart), and no file in
            # sight holds it.
            self._say(
                s,
                Unread(
                    f"{s.name}: rotated away or deleted before the agent read it to its end "
                    f"(read to byte {s.off:,}), and no copy of it is where the agent looks",
                    ROTATED_FIX,
                    unread,
                ),
            )

    def _say(self, s: Stream, unread: Unread) -> None:
        s.said = True
        self._unread.append(unread)
        log.warning("%s: usage went unread: %s; %s", self.glob, unread.what, unread.fix)


def _still_there(s: Stream) -> bool:
    """The file a stream was last read from still has a name the listing looks at, but was not
    listed: its folder could not be read (it is at its path), or rotation renamed it between the
    listing's scan of its folder and its look at each name (it is beside it, named like a copy of
    its live name: `NAME.*`, `NAME-*`). The stream is kept however long that lasts, so its content
    is never read again when the folder comes back, nor reported unread while the next listing
    finds it."""
    if s.ino is None:
        return False
    try:
        if os.stat(s.path).st_ino == s.ino:
            return True
    except OSError:
        pass
    renamed = named(os.path.dirname(s.path), s.ino)
    base = os.path.basename(s.name)
    return renamed is not None and os.path.basename(renamed).startswith((base + ".", base + "-"))
