"""Whether the config file changed on disk since it was last loaded: what `run` reloads on without
a SIGHUP.

Why: a Kubernetes ConfigMap mounted as a directory is updated by the kubelet swapping the `..data`
symlink to a new timestamped directory; nobody signals the agent. The same check sees an edit in
place or a file replaced by rename. The daemon asks once per second of its main loop: a
realpath and a stat (a few system calls), no thread of its own and no inotify (not in Python's
standard library, and a second's delay costs nothing here).

A change is reported once it has held for two looks in a row, so an editor's write seen half-way
is not loaded; a kubelet swap is atomic, and is reported at the second look after it.
"""

from __future__ import annotations

import os
from pathlib import Path

# The resolved path, then the identity and the content's stamp of what it resolves to.
Signature = tuple[str, int, int, int, int]


def signature(path: Path) -> Signature | None:
    """What `path` is now; None while it does not resolve to a readable file's stat."""
    try:
        target = os.path.realpath(path)
        st = os.stat(target)
    except OSError:
        return None
    return (target, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileWatch:
    """Tells once when `path` (through any symlinks) has come to mean another file or content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._loaded = signature(path)
        self._seen = self._loaded

    def changed(self) -> bool:
        """True once per settled change: the file differs from the one last reported (or the one
        there at the start) and looked the same at the previous call."""
        now = signature(self.path)
        settled = now == self._seen
        self._seen = now
        if now == self._loaded or not settled:
            return False
        self._loaded = now
        return True

    def target(self) -> str:
        """The file `path` resolves to now (for the log line)."""
        return os.path.realpath(self.path)
