"""health.json: what the seller's product reads to apply the failure mode of its listing.

`failing_since` is the first failed send or DryRun not yet followed by a success; `ok` is true
exactly when it is null. Rewritten atomically (temp file + rename), mode 0644 whatever the umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from agent.clock import iso, iso_hour
from agent.ledger import Ledger

HEALTH_FILE = "health.json"


def snapshot(ledger: Ledger) -> dict[str, Any]:
    failing_since = ledger.get_meta("failing_since")
    pending = {h.hour for h in ledger.pending()}
    data = {
        "ok": failing_since is None,
        "authorized": ledger.get_meta("authorized"),
        "last_success": iso(ledger.get_meta("last_success")),
        "failing_since": iso(failing_since),
        "pending_hours": len(pending),
        "reason": ledger.get_meta("reason") if failing_since is not None else None,
    }
    return _with_seal_errors(data, ledger)


def _with_seal_errors(data: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
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


def write(state_dir: Path, ledger: Ledger) -> dict[str, Any]:
    data = snapshot(ledger)
    target = Path(state_dir) / HEALTH_FILE
    fd, tmp = tempfile.mkstemp(prefix=".health.", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return data


def note_success(ledger: Ledger, now: float) -> None:
    ledger.update_meta(failing_since=None, last_success=now, reason=None)


def note_failure(ledger: Ledger, now: float, reason: str) -> None:
    values: dict[str, Any] = {"reason": reason}
    if ledger.get_meta("failing_since") is None:
        values["failing_since"] = now
    ledger.update_meta(**values)
