"""Prometheus text exposition (format 0.0.4) for node_exporter's textfile collector: metric
families with HELP and TYPE lines and escaped label values, the file replaced atomically, mode 0644.

Why a temp file in the same directory, then a rename: node_exporter reads every `*.prom` file of
its directory at each scrape, so a file written in place could be served half-written (a scrape
error, or a counter that seems to drop). The temp file's name does not end in `.prom`, so it is
never read, and a rename within one directory is atomic. Mode 0644 whatever the unit's UMask:
node_exporter runs as another user.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Family:
    """One metric family: its samples, each a label set and a value."""

    name: str
    kind: Literal["gauge", "counter"]
    help: str
    samples: Sequence[tuple[Labels, float]]


def escape_label(value: str) -> str:
    """A label value as the format quotes it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and newline escaped (a double quote stays as it is)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def number(value: float) -> str:
    """A sample value: whole numbers without a fraction, others as Python's shortest repr;
    the format's spellings of the non-finite ones."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            lines.append(
                f"{f.name}{{{text}}} {number(value)}" if text else f"{f.name} {number(value)}"
            )
    return "\n".join(lines) + "\n"


def replace(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (temp file beside it, fsync-free: it is rewritten every
    few seconds and holds nothing that must survive a power loss), mode 0644."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def problem(path: Path) -> str | None:
    """Why the agent could not write `path` (None: it can): its directory missing, not a
    directory, read-only (a systemd sandbox: ProtectSystem=strict) or not writable by this user."""
    directory = path.parent
    if not directory.exists():
        return (
            f"directory {directory} does not exist; create it (it is node_exporter's "
            "--collector.textfile.directory) or fix the path"
        )
    if not directory.is_dir():
        return f"{directory} is not a directory; fix the path"
    if path.is_dir():
        return f"{path} is a directory; name a file in it, e.g. {path}/metering-agent.prom"
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return (
            f"directory {directory} is on a read-only file system here (under the systemd unit: "
            f"add ReadWritePaths={directory} in a drop-in, see docs/metrics.md)"
        )
    return (
        f"directory {directory} is not writable by uid {os.geteuid()}; let the agent's user "
        "write there (e.g. group-writable by its group)"
    )
