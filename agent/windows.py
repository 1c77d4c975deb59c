"""The rules of time both modes bill by, in one place and with no I/O: what span a sample stands
for, the Timestamp a sealed record carries, when it is sent (the per-instance send slot), and
until when the service takes it (an instance hour's 6 h window, a SaaS record's 24 h window and
month-end cutoff).

Each mode (agent/modes/) picks its window from here; sealing, sending, `status` and the daemon's
schedule all ask these functions, so a rule is written once.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from agent.clock import HOUR, hour_start

# MeterUsage refuses a Timestamp older than 6 h (TimestampOutOfBounds): an instance hour is given
# up a minute before that.
EXPIRY = 6 * HOUR - 60
OUT_OF_WINDOW = "older than the 6 h MeterUsage window"
# BatchMeterUsage (SaaS records): 24 h less a minute, and a previous month's record is refused
# from 06:00 UTC on the 1st (SPEC "SaaS mode").
SAAS_EXPIRY = 24 * HOUR - 60
MONTH_CUTOFF = 6 * HOUR
SAAS_OUT_OF_WINDOW = "past the BatchMeterUsage window (24 h, or 06:00 UTC on the next month's 1st)"


def span_for(t: float, interval: int) -> float:
    """Seconds a sample at `t` stands for: until the next sampling instant, within its hour."""
    next_instant = (int(t // interval) + 1) * interval
    return float(min(next_instant, hour_start(t) + HOUR) - t)


def record_timestamp(last: float, hour: int) -> int:
    """A sealed record's Timestamp: the hour's last sample in whole seconds, never before the
    usage began, so the window counts from late in the hour. Carried samples may predate the
    hour: clamped into it."""
    return min(max(int(last), hour), hour + HOUR - 1)


def send_offset(instance_id: str, send_window: int) -> float:
    """The per-instance delay after each hour, in [0, send_window): a hash of the instance id, so
    a fleet spreads its calls evenly and one instance keeps the same slot across restarts."""
    if send_window <= 0:
        return 0.0
    digest = int.from_bytes(hashlib.sha256(instance_id.encode()).digest()[:8], "big")
    return (digest % (send_window * 1000)) / 1000.0


def send_slot(hour: int, offset: float) -> float:
    """When hour `hour` is first sent: at its end plus this instance's send offset."""
    return hour + HOUR + offset


def instance_expires_at(timestamp: float) -> float:
    """When an instance hour of this Timestamp can no longer be sent (MeterUsage's 6 h)."""
    return float(timestamp + EXPIRY)


def month_cutoff(timestamp: float) -> float:
    """06:00 UTC on the 1st of the month after `timestamp`'s: the service refuses the record
    from then on."""
    d = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    first = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=timezone.utc)
    return first.timestamp() + MONTH_CUTOFF


def saas_expires_at(timestamp: float) -> float:
    """When a SaaS record of this Timestamp can no longer be sent: the earlier of 24 h less a
    minute after it and 06:00 UTC on the next month's 1st (held usage too: saas_sealing)."""
    return min(float(timestamp + SAAS_EXPIRY), month_cutoff(timestamp))


def expired_upto(now: float) -> float:
    """The latest Timestamp a SaaS record can have and be expired at `now`: expiry
    (saas_expires_at) only grows with the Timestamp, so one bound selects them all."""
    month = datetime.fromtimestamp(now, tz=timezone.utc).replace(
        day=1, hour=0, minute=0, second=0, microsecond=0
    )
    upto = now - SAAS_EXPIRY
    if now >= month.timestamp() + MONTH_CUTOFF:  # last month's records are refused
        upto = max(upto, month.timestamp() - 1)
    return upto
