"""A fast log writer and the on-disk oracle, shared by the logrotate tests."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
import threading
import time
from pathlib import Path

LOGROTATE = "/usr/sbin/logrotate"
PATTERN = '"(GET|POST) /api/'
RATE = 2000  # lines per second


def line(n: int) -> str:
    if n % 2:
        return f'10.0.{n % 250}.1 - - [{n}] "GET /api/v1/orders/{n} HTTP/1.1" 200 {n % 999}\n'
    return f'10.0.{n % 250}.2 - - [{n}] "GET /static/app-{n}.js HTTP/1.1" 304 0\n'


class Writer(threading.Thread):
    """Appends lines at about RATE per second. Reopens its file when the path names another inode
    (what an application does when logrotate's postrotate signals it), so lines written through
    the old handle in between land in the renamed copy."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path, self.stop, self.n = path, threading.Event(), 0

    def run(self) -> None:
        f = open(self.path, "a")  # noqa: SIM115
        start = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - start) * RATE)
            f.write("".join(line(i) for i in range(self.n, max(due, self.n + 1))))
            f.flush()
            self.n = max(due, self.n + 1)
            try:
                if os.stat(self.path).st_ino != os.fstat(f.fileno()).st_ino:
                    f.close()
                    f = open(self.path, "a")  # noqa: SIM115
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        f.close()


def on_disk(folder: Path) -> int:
    """The oracle: matching complete lines in every file under `folder`, decompressed."""
    compiled = re.compile(PATTERN.encode())
    total = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        raw = path.read_bytes()
        for magic, decompress in (
            (b"\x1f\x8b", gzip.decompress),
            (b"BZh", bz2.decompress),
            (b"\xfd7zXZ", lzma.decompress),
        ):
            if raw.startswith(magic):
                raw = decompress(raw)
        total += sum(1 for ln in raw.split(b"\n")[:-1] if compiled.search(ln))
    return total
