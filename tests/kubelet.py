"""A ConfigMap volume as the kubelet writes it (k8s.io/kubernetes pkg/volume/util/atomic_writer.go).

The volume directory holds each key as a symlink `KEY -> ..data/KEY`; `..data` is a symlink to a
timestamped directory `..YYYY_MM_DD_HH_MM_SS.NNNNNNNNN` holding the files. An update writes a new
timestamped directory, points a new symlink `..data_tmp` at it, renames `..data_tmp` over `..data`
(the one atomic step), then removes the old directory. A reader of `KEY` sees the old content or
the new, never a mix; the path `KEY` itself (and its inode, a symlink's) never changes.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


class ConfigMapVolume:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def _timestamped(self) -> Path:
        self._n += 1  # two updates within one clock tick still get their own directory
        stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
        return self.root / f"..{stamp}.{time.time_ns() % 10**9:09d}{self._n}"

    def write(self, files: dict[str, str]) -> Path:
        """Project `files` (key -> content) as the kubelet does; returns the new data directory."""
        data = self._timestamped()
        data.mkdir(mode=0o755)
        for key, content in files.items():
            (data / key).write_text(content)
            (data / key).chmod(0o644)
        link = self.root / "..data"
        old = Path(os.readlink(link)) if link.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(data.name, tmp)
        os.rename(tmp, link)  # the swap
        for key in files:
            user = self.root / key
            if not user.is_symlink():
                os.symlink(f"..data/{key}", user)
        if old is not None:
            shutil.rmtree(self.root / old)
        return data
