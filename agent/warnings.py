"""Every warning a command prints: a fixed set of names, one prefix, one line each.

Why a registry: a seller acknowledges a warning by its name in the config (`warnings: {accept:
[NAME, ...]}`: "I mean it") and `check --strict` fails on the ones left; both need the names to be
a known, documented set, so the loader can refuse a name that is not one of them. A warning is
printed as `warning [NAME] what, where; the fix`.

No imports of the agent's own: the config's tables (the lowest layer that needs the names) and
every command import it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

PREFIX = "warning"


@dataclass(frozen=True)
class Kind:
    """A kind of warning: its name (what `warnings.accept` lists) and what it means."""

    name: str
    means: str


KINDS: dict[str, Kind] = {}


def _kind(name: str, means: str) -> Kind:
    kind = Kind(name, means)
    KINDS[name] = kind
    return kind


LOOPBACK_ENDPOINT = _kind(
    "loopback_endpoint",
    "metering.endpoint_url is on this machine (the emulator?): an image baked with it bills "
    "nothing (prepare-image refuses it)",
)
ROUNDING_UP = _kind(
    "rounding_up",
    "rounding: up with a scale below the billed step bills a whole step for any usage in an hour",
)
SOURCE_MISSING = _kind(
    "source_missing", "check --offline: a collector's source is not there yet (fine at boot)"
)
COLLECTOR_PROBLEM = _kind(
    "collector_problem", "a collector read, but part of its source was not as configured"
)
COLLECTOR_FAILED = _kind("collector_failed", "sample: a collector's read failed")
USAGE_UNREAD = _kind("usage_unread", "sample: usage the log collector can tell went unread")
SERVICE_CANNOT_READ = _kind(
    "service_cannot_read", "check as root: the service's user could not read a log"
)
IDENTITY_UNVERIFIED = _kind(
    "identity_unverified", "check: IMDS did not give the instance id (`run` keeps asking)"
)
STATIC_CREDENTIALS = _kind(
    "static_credentials", "on ECS/EKS: long-lived access keys in place of the task role or IRSA"
)
KEY_ROTATION = _kind(
    "key_rotation", "RegisterUsage: the listing's public key version is being rotated out"
)
OTHER_MODE_RECORDS = _kind(
    "other_mode_records",
    "status: the ledger holds pending records of the other mode (instance or saas), not sent",
)
UNSENT_HOURS = _kind(
    "unsent_hours", "prepare-image: the ledger it removes holds hours sealed and never sent"
)


def line(kind: Kind, text: str) -> str:
    """The one form every warning takes."""
    return f"{PREFIX} [{kind.name}] {text}"


@dataclass
class Warnings:
    """Where one command's warnings go: printed unless the config accepts their kind, and
    remembered, so that `check --strict` can fail on the ones printed."""

    accepted: frozenset[str] = frozenset()
    out: Any = None  # a text stream; None: stdout at the time of printing
    shown: list[str] = field(default_factory=list)  # names printed, in order (repeats kept)
    silenced: list[str] = field(default_factory=list)  # names the config accepts

    def say(self, kind: Kind, text: str) -> None:
        if kind.name in self.accepted:
            self.silenced.append(kind.name)
            return
        self.shown.append(kind.name)
        print(line(kind, text), file=self.out or sys.stdout, flush=True)

    def strict_failure(self) -> str | None:
        """`check --strict`: one line naming the warnings printed and the two ways out."""
        if not self.shown:
            return None
        names = ", ".join(dict.fromkeys(self.shown))
        return (
            f"check --strict: {len(self.shown)} warning(s) not accepted ({names}); fix them, or "
            "list their names under warnings.accept in the config if they are meant"
        )
