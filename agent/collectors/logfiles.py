"""Where a log dimension's files are, and opening the one that was listed.

`Files` lists the live files (`path`, a symlink followed to its target) and the places where their
copies may be: `NAME.*` and `NAME-*` beside each file a stream was known by, the `rotated` glob,
and a symlink target's dated siblings (`app.log -> app-20261206.log`: `app-*.log`). Names shift
while a reading runs (rotation renames): `open_same` opens the very file that was listed, at its
name or where a rename in its folder put it, or says it moved.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import lzma
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# Compressed copies are known by their magic bytes, whatever their name.
MAGIC = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
OPENERS: dict[str, Callable[..., Any]] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}
DECOMPRESS_ERRORS = (EOFError, zlib.error, OSError, lzma.LZMAError, ValueError)
_DIGITS = re.compile(r"[0-9]+")


@dataclass
class Entry:
    """A regular file found by the listing."""

    path: str
    st: os.stat_result
    live: bool

    @property
    def key(self) -> str:
        return key_of(self.st)


class Moved(Exception):
    """The name now holds another file than the one listed."""


class Files:
    """The files of one `path` (file or glob) and its `rotated` glob."""

    def __init__(self, path: str, rotated: str | None) -> None:
        self.glob = path
        self.rotated = rotated

    def live_paths(self) -> list[str]:
        """Real paths of the files `path` names, minus those that are copies of another of them."""
        names = sorted(glob.glob(self.glob)) if glob.has_magic(self.glob) else [self.glob]
        real: dict[str, None] = {}  # ordered, without repeats
        for name in names:
            target = os.path.realpath(name)
            if os.path.isfile(target):
                real[target] = None
        rotated = self._rotated_paths()
        others = set(real)
        return [p for p in real if p not in rotated and not is_copy(p, others)]

    def _rotated_paths(self) -> set[str]:
        if not self.rotated:
            return set()
        return {os.path.realpath(p) for p in glob.glob(self.rotated)}

    def _link_siblings(self) -> set[str]:
        """For a `path` that is a symlink to dated files (`app.log -> app-20261206.log`): the
        files beside its target named like it but for their digits (`app-*.log`). A target the
        link pointed at only between two readings is found there, as copies are."""
        names = glob.glob(self.glob) if glob.has_magic(self.glob) else [self.glob]
        out: set[str] = set()
        for name in names:
            if not os.path.islink(name):
                continue
            target = os.path.realpath(name)
            shape = _DIGITS.sub("*", glob.escape(os.path.basename(target)))
            if shape != glob.escape(os.path.basename(target)):
                out.update(
                    os.path.realpath(p)
                    for p in glob.glob(os.path.join(glob.escape(os.path.dirname(target)), shape))
                )
        return out

    def _copy_paths(self, bases: set[str]) -> list[str]:
        """Where rotation may have put each base's content: the base itself, NAME.* and NAME-*
        beside it, the `rotated` glob, and the dated siblings of a symlink's target."""
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
        out.extend(sorted(self._rotated_paths() | self._link_siblings()))
        return out

    def entries(self, names: Iterable[str], last_seen: Iterable[str]) -> dict[str, Entry]:
        """Every regular file that may carry a stream: the live files first, then the places of
        their copies (beside the live files and beside `names`, the live paths streams had), and
        `last_seen`, the paths where streams were last seen."""
        live = self.live_paths()
        paths = dict.fromkeys(live, True)
        bases = set(live) | {n for n in names if n}
        for path in self._copy_paths(bases) + [p for p in last_seen if p]:
            paths.setdefault(path, False)
        found: dict[str, Entry] = {}
        for path, is_live in paths.items():
            try:
                st = os.stat(path)
            except OSError:
                continue  # gone between the listing and now
            if stat.S_ISREG(st.st_mode):
                entry = found.get(key_of(st))
                if entry is None:
                    found[key_of(st)] = Entry(path, st, is_live)
                elif is_live and not entry.live:
                    entry.live = True
        return found


def key_of(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


def same(entry: Entry, known: list[int] | None) -> bool:
    return [entry.st.st_size, entry.st.st_mtime_ns] == known


def open_same(f: Entry) -> Any:
    """Open the file that was listed as f (same device and inode): at its name, else where a
    rename in the same folder has put it since (rotation shifts names while a reading runs).

    Moved when it is in neither place: it is looked at again at the next reading."""
    path: str | None = f.path
    for _ in range(3):
        if path is None:
            break
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            pass
        else:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino) == (f.st.st_dev, f.st.st_ino):
                if path != f.path:
                    f.path = path
                return fh
            fh.close()
        path = named(os.path.dirname(f.path), f.st.st_ino)
    raise Moved(f.path)


def named(directory: str, ino: int) -> str | None:
    """The entry of `directory` whose inode is `ino` (the folder's own record; the open that
    follows checks it)."""
    try:
        with os.scandir(directory) as entries:
            return next((e.path for e in entries if e.inode() == ino), None)
    except OSError:
        return None


def is_copy(path: str, others: set[str]) -> bool:
    """Whether `path` is named like a copy (NAME.*, NAME-*) of another of `others`."""
    for i, c in enumerate(path):
        if c in ".-" and i > 0 and path[:i] in others and "/" not in path[i:]:
            return True
    return False
