"""How the log collector knows a file: one *stream* per file generation, and the evidence for it.

A stream is the content of one file from its first byte (one inode's generation): what rotation
renames, copies, compresses and deletes. It is known two ways, kept apart from reading:

- **by its inode** (device and inode) while a plain file carries it: a rename keeps it, and while
  the collector holds the file open no other file can take that inode. Where the file is not held
  (after a restart), its content guards the inode against reuse: the bytes just before the saved
  offset (`tail`) and the first bytes (the head checkpoint) must still be there.
- **by its content** for every other file that may carry it (a copy that `copytruncate` made, a
  `.gz` or other compressed copy, a copy moved across filesystems): a running CRC-32 of *every byte
  read* of the stream, kept at a few offsets (`checkpoints`). A candidate file continues a stream
  when its own first bytes give the same CRC at the stream's checkpoints, judged at the latest one
  the candidate reaches: all that was read, not a fixed-length prefix. Two files that begin alike
  (JSON logs whose constant fields come first) part at the first byte that differs. A gzip copy of
  a stream read to its end is recognised from its trailer alone (it states the CRC-32 and length of
  what it holds), without decompressing it.

A stream's state is plain JSON (it travels in the Reading's state and is committed with the count
it produced), small and bounded: a few integers, two paths and the copies known to hold it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

HEAD = 4096  # bytes: the first checkpoint, a quick test of a candidate before a longer one
TAIL = 4096  # bytes before the offset that must still be there for a file not held open
CHECKPOINTS = 4  # reading ends kept besides the head and the current offset


class _Reads(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


def crc(data: Any, value: int = 0) -> int:
    return zlib.crc32(data, value)


@dataclass
class Stream:
    """One file generation: where it is, how far it was read, and what was read of it.

    `off` is where reading goes on (after a newline, or inside an over-long line when `skip`);
    `crc` is the CRC-32 of bytes [0, `ck`) (`ck` < `off` only until a first reading that began at
    the end has hashed what it skipped). `dev`/`ino` name the plain file that carries it, None once
    it lost that file (truncated under it, gone) and only copies may hold it. `known` are the other
    files known to hold all of it that matters (copies, "dev:ino" -> [size, mtime_ns]): unchanged,
    they are not looked into again. `done`: history, present at the dimension's first reading; its
    content is followed so that its copies are known, but never billed.
    """

    id: int
    off: int = 0
    skip: bool = False
    ck: int = 0
    crc: int = 0
    points: list[tuple[int, int]] = field(default_factory=list)  # earlier (offset, crc), ascending
    tail: tuple[int, int] | None = None  # (length, crc) of the bytes just before `off`
    dev: int | None = None
    ino: int | None = None
    path: str = ""  # where it was last seen
    name: str = ""  # the live path it had: its copies are looked for beside it
    live: bool = False
    size: int = 0  # the size its carrier had at the last reading
    cut: bool = False  # the last reading stopped at its deadline with complete lines left
    known: dict[str, list[int]] = field(default_factory=dict)
    done: bool = False
    miss: int = 0  # readings in a row in which nothing carried it
    lost: int = 0  # readings since it lost its plain file with no copy found (0: not lost)
    said: bool = False  # its unread usage was reported
    legacy: tuple[str, int] | None = None  # (blake2b, length) of the first bytes, from version 2
    # Behind: a start at the end (or an older agent's position) has not hashed the bytes before
    # `base` yet; `rest` is the CRC of [base, off), joined to `crc` once `ck` reaches `base`.
    base: int | None = None
    rest: int = 0
    fin: bool = False  # read to its end and let go (drained, or quiet and renamed): nothing lost

    # -- evidence ------------------------------------------------------------------------------

    def checkpoints(self) -> list[tuple[int, int]]:
        """Every (offset, crc) known of this stream, ascending, the current one last."""
        out = [p for p in self.points if p[0] < self.ck]
        if self.ck > 0 or not out:
            out.append((self.ck, self.crc))
        return out

    def note_read(
        self, off: int, ck: int, value: int, tail: tuple[int, int] | None, head: Any = None
    ) -> None:
        """A reading advanced the stream to `off` and its CRC to `ck`. The previous end becomes a
        checkpoint; the first checkpoint (the head, at HEAD once the stream is that long) and the
        last CHECKPOINTS are kept."""
        points = set(self.points)
        if head is not None:
            points.add(head)
        if self.ck and ck != self.ck:
            points.add((self.ck, self.crc))
        ordered = sorted(p for p in points if p[0] < ck)
        self.points = ordered[:1] + ordered[1:][-CHECKPOINTS:]
        self.off, self.ck, self.crc = off, ck, value
        if tail is not None:
            self.tail = tail

    def head(self) -> tuple[int, int]:
        """The shortest checkpoint: the quick test of a candidate."""
        return self.checkpoints()[0]

    # -- state ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "off": self.off, "ck": self.ck, "crc": self.crc}
        if self.skip:
            out["skip"] = True
        if self.points:
            out["points"] = [list(p) for p in self.points]
        if self.tail is not None:
            out["tail"] = list(self.tail)
        if self.ino is not None:
            out["dev"], out["ino"] = self.dev, self.ino
        out["path"] = self.path
        if self.name and self.name != self.path:
            out["name"] = self.name
        for key in ("live", "cut", "done", "said"):
            if getattr(self, key):
                out[key] = True
        if self.size:
            out["size"] = self.size
        if self.known:
            out["known"] = self.known
        if self.miss:
            out["miss"] = self.miss
        if self.lost:
            out["lost"] = self.lost
        if self.legacy is not None:
            out["legacy"] = list(self.legacy)
        if self.base is not None:
            out["base"], out["rest"] = self.base, self.rest
        if self.fin:
            out["fin"] = True
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Stream:
        """The saved form's keys are the fields' names (read every reading for every stream:
        kept cheap)."""
        s = cls.__new__(cls)
        fields = s.__dict__
        fields.update(_DEFAULTS)
        fields.update(d)
        fields["points"] = [tuple(p) for p in fields["points"]] if "points" in d else []
        fields["known"] = dict(d["known"]) if "known" in d else {}
        if "tail" in d:
            fields["tail"] = tuple(d["tail"])
        if "legacy" in d:
            fields["legacy"] = tuple(d["legacy"])
        if "name" not in d:
            fields["name"] = fields["path"]
        return s


_DEFAULTS: dict[str, Any] = {
    name: f.default
    for name, f in Stream.__dataclass_fields__.items()
    if name not in ("points", "known")
}


def crc_combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A+B from those of A and B and B's length (zlib's crc32_combine, which
    Python's zlib does not offer): a stream whose first bytes are hashed after later ones (a
    start at the end) joins the two."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four
    while True:
        even = _gf2_square(odd)  # the first pass: one zero byte
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = _gf2_square(even)
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


def _gf2_times(mat: list[int], vec: int) -> int:
    total, i = 0, 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_square(mat: list[int]) -> list[int]:
    return [_gf2_times(mat, row) for row in mat]


class Hasher:
    """The running CRC of what a reading consumes of a stream, recording the head checkpoint when
    the bytes cross HEAD. Behind (`Stream.base` set: a start at the end has not hashed the bytes
    it skipped yet), it hashes the consumed bytes apart, to be joined later (`catch_up`)."""

    def __init__(self, s: Stream, pool: Any = None) -> None:
        self.behind = s.base is not None
        self.at = s.off if self.behind else s.ck
        self.value = s.rest if self.behind else s.crc
        self.head: tuple[int, int] | None = None
        self.pool = pool  # a one-thread executor: hashing runs there, in order
        self._last: Any = None

    def feed(self, data: Any) -> Any:
        """Hash `data` next: in the pool's thread when there is one (in order, while the caller
        reads and scans on; zlib lets go of the GIL), else at once. Returns what to wait on
        (`.result()`) before `data`'s buffer is written again, or None."""
        if self.pool is None:
            self.update(data)
            return None
        self._last = self.pool.submit(self.update, data)
        return self._last

    def wait(self) -> None:
        """Until everything fed is hashed: `at`, `value` and `head` are final."""
        if self._last is not None:
            self._last.result()
            self._last = None

    def update(self, data: Any) -> None:
        n = len(data)
        if not self.behind and self.at < HEAD < self.at + n:
            cut = HEAD - self.at
            self.value = crc(data[:cut], self.value)
            self.head = (HEAD, self.value)
            self.value = crc(data[cut:], self.value)
        else:
            self.value = crc(data, self.value)
            if not self.behind and self.at + n == HEAD:
                self.head = (HEAD, self.value)
        self.at += n

    def settle(self, s: Stream, off: int, tail: tuple[int, int] | None) -> None:
        if self.behind:
            s.off, s.rest = off, self.value
            if tail is not None:
                s.tail = tail
        else:
            s.note_read(off, self.at, self.value, tail, self.head)


