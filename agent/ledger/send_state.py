"""The send state machine: authorized, backoff, failure streak, the DryRun due; one SendState
read in one query, written only by named transitions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from agent.ledger.database import Database


@dataclass(frozen=True)
class SendState:
    """The send state machine, kept in the meta table: read as one value (Ledger.send_state) and
    written only by the Ledger's named transitions, each in one transaction. Each field is the
    meta key of the same name."""

    authorized: bool | None = None  # False: paused until a DryRun passes; None: never checked
    dryrun_due: float | None = None
    backoff_until: float = 0.0  # no send before this (a failure streak's backoff)
    failures: int = 0  # failures in a row
    failing_since: float | None = None  # first failure not yet followed by a success
    last_success: float | None = None  # a send or a DryRun the service accepted
    last_accepted: float | None = None  # a usage record the service accepted (not a DryRun)
    reason: str | None = None  # the latest failure, while failing
    failure_hook_for: float | None = None  # the failing_since the failure hook ran for
    identity_unverified: str | None = None  # why IMDS must confirm the instance (host/identity.py)


class SendStates(Database):
    """The send state (meta keys), read as one SendState and changed only by the transitions
    below, each in one transaction."""

    def send_state(self, db: sqlite3.Connection | None = None) -> SendState:
        names = [f.name for f in fields(SendState)]
        sql = f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(names))})"
        with self._lock:
            rows = (db or self.db).execute(sql, names).fetchall()
        values = {k: json.loads(v) for k, v in rows if v is not None}
        return SendState(**{k: v for k, v in values.items() if v is not None})

    def _change(self, change: Callable[[SendState], dict[str, Any]]) -> None:
        """Apply one transition, computed from the state before it, in one transaction."""
        with self.transaction() as db:
            for key, value in change(self.send_state(db)).items():
                self.set_meta(db, key, value)

    def note_success(self, now: float, accepted: bool = False) -> None:
        """A send or DryRun succeeded: authorized, no failure streak, no backoff; `accepted`:
        the service took a usage record (the metrics' last accepted send)."""
        more = {"last_accepted": now} if accepted else {}
        self.update_meta(authorized=True, failures=0, backoff_until=None, failing_since=None,
                         last_success=now, reason=None, **more)  # fmt: skip

    def note_failure(self, now: float, reason: str) -> None:
        """Something failed: `reason` is the current one; failing since the first of a streak."""
        self._change(lambda s: dict(reason=reason, failing_since=s.failing_since or now))

    def back_off(self, now: float, reason: str, delay_for: Callable[[int], float]) -> float:
        """One more failure in a row: sends and a due DryRun wait `delay_for(failures)`, which
        it returns."""
        delay = []

        def change(s: SendState) -> dict[str, Any]:
            delay.append(delay_for(s.failures + 1))
            due = None if s.dryrun_due is None else max(s.dryrun_due, now + delay[0])
            return dict(failures=s.failures + 1, backoff_until=now + delay[0], dryrun_due=due,
                        reason=reason, failing_since=s.failing_since or now)  # fmt: skip

        self._change(change)
        return delay[0]

    def authorize(self) -> None:
        """A DryRun found the role and product fine: sending goes on, no DryRun due."""
        self.update_meta(authorized=True, dryrun_due=None)

    def deauthorize(self, now: float, reason: str, recheck_at: float) -> None:
        """Not authorized: sending pauses until a DryRun, due at `recheck_at`, passes."""
        self._change(lambda s: dict(authorized=False, dryrun_due=recheck_at, reason=reason,
                                    failing_since=s.failing_since or now))  # fmt: skip

    def schedule_dryrun(self, at: float) -> None:
        self.update_meta(dryrun_due=at)

    def mark_unverified(self, reason: str, started: float) -> None:
        """IMDS has not confirmed this is the ledger's instance: nothing is sealed or sent; the
        earliest unverified run's start is kept (its samples are this machine's)."""
        since = self.get_meta("unverified_since")
        since = started if since is None else min(since, started)
        self.update_meta(identity_unverified=reason, unverified_since=since)

    def mark_verified(self) -> None:
        self.update_meta(identity_unverified=None, unverified_since=None)

    def note_failure_hook(self, failing_since: float | None) -> None:
        """The failure hook ran for the streak that began at `failing_since` (None: recovered)."""
        self.update_meta(failure_hook_for=failing_since)
