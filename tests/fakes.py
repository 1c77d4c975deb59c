"""Test doubles: a clock you move by hand and a psutil that answers what you tell it."""

from __future__ import annotations

from collections import namedtuple
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent.clock import Clock

VM = namedtuple("VM", "total available used")
Disk = namedtuple("Disk", "total used free")
Net = namedtuple("Net", "bytes_sent bytes_recv")


class FakeClock(Clock):
    """A clock that only moves when told to."""

    def __init__(self, t: float = 1_800_000_000.0) -> None:  # 2027-01-15T08:00:00Z
        super().__init__()
        self.t = float(t)
        self.slept: list[float] = []
        self.asleep = 0.0  # seconds the system spent suspended (what `suspended` reads)

    def time(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.t, tz=timezone.utc)

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def suspended(self) -> float:
        return self.asleep

    def suspend(self, seconds: float) -> None:
        """The system sleeps: wall time passes, and so does CLOCK_BOOTTIME, not CLOCK_MONOTONIC."""
        self.t += seconds
        self.asleep += seconds

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds

    @property
    def is_real(self) -> bool:
        return False


class FakePsutil:
    """Just enough of psutil's surface for the system collector."""

    def __init__(self) -> None:
        self.cpus = 4
        self.percent = 12.5
        self.percent_calls = 0
        self.vm = VM(total=8 * 2**30, available=6 * 2**30, used=1 * 2**30)
        self.disks: dict[str, Disk] = {"/": Disk(100 * 2**30, 25 * 2**30, 75 * 2**30)}
        self.nics: dict[str, Net] = {"eth0": Net(1000, 5000)}
        self.procs = ["systemd", "nginx", "nginx", "python3"]
        self.user_list: list[Any] = [object(), object()]
        self.boot = 1_700_000_000.0

    def cpu_count(self, logical: bool = True) -> int:
        return self.cpus

    def cpu_percent(self, interval: float | None = None) -> float:
        self.percent_calls += 1
        return self.percent

    def virtual_memory(self) -> VM:
        return self.vm

    def disk_usage(self, path: str) -> Disk:
        if path not in self.disks:
            raise FileNotFoundError(2, "No such file or directory", path)
        return self.disks[path]

    def net_io_counters(self, pernic: bool = False) -> Net | dict[str, Net]:
        if pernic:
            return dict(self.nics)
        return Net(*(sum(c) for c in zip(*self.nics.values(), strict=True)))

    def process_iter(self, attrs: list[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(info={"name": n}) for n in self.procs]

    def users(self) -> list[Any]:
        return self.user_list

    def boot_time(self) -> float:
        return self.boot


class FakeHost:
    """A procfs and sysfs under a temporary folder: the kernel's boot id and network interfaces."""

    def __init__(self, root: Path) -> None:
        self.proc = root / "proc"
        self.sys = root / "sys"
        (self.proc / "sys/kernel/random").mkdir(parents=True)
        (self.sys / "class/net").mkdir(parents=True)
        self._next_index = 1
        self.boot("boot-1")

    def boot(self, boot_id: str) -> None:
        (self.proc / "sys/kernel/random/boot_id").write_text(boot_id + "\n")

    def add_interface(self, name: str, device: bool) -> None:
        """An interface; `device`: backed by hardware (ENA, virtio), unlike lo, veth, bridges."""
        folder = self.sys / "class/net" / name
        folder.mkdir()
        if device:
            (folder / "device").mkdir()
        (folder / "ifindex").write_text(f"{self._next_index}\n")
        self._next_index += 1

    def remove_interface(self, name: str) -> None:
        folder = self.sys / "class/net" / name
        for child in sorted(folder.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        folder.rmdir()


class RecordingLog:
    """Stands in for a module's `log` (monkeypatched): records each event's level and arguments,
    never its wording, so a test asserts which events happened, for what, and how often."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda msg, *args, **kwargs: self.events.append((level, args))

    def at(self, level: str) -> list[tuple[Any, ...]]:
        """The arguments of every event at `level` (debug, info, warning, error...), in order."""
        return [args for lvl, args in self.events if lvl == level]