def catch_up(s: Stream, read: _Reads, budget: int) -> None:
    """Hash up to `budget` bytes of what a start at the end skipped (the bytes [ck, base), from
    `read`, positioned at `ck`); once all are hashed, join them with what was hashed since."""
    assert s.base is not None
    value, at = s.crc, s.ck
    head: tuple[int, int] | None = None
    buf = bytearray(min(1 << 20, max(1, s.base - at)))
    view = memoryview(buf)
    try:
        while at < s.base and budget > 0:
            n = read.readinto(view[: min(len(buf), s.base - at, budget)])
            if not n:
                break
            if at < HEAD <= at + n:
                head = (HEAD, crc(view[: HEAD - at], value))
            value = crc(view[:n], value)
            at += n
            budget -= n
    finally:
        view.release()
    if head is not None:
        s.points = sorted({*s.points, head})
    s.ck, s.crc = at, value
    if at == s.base:
        s.crc = crc_combine(value, s.rest, s.off - s.base)
        s.ck, s.base, s.rest = s.off, None, 0
        if s.off <= HEAD and s.off:
            s.points = sorted({*s.points, (s.off, s.crc)})


@dataclass
class Verdict:
    """Which stream a candidate file holds, and how much of it: `full` when it holds all that was
    read of the stream (it may hold more, to be read from the stream's offset); otherwise it is a
    copy shorter than the stream's offset (made before lines that `copytruncate` then lost, or
    while the stream was still growing) and has nothing to add."""

    stream: Stream
    full: bool


