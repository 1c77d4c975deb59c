"""health.json: what the seller's product reads to apply the failure mode of its listing.

`failing_since` is the first failed send or DryRun not yet followed by a success. `ok` is true
exactly when it is null, no hour of the last 24 h was refused (`rejected`, or held pending for the
seller's configuration) or `expired` (a record of quantity 0 loses nothing and is ignored), the
ledger's instance identity is not awaiting IMDS, and no dimension found usage unread in the last
24 h (`Reading.unread`): lost revenue stays visible whatever was sent last. A per-record Status of
a BatchMeterUsage call that succeeded (CustomerNotSubscribed, DuplicateRecord) sets no
`failing_since`: the record shows here on its own. Rewritten atomically (temp file + rename), mode
0644 whatever the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
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


def snapshot(ledger: Facts, now: float | None = None) -> dict[str, Any]:
    now = Clock().time() if now is None else now
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


def write(state_dir: Path, ledger: Facts, now: float | None = None) -> dict[str, Any]:
    data = snapshot(ledger, now)
    target = Path(state_dir) / HEALTH_FILE
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
    return data
