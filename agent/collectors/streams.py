"""How the log collector knows a file: one *stream* per file generation, and its saved state.

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
  the candidate reaches (`evidence.py`).

A stream's state is plain JSON (it travels in the Reading's state and is committed with the count
it produced), small and bounded: a few integers, two paths and the copies known to hold it.
`load_state` reads it, and converts positions that versions 1 and 2 saved.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

HEAD = 4096  # bytes: the first checkpoint, a quick test of a candidate before a longer one
TAIL = 4096  # bytes before the offset that must still be there for a file not held open
CHECKPOINTS = 4  # reading ends kept besides the head and the current offset
STATE_VERSION = 3


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


def blake(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def load_state(state: Mapping[str, Any] | None) -> tuple[list[Stream], int]:
    """The saved streams and the next free id; positions saved by versions 1 and 2 (known by a
    fingerprint of their first bytes) are converted: their inode and offset are kept, and their
    content is hashed from their file at the next readings."""
    if not state:
        return [], 1
    if state.get("v") == STATE_VERSION:
        streams = [Stream.from_json(d) for d in state.get("streams", [])]
        return streams, int(state.get("next", 1 + max((s.id for s in streams), default=0)))
    streams = []
    for i, d in enumerate(_v2_streams(state), start=1):
        known = {str(k): [int(v[0]), int(v[1])] for k, v in dict(d.get("ids", {})).items()}
        home = d.get("home")
        streams.append(
            Stream(
                i,
                off=int(d["off"]),
                skip=bool(d.get("skip")),
                ino=None if home is None else int(home),
                dev=None,
                path=str(d.get("path", "")),
                name=str(d.get("base") or d.get("path", "")),
                known=known,
                done=bool(d.get("done")),
                legacy=(str(d["fp"]), int(d["fl"])),
                base=int(d["off"]),  # its first bytes are hashed at the next readings
            )
        )
    for s in streams:
        if s.ino is not None:
            s.dev = -1  # not saved then: the inode and its first bytes decide (_find_plain)
    return streams, len(streams) + 1


def _v2_streams(state: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    if state.get("v") == 2:
        yield from (dict(s) for s in state.get("streams", []))
        return
    for key, entry in dict(state.get("files", {})).items():
        fp = bytes.fromhex(entry["fp"])
        if not fp:
            continue
        yield {
            "fp": blake(fp),
            "fl": len(fp),
            "off": int(entry["offset"]),
            "skip": bool(entry.get("skip")),
            "path": entry["path"],
            "base": entry["path"],
            "home": int(key.split(":")[1]),
        }