def judge(read: _Reads, length: int | None, streams: Iterable[Stream]) -> Verdict | None:
    """Read a candidate from its first byte and tell which stream, if any, it continues.

    `length` is the candidate's length when known (a plain file), None for a compressed one (read
    to its end as needed). A stream is continued when the candidate gives the same CRC at every
    checkpoint of the stream that it reaches, the latest one included; full when it reaches the
    stream's `ck`. A shorter candidate counts only if it reaches the stream's previous reading end
    (the copy was made after that reading). Of several, the one agreeing over the most bytes wins
    (byte-identical files cannot be told apart; either is right then)."""
    candidates = [s for s in streams if s.ck > 0]  # a stream with nothing read has no evidence
    if not candidates:
        return None
    want: dict[int, list[tuple[Stream, int]]] = {}
    for s in candidates:
        for off, value in s.checkpoints():
            want.setdefault(off, []).append((s, value))
    alive = {id(s): s for s in candidates}
    agreed: dict[int, int] = {}  # stream id -> the furthest checkpoint it agreed on
    offsets = sorted(want)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    at, value, i = 0, 0, 0
    try:
        while alive and i < len(offsets):
            # checkpoints at the bytes already hashed
            while i < len(offsets) and offsets[i] <= at:
                if offsets[i] == at:
                    for s, expected in want[offsets[i]]:
                        if id(s) in alive:
                            if expected == value:
                                agreed[id(s)] = at
                            else:
                                del alive[id(s)]
                i += 1
            if i >= len(offsets) or not alive:
                break
            need = min(len(buf), offsets[i] - at)
            n = read.readinto(view[:need])
            if not n:
                break
            value = crc(view[:n], value)
            at += n
    finally:
        view.release()
    best: tuple[int, int, Stream] | None = None
    for key, s in alive.items():
        reached = agreed.get(key)
        if reached is None:
            continue
        full = reached == s.ck
        if not full:
            points = s.checkpoints()
            previous = points[-2][0] if len(points) > 1 else 0
            if reached < previous or (length is not None and length < previous):
                continue
        rank = (1 if full else 0, reached)
        if best is None or rank > best[:2]:
            best = (*rank, s)
    if best is None:
        return None
    return Verdict(best[2], best[0] == 1)


def gzip_trailer(raw: Any) -> tuple[int, int] | None:
    """(CRC-32, length mod 2**32) that a gzip file's trailer states of what it holds; None when
    it cannot be read. Taken from the listed file's own handle, never from whatever has its name."""
    try:
        raw.seek(-8, 2)
        data = raw.read(8)
    except OSError:
        return None
    if len(data) != 8:
        return None
    return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little")
