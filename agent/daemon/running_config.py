"""The config the daemon runs: a copy in state_dir that its children (the sender, the handler)
read, so a child sends with exactly what the daemon runs, not whatever the file says since (an
edit not yet reloaded, or one a reload refused); and which dimensions a new config changes."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from agent.config.loader import load
from agent.config.model import Config, Dimension
from agent.host import ownership

RUNNING_CONFIG = "config.running.yaml"  # the config the daemon runs, for its sender children


def snapshot_config(source: Path, state_dir: Path) -> tuple[Config, Path]:
    """Copy the config file into state_dir and load the copy; `keep_snapshot` then makes it the
    one the sender children read. So a child sends with exactly the config the daemon runs, not
    whatever the file says since (an edit not yet reloaded, or one a reload refused)."""
    tmp = state_dir / (RUNNING_CONFIG + ".new")
    shutil.copyfile(source, tmp)
    try:
        return dataclasses.replace(load(tmp), source=source), tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def keep_snapshot(state_dir: Path, tmp: Path) -> None:
    os.replace(tmp, state_dir / RUNNING_CONFIG)
    ownership.adopt(state_dir, state_dir / RUNNING_CONFIG)


def bills_alike(a: Dimension | None, b: Dimension) -> bool:
    """Same name, collector, aggregate, scale, rounding, decimals and interval (its place in the
    file aside): samples of one can be continued under the other."""
    return a is not None and dataclasses.replace(a, path="") == dataclasses.replace(b, path="")


def changed_dimensions(old: Config, new: Config) -> list[Dimension]:
    """The old config's dimensions that the new one drops or bills differently: their open hour
    cannot be continued."""
    now = {d.name: d for d in new.dimensions}
    return [d for d in old.dimensions if not bills_alike(now.get(d.name), d)]
