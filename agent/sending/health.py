"""health.json: what the seller's product reads to apply the failure mode of its listing.

`failing_since` is the first failed send or DryRun not yet followed by a success. `ok` is true
exactly when it is null, no hour of the last 24 h was refused (`rejected`, or held pending for the
seller's configuration) or `expired` (a record of quantity 0 loses nothing and is ignored), the
ledger's instance identity is not awaiting IMDS, and no dimension found usage unread in the last
24 h (`Reading.unread`): lost revenue stays visible whatever was sent last. A per-record Status of
a BatchMeterUsage call that succeeded (CustomerNotSubscribed, DuplicateRecord) sets no
`failing_since`: the record shows here on its own. Rewritten atomically (temp file + rename), mode
0644 whatever the umask; on a full disk, where no new file can be made, rewritten in place.

`storage` is the daemon's own storage problem (disk full, ledger damaged, state dir gone: see
agent/daemon/storage.py), null when it can store what it reads; only the daemon knows it, so a
writer that does not pass it (the sender child) keeps what the file says.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from agent.clock import HOUR, Clock, hour_start, iso, iso_hour
from agent.host.ownership import adopt
from agent.ledger.dimensions import UnreadUsage
from agent.ledger.hours import SealedHour
from agent.ledger.send_state import SendState
from agent.sending.outcomes import HELD


class Facts(Protocol):
    """What health reads from the ledger (agent.ledger.Ledger): the send state, the records that
    lost revenue, usage found unread, the pending hours and the hours that cannot be sealed."""

    def send_state(self) -> SendState: ...

    def lost_records(
        self, since: float, held_codes: Iterable[str]
    ) -> tuple[int, SealedHour | None]: ...

    def unread_usage(self, since: float | None = None) -> list[UnreadUsage]: ...

    def pending_hour_count(self) -> int: ...

    def seal_errors(self) -> list[tuple[str, int, str]]: ...


HEALTH_FILE = "health.json"
LOOKBACK = 24 * HOUR


def refused_hours(ledger: Facts, now: float) -> tuple[int, SealedHour | None]:
    """Records of the last 24 h that lost revenue or may: rejected, expired, or held for the
    seller's configuration (product code, dimension); their count and the newest. A record of
    quantity 0 (an idle zero) loses nothing and is not counted. Counted in SQL (ledger)."""
    return ledger.lost_records(hour_start(now) - LOOKBACK, HELD)


def describe(h: SealedHour) -> str:
    state = "refused (held)" if h.state == "pending" else h.state
    whose = f" customer {h.customer}" if h.customer else ""
    return (
        f"hour {iso_hour(h.hour)} dimension {h.dimension}{whose} {state}: "
        f"{h.last_error or 'no answer'}"
    )


def unread_reason(ledger: Facts, now: float) -> str | None:
    """The newest usage a collector found unread in the last 24 h (the lookback of refused
    hours: lost revenue stays visible), with its fix; None if there is none."""
    found = ledger.unread_usage(since=now - LOOKBACK)
    if not found:
        return None
    reason = describe_unread(found[0])
    if len(found) > 1:
        reason += f" (and {len(found) - 1} more dimension(s))"
    return reason


def describe_unread(u: UnreadUsage) -> str:
    return f"dimension {u.dimension}: usage went unread (found {iso(u.t)}): {u.what}; fix: {u.fix}"


def snapshot(
    ledger: Facts, now: float | None = None, storage: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Health from the ledger's facts; with a storage problem (`storage`, its `reason` first),
    not ok, and facts the ledger cannot give (damaged, gone) left unknown."""
    now = Clock().time() if now is None else now
    if storage is None:
        return _from_ledger(ledger, now)
    try:
        data = _from_ledger(ledger, now)
    except sqlite3.Error:
        data = {"ok": False, "authorized": None, "last_success": None, "failing_since": None,
                "pending_hours": 0, "reason": None}  # fmt: skip
    reason = "; ".join(r for r in (storage["reason"], data["reason"]) if r)
    return {**data, "ok": False, "reason": reason, "storage": storage}


def _from_ledger(ledger: Facts, now: float) -> dict[str, Any]:
    state = ledger.send_state()
    reasons = []
    if state.identity_unverified:
        reasons.append(state.identity_unverified)
    n_lost, newest = refused_hours(ledger, now)
    lost = newest is not None
    if newest is not None:
        more = f" (and {n_lost - 1} more hour(s) in the last 24 h)" if n_lost > 1 else ""
        reasons.append(describe(newest) + more)
    if state.failing_since is not None:
        current = state.reason
        if current and current not in reasons and not (lost and current in reasons[-1]):
            reasons.append(current)
    unread = unread_reason(ledger, now)
    if unread is not None:
        reasons.append(unread)
    data = {
        "ok": state.failing_since is None
        and not lost
        and not state.identity_unverified
        and unread is None,
        "authorized": state.authorized,
        "last_success": iso(state.last_success),
        "failing_since": iso(state.failing_since),
        "pending_hours": ledger.pending_hour_count(),
        "reason": "; ".join(reasons) or None,
        "storage": None,
    }
    return _with_seal_errors(data, ledger)


def _with_seal_errors(data: dict[str, Any], ledger: Facts) -> dict[str, Any]:
    """An hour that cannot be sealed is revenue at risk: not ok, and the reason names it."""
    errors = ledger.seal_errors()
    if not errors:
        return data
    dimension, hour, error = errors[0]
    reason = f"hour {iso_hour(hour)} dimension {dimension}: cannot seal: {error}"
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more dimension(s))"
    if data["reason"]:
        reason = f"{data['reason']}; {reason}"
    return {**data, "ok": False, "reason": reason}


KEEP: Any = object()  # write(): keep the storage problem the file already names


def written_storage(state_dir: Path) -> dict[str, Any] | None:
    """The storage problem health.json names (null, or no readable file: None)."""
    try:
        found = json.loads((Path(state_dir) / HEALTH_FILE).read_text()).get("storage")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, dict) and found.get("reason") else None


def write(
    state_dir: Path, ledger: Facts, now: float | None = None, storage: Any = KEEP
) -> dict[str, Any]:
    if storage is KEEP:
        storage = written_storage(state_dir)
    data = snapshot(ledger, now, storage)
    target = Path(state_dir) / HEALTH_FILE
    try:
        _replace(Path(state_dir), target, data)
    except FileNotFoundError:
        if Path(state_dir).is_dir():
            raise
        # the state dir was deleted (a sender child running then): nowhere to write; the
        # daemon notices it gone, makes it again and writes health there
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not target.exists():
            raise
        _rewrite_in_place(target, data)
    return data


def _rewrite_in_place(target: Path, data: dict[str, Any]) -> None:
    """A full disk has no room for a new file, but the old one's blocks are its own: one write
    over them, then cut to length. Not atomic, so only when the atomic way cannot be taken."""
    text = (json.dumps(data, indent=1) + "\n").encode()
    fd = os.open(target, os.O_WRONLY)
    try:
        os.write(fd, text)
        os.ftruncate(fd, len(text))
    finally:
        os.close(fd)


def _replace(state_dir: Path, target: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".health.", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        adopt(Path(state_dir), Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
