"""Reading a log stream's bytes in blocks: complete lines to the matcher, every byte to the hash.

Reads are binary, in large blocks, never decoding (bad bytes cannot crash it); a partial last line
waits for its newline; a line longer than `max_line_bytes` is judged by its first bytes and the
rest skipped, so memory stays bounded whatever the file holds. A read stops at its deadline at a
line boundary, to go on at the next reading. A large read hashes each block in another thread
while it reads and scans the next (zlib and the matcher both let go of the GIL).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from agent.aggregate import LabelSet
from agent.collectors.evidence import Hasher
from agent.collectors.linecount import LineMatcher
from agent.collectors.logfiles import Entry, Moved, open_same
from agent.collectors.streams import Stream

BLOCK = 4 << 20
PARALLEL_HASH = 1 << 20  # reads at least twice this long hash beside the match

_hash_pool: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    """One thread that hashes a large read's blocks, in order, while they are scanned."""
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(1, thread_name_prefix="log-hash")
    return _hash_pool


@dataclass
class ReadStats:
    """What the last reading did, for `sample` (lines are counted only when asked: it costs)."""

    lines: int = 0
    matched: Decimal = Decimal(0)
    files: list[str] = field(default_factory=list)


class Blocks:
    """Reads streams for one dimension's matcher."""

    def __init__(self, matcher: LineMatcher, max_line: int) -> None:
        self.matcher = matcher
        self.max_line = max_line
        self.count_lines = False  # `sample` turns it on to report lines read
        self.last = ReadStats()

    def consume(
        self,
        f: Any,
        s: Stream,
        hasher: Hasher,
        size: int | None,
        in_time: Callable[[], bool],
    ) -> tuple[Decimal, int, bool, dict[LabelSet, Decimal], bool]:
        """Match complete lines from the stream's offset (where `f` is positioned) up to `size`
        (None: to the end of the stream), hashing every byte consumed; stops at a line boundary
        once `in_time()` turns False. Returns (value, new offset, skip, value per label set,
        whether it stopped with bytes left)."""
        offset, skip = s.off, s.skip
        value = Decimal(0)
        remaining = (size - offset) if size is not None else 1 << 62
        if remaining <= 0:
            return value, offset, skip, {}, False
        self.matcher.take_parts()  # (nothing left over from a read that was not kept)
        # A large read hashes each block in another thread while it reads and scans the next
        # (two buffers, used in turn); a small one hashes as it goes, in one buffer.
        parallel = remaining >= 2 * PARALLEL_HASH
        hasher.pool = _pool() if parallel else None
        bufs = [bytearray(min(BLOCK, remaining) + self.max_line + 1) for _ in range(1 + parallel)]
        views = [memoryview(b) for b in bufs]
        busy: list[Any] = [None] * len(bufs)  # the hashing still reading each buffer
        base, have, i = offset, 0, 0  # file offset of the current buffer's start; bytes held
        carry: tuple[int, int, int] | None = None  # the previous buffer's unfinished line
        count_lines = self.count_lines
        cut = False
        try:
            while remaining > 0:
                buf, view = bufs[i], views[i]
                if busy[i] is not None:
                    busy[i].result()
                if carry is not None:
                    j, at, end = carry
                    buf[: end - at] = bufs[j][at:end]
                n = f.readinto(view[have : have + min(len(buf) - have, remaining)])
                if not n:
                    break
                remaining -= n
                end = have + n
                start = 0
                i_next = (i + 1) % len(bufs)
                if skip:
                    nl = buf.find(b"\n", 0, end)
                    if nl < 0:
                        busy[i] = hasher.feed(view[:end])
                        base, have, carry, i = base + end, 0, None, i_next
                        continue
                    start, skip = nl + 1, False
                last = buf.rfind(b"\n", start, end) + 1
                if last <= start:
                    last = start
                if last > start:
                    value += self.matcher.scan(buf, start, last)
                    if count_lines:
                        self.last.lines += buf.count(b"\n", start, last)
                tail = end - last
                if tail > self.max_line:
                    value += self.matcher.match_line(bytes(buf[last : last + self.max_line]))
                    self.last.lines += 1
                    busy[i] = hasher.feed(view[:end])
                    base, have, carry, skip, i = base + end, 0, None, True, i_next
                    continue
                busy[i] = hasher.feed(view[:last])
                base, have, carry, i = base + last, tail, (i, last, end), i_next
                if len(bufs) == 1 and tail:
                    hasher.wait()  # (one buffer: hashed before its tail moves to its front)
                    busy[0] = None
                    buf[:tail] = buf[last:end]
                    carry = None
                if remaining > 0 and not in_time():
                    cut = True
                    break
        finally:
            hasher.wait()
            for v in views:
                v.release()
        return value, base, skip, self.matcher.take_parts(), cut

    def end_of_complete_lines(self, entry: Entry) -> tuple[int, bool]:
        size = entry.st.st_size
        window = min(size, self.max_line)
        try:
            with open_same(entry) as fh:
                fh.seek(size - window)
                tail = fh.read(window)
        except (OSError, Moved):
            return size, False
        nl = tail.rfind(b"\n")
        if nl >= 0:
            return size - window + nl + 1, False
        return size, size > 0  # inside a line longer than the cap: skip its rest
