"""What `prepare-image` recorded of the logs in an image, so the first boot reads only what is new.

On an instance launched from an AMI the product starts before the agent: a log read from its end
at the agent's first reading loses what the product wrote first, and one read from its beginning
bills the lines baked into the image. `prepare-image` records each log file the config names (and
the copies beside it that the log collector would read) with its identity and length in
`<state_dir>/image.json`; at the instance's first boot a file whose content begins with a recorded
file's is read from the recorded length, any other file from its beginning.

Identity is the content, not the inode: an AMI's volume is a copy, and the device number (and on
another filesystem the inode) differ on the buyer's instance. A recorded file is known by its
length and the CRC-32 of its first and last blocks before that length; the device and inode are
kept as what they were, to show. Files that begin alike (JSON logs) part at the last block.

The record applies once: `run` claims it on an instance other than the one it was made on (its
instance id, else its boot id), writing who claimed it; a restart within that same boot still has
it (for a dimension not read yet), any later boot or instance never does (`claim`).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.collectors.logfiles import MAGIC

FILE = "image.json"
BLOCK = 4096  # bytes hashed at each end of a recorded file
VERSION = 1


class RecordError(Exception):
    """image.json cannot be read or is not a record this agent wrote."""


@dataclass(frozen=True)
class LogFile:
    """One file as it was in the image: its length up to the end of its last complete line, and
    the CRC-32 of its first and last BLOCK bytes before that length."""

    path: str
    length: int
    head: int
    tail: int
    dev: int = 0
    ino: int = 0

    def held_by(self, fd: int, size: int) -> bool:
        """Whether the open file `fd` (of `size` bytes) begins with this file's content."""
        if size < self.length:
            return False
        head, tail = _ends(fd, self.length)
        return (head, tail) == (self.head, self.tail)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "length": self.length,
            "head": self.head,
            "tail": self.tail,
            "dev": self.dev,
            "ino": self.ino,
        }


@dataclass
class ImageRecord:
    """The logs of one image, and who made and used the record."""

    logs: list[LogFile] = field(default_factory=list)
    made: str = ""  # ISO time of prepare-image
    boot_id: str | None = None  # the build machine's boot when it was made
    instance_id: str | None = None  # the build machine's instance, when its ledger named one
    used: dict[str, Any] | None = None  # {"instance_id", "boot_id", "at"} of the first boot

    def length_in_image(self, fd: int, size: int) -> int | None:
        """The length the file open as `fd` had in the image, if it was there (the longest
        recorded content it begins with); None for a file that was not in the image."""
        found = [r.length for r in self.logs if r.length > 0 and r.held_by(fd, size)]
        return max(found) if found else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "v": VERSION,
            "made": self.made,
            "boot_id": self.boot_id,
            "instance_id": self.instance_id,
            "logs": [r.to_json() for r in self.logs],
        }
        if self.used is not None:
            out["used"] = self.used
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ImageRecord:
        if not isinstance(d, Mapping) or d.get("v") != VERSION:
            raise RecordError(f"not a version {VERSION} image record")
        try:
            logs = [
                LogFile(
                    str(x["path"]),
                    int(x["length"]),
                    int(x["head"]),
                    int(x["tail"]),
                    int(x.get("dev", 0)),
                    int(x.get("ino", 0)),
                )
                for x in d.get("logs", [])
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"a log entry without {e}") from None
        used = d.get("used")
        return cls(
            logs,
            str(d.get("made", "")),
            d.get("boot_id"),
            d.get("instance_id"),
            dict(used) if isinstance(used, Mapping) else None,
        )


def _ends(fd: int, length: int) -> tuple[int, int]:
    """CRC-32 of the first and of the last BLOCK bytes of [0, length)."""
    first = os.pread(fd, min(BLOCK, length), 0)
    start = max(0, length - BLOCK)
    last = os.pread(fd, length - start, start)
    return zlib.crc32(first), zlib.crc32(last)


