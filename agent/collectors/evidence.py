"""What tells a stream's content apart: a CRC-32 of every byte read, and the checks made with it.

A candidate file continues a stream when its own first bytes give the same CRC at the stream's
checkpoints, judged at the latest one the candidate reaches (`judge`): all that was read, not a
fixed-length prefix, so two files that begin alike part at the first byte that differs. A gzip copy
of a stream read to its end is known from its trailer alone (`gzip_trailer`: it states the CRC-32
and length of what it holds). A plain file not held open must still hold the stream's first bytes
and the bytes just before its offset (`check`), and a read must find the bytes it started from
unchanged when it ends (`anchor`, `anchor_holds`). `Hasher` keeps the running CRC as a read goes
(in another thread for a large read), `catch_up` hashes what a start at the end skipped, and
`crc_combine` joins the two.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.collectors.streams import HEAD, TAIL, Stream, blake, crc


class _Reads(Protocol):
    def readinto(self, buffer: Any, /) -> int | None: ...


class Changed(Exception):
    """The file's bytes before the offset are not the stream's any more."""


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


def check(s: Stream, fh: Any, held: bool) -> None:
    """Raise Changed unless the open file still holds the stream's bytes up to its offset.

    Held open, its inode is the stream's for sure: only a truncation (shorter than the offset, or
    rewritten past it: the bytes before the offset differ) can have happened. Not held (after a
    restart), the inode may have been reused: its first bytes must agree too."""
    fd = fh.fileno()
    if os.fstat(fd).st_size < s.off:
        raise Changed
    if s.off and s.tail is not None and anchor(s, fd) is None:
        raise Changed
    if held:
        return
    if s.legacy is not None:
        digest, length = s.legacy
        if blake(os.pread(fd, length, 0)) != digest:
            raise Changed
    head_at, head = s.checkpoints()[0]
    if head_at and crc(os.pread(fd, head_at, 0)) != head:
        raise Changed


def anchor(s: Stream, fd: int) -> tuple[int, int, int] | None:
    """(offset, length, crc) of the bytes before the offset that a read must find unchanged when
    it ends; None when they already are not the stream's. (0, 0, 0): a read from the start, whose
    own first bytes are checked instead."""
    if s.off == 0 or s.tail is None:
        return (0, 0, 0)
    length, value = s.tail
    if crc(os.pread(fd, length, s.off - length)) != value:
        return None
    return (s.off - length, length, value)


def anchor_holds(fd: int, mark: tuple[int, int, int], hasher: Hasher) -> bool:
    """Whether the bytes `anchor` marked before a read are still there after it."""
    at, length, value = mark
    if length:
        return crc(os.pread(fd, length, at)) == value
    if hasher.behind:
        return True
    # A read from the start: the first bytes it hashed must still be there.
    head_at, head_crc = hasher.head if hasher.head is not None else (hasher.at, hasher.value)
    return crc(os.pread(fd, head_at, 0)) == head_crc


def plain_owner(fd: int, size: int, streams: list[Stream]) -> Stream | None:
    """A plain copy at least as long as what was read of a stream, that holds the stream's own
    first bytes and the bytes just before its offset: `copytruncate`'s copy, found without reading
    it whole (a copy of a big log is made once a day). Files that begin alike part there too,
    unless byte-identical where they are compared."""
    for s in streams:
        if s.tail is None or not s.off or s.base is not None or size < s.off or s.ck != s.off:
            continue
        head_at, head = s.checkpoints()[0]
        length, tail = s.tail
        if (
            crc(os.pread(fd, head_at, 0)) == head
            and crc(os.pread(fd, length, s.off - length)) == tail
        ):
            return s
    return None


def legacy_head(f: Any, streams: list[Stream]) -> bytes:
    length = max((s.legacy[1] for s in streams if s.legacy is not None), default=0)
    return f.read(length) if length else b""


def tail_of(fd: int, off: int) -> tuple[int, int] | None:
    """(length, crc) of the bytes just before `off`."""
    length = min(TAIL, off)
    data = os.pread(fd, length, off - length)
    if len(data) != length:
        return None
    return length, crc(data)