def record_file(path: str, max_line: int = 1 << 16) -> LogFile | None:
    """A file as it is now, for the record: its length to the end of its last complete line (a
    line the product is still writing belongs to the instance that finishes it). None when it
    cannot be read."""
    try:
        with open(path, "rb", buffering=0) as fh:
            st = os.fstat(fh.fileno())
            size = st.st_size
            window = min(size, max_line)
            tail = os.pread(fh.fileno(), window, size - window)
            nl = tail.rfind(b"\n")
            length = size - window + nl + 1 if nl >= 0 else (0 if size <= max_line else size)
            magic = os.pread(fh.fileno(), 6, 0)
            if any(magic.startswith(m) for m in MAGIC):
                length = size  # a compressed copy: known byte for byte
            head, last = _ends(fh.fileno(), length)
    except OSError:
        return None
    return LogFile(path, length, head, last, st.st_dev, st.st_ino)


def load(state_dir: Path) -> ImageRecord | None:
    """The state dir's record; None when there is none. RecordError when it cannot be used."""
    path = Path(state_dir) / FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RecordError(f"{path}: {e.strerror}") from None
    try:
        return ImageRecord.from_json(json.loads(text))
    except (ValueError, RecordError) as e:
        raise RecordError(f"{path}: {e}") from None


def write(state_dir: Path, record: ImageRecord) -> Path:
    """Write the record atomically (a temporary file renamed over it), readable by the agent."""
    path = Path(state_dir) / FILE
    tmp = path.with_name(f".{FILE}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def applies(record: ImageRecord, instance_id: str | None, boot_id: str | None) -> str | None:
    """None when the record applies to this run; else why not, in one phrase."""
    if record.used is not None:
        if record.used.get("instance_id") == instance_id and record.used.get("boot_id") == boot_id:
            return None  # a restart within the first boot: dimensions not read yet still use it
        return (
            f"used at the first boot of {record.used.get('instance_id')} "
            f"({record.used.get('at')}); start_at decides for files never read"
        )
    if record.instance_id is not None and record.instance_id == instance_id:
        return "made on this instance: it applies to the first boot of an instance made from it"
    if record.instance_id is None and record.boot_id is not None and record.boot_id == boot_id:
        return "made in this boot: it applies to the first boot of an instance made from it"
    return None


def claim(
    state_dir: Path, instance_id: str | None, boot_id: str | None, at: str
) -> tuple[ImageRecord | None, str]:
    """The record for this run, if it applies (marked used by this instance and boot, durably,
    before any reading uses it), and one line saying what decides where logs start."""
    try:
        record = load(state_dir)
    except RecordError as e:
        return None, f"image record unusable ({e}): start_at decides"
    if record is None:
        return None, "no image record: start_at decides"
    why_not = applies(record, instance_id, boot_id)
    if why_not is not None:
        return None, f"image record {why_not}"
    if record.used is None:
        record.used = {"instance_id": instance_id, "boot_id": boot_id, "at": at}
        write(state_dir, record)
    return record, (
        f"first boot: image record of {len(record.logs)} file(s) from {record.made}: a log in "
        "the image is read from its length there, any other from its beginning"
    )


def describe(state_dir: Path, instance_id: str | None, boot_id: str | None) -> str:
    """One line for `check` and `status`: what decides where a log's first reading starts."""
    try:
        record = load(state_dir)
    except RecordError as e:
        return f"image record unusable ({e}): start_at decides"
    if record is None:
        return "no image record: start_at decides"
    why_not = applies(record, instance_id, boot_id)
    if why_not is not None:
        return f"image record {why_not}"
    if record.used is not None:
        return (
            f"image record of {len(record.logs)} file(s) in use (this is the first boot): a log "
            "in the image is read from its length there, any other from its beginning"
        )
    return (
        f"image record of {len(record.logs)} file(s) from {record.made}: the next `run` reads a "
        "log in the image from its length there, any other from its beginning"
    )


def build(
    paths: Iterable[str], made: str, boot_id: str | None, instance_id: str | None
) -> ImageRecord:
    """The record of the files at `paths` (those that can be read), for prepare-image."""
    logs = [r for r in (record_file(p) for p in dict.fromkeys(paths)) if r is not None]
    return ImageRecord(logs, made, boot_id, instance_id)
