"""`status`: what the ledger says, for a seller's support team or a buyer's auditor.

Reads only; works while the daemon runs (WAL) and before it ever ran. Whether `run` is active is
the state lock's answer (see `daemon_state`), not a guess from the ledger's last sample.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent.billing.saas_sealing import NO_LABEL, UNSUBSCRIBED
from agent.clock import HOUR, Clock, hour_start, iso, iso_hour
from agent.commands.common import (
    first_reading_line,
    hour_row,
    load_config,
    open_ledger_readonly,
    table,
)
from agent.config.model import Config
from agent.errors import EX_OK, EX_SOFTWARE, AgentError
from agent.host import platform as platforms
from agent.ledger import Ledger
from agent.ledger.database import LEDGER_FILE
from agent.ledger.dimensions import UnreadUsage
from agent.ledger.faults import DAMAGED, LedgerDamaged, kind_of, refuse_damaged
from agent.modes.choose import mode_for
from agent.modes.mode import Mode
from agent.sending import health
from agent.sending.policy import due, sendable_at
from agent.warnings import KEY_ROTATION, OTHER_MODE_RECORDS
from agent.warnings import line as warning_line
from agent.windows import send_offset, send_slot


def daemon_state(state_dir: Path) -> dict[str, Any]:
    """Whether `run` holds <state_dir>/lock, with the pid and version it wrote there.

    Probed with a non-blocking shared flock, released at once: it fails exactly while a `run`
    holds the lock. `running` is None when the lock file cannot be opened (not readable).
    """
    answer: dict[str, Any] = {"running": False, "pid": None, "version": None}
    try:
        f = open(Path(state_dir) / "lock")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return answer
    except OSError:
        return {**answer, "running": None}
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _, version = f.read().strip().partition(" ")
            pid_or_none = int(pid) if pid.isdigit() else None
            return {"running": True, "pid": pid_or_none, "version": version or None}
        fcntl.flock(f, fcntl.LOCK_UN)
    return answer


def live_storage(state_dir: Path) -> dict[str, Any] | None:
    """The storage problem (disk full, ledger damaged, state dir gone) that the running daemon
    wrote in health.json: only it can know; a stopped agent's file says nothing of now."""
    if daemon_state(state_dir)["running"] is not True:
        return None
    return health.written_storage(state_dir)


def check(state_dir: Path, clock: Clock) -> bool:
    """`status --check`: health computed from the ledger as the daemon does, with the running
    daemon's storage state; where the ledger cannot be read (a product's own user: it is the
    agent's, mode 0600), health.json's `ok`, written 0644 for that reader. No ledger yet, a
    damaged one, or nothing readable: not ok."""
    try:
        path = Path(state_dir) / LEDGER_FILE
        if not path.is_file():
            return False
        refuse_damaged(path)
        ledger = Ledger(state_dir, readonly=True)
        try:
            return bool(health.snapshot(ledger, clock.time(), live_storage(state_dir))["ok"])
        finally:
            ledger.close()
    except LedgerDamaged:
        return False
    except sqlite3.DatabaseError as e:
        if kind_of(e) == DAMAGED:
            return False
        return _written_ok(state_dir)
    except (OSError, AgentError):
        return _written_ok(state_dir)


def _written_ok(state_dir: Path) -> bool:
    """health.json's `ok`, for a reader that cannot open the ledger."""
    try:
        return json.loads((Path(state_dir) / health.HEALTH_FILE).read_text())["ok"] is True
    except (OSError, ValueError, TypeError, KeyError):
        return False


def platform_report(ledger: Ledger | None, config: Config) -> dict[str, Any]:
    """The platform the running daemon recorded at its start (else detected here, from this
    environment: `status` may run elsewhere, say in a shell on the node), the identity the ledger
    carries, and the region and credential source the last sender used (its ledger meta)."""
    recorded = (ledger.get_meta("run_platform") if ledger else None) or {}
    if recorded.get("name"):
        name, how, source = recorded["name"], recorded.get("how"), "recorded by run"
    else:
        plat = platforms.detect(config.platform, os.environ)
        name, how, source = plat.name, plat.how, "detected by status"
    sent_as = (ledger.get_meta("sender_context") if ledger else None) or {}
    return {
        "name": name,
        "detected": how,
        "platform_source": source,
        "identity": ledger.get_meta("instance_id") if ledger else None,
        "identity_source": ledger.get_meta("instance_id_source") if ledger else None,
        "region": sent_as.get("region"),
        "region_source": sent_as.get("region_source"),
        "credential_source": sent_as.get("credential_source"),
        "on_check_failure": platforms.check_failure_policy(config.metering.on_check_failure, name),
    }


def collect(
    ledger: Ledger | None,
    config: Config,
    clock: Clock,
    hours: int = 24,
    mode: Mode | None = None,
) -> dict[str, Any]:
    """The status report; `mode` as chosen from the config (mode_for) when not given."""
    now = clock.time()
    mode = mode or mode_for(config)
    if ledger is None:
        return {
            "state_dir": str(config.state_dir),
            "platform": platform_report(None, config),
            "daemon": daemon_state(config.state_dir),
            "first_reading": _first_reading(config, None),
            "ledger": None,
            "health": None,
            "dimensions": [{"name": d.name} for d in config.dimensions],
            "hours": [],
        }
    instance_id = ledger.get_meta("instance_id")
    offset = send_offset(instance_id or "", config.metering.send_window)
    dims = {s.dimension: s for s in ledger.dimension_status()}
    seal_errors = {d: (h, e) for d, h, e in ledger.seal_errors()}
    unread = {u.dimension: u for u in ledger.unread_usage()}
    since = hour_start(now) - hours * HOUR
    so_far = {d.name: mode.so_far(ledger, d, hour_start(now)) for d in config.dimensions}
    daemon = daemon_state(config.state_dir)
    # stopped, nothing goes out: only what the next start would send at once (or `-`)
    if daemon["running"] is False:
        when = due(ledger.send_state(), mode.pending_bounds(ledger), mode.expires_at)
    else:
        when = next_send(ledger, config, now, mode)
    return {
        "state_dir": str(config.state_dir),
        "ledger": str(ledger.path),
        "daemon": daemon,
        "platform": platform_report(ledger, config),
        "first_reading": _first_reading(config, instance_id),
        "instance_id": instance_id,
        "send_offset_seconds": round(offset, 3),
        "next_send": iso(when),
        "health": health.snapshot(ledger, now, live_storage(config.state_dir)),
        "other_mode_pending": other_mode_pending(ledger, mode),
        "unsealed_samples": ledger.unsealed_sample_count(),
        "current_hour": iso_hour(now),
        "dimensions": [
            {
                "name": d.name,
                "aggregate": d.aggregate,
                "current_hour_so_far": so_far[d.name],
                "last_sample": iso(dims[d.name].last_t) if d.name in dims else None,
                "last_value": dims[d.name].last_value if d.name in dims else None,
                "collector_errors": dims[d.name].errors if d.name in dims else 0,
                "last_error": dims[d.name].last_error if d.name in dims else None,
                "last_error_at": iso(dims[d.name].error_t) if d.name in dims else None,
                "dropped_late_samples": dims[d.name].dropped if d.name in dims else 0,
                "seal_error": (
                    {"hour": iso_hour(seal_errors[d.name][0]), "error": seal_errors[d.name][1]}
                    if d.name in seal_errors
                    else None
                ),
                "unread": unread_report(unread.get(d.name)),
            }
            for d in config.dimensions
        ],
        "hours": [{**mode.key(h), **hour_row(h)} for h in ledger.hours(since=since)],
        "register_usage": registration_status(ledger, config),
        **mode.status(ledger, config, now),
    }


def _first_reading(config: Config, instance_id: str | None) -> str | None:
    """What decides where a log's first reading starts; None without log dimensions."""
    if not any(d.collector.type == "log" for d in config.dimensions):
        return None
    return first_reading_line(config.state_dir, instance_id)


def next_send(ledger: Ledger, config: Config, now: float, mode: Mode | None = None) -> float | None:
    """When the next send is due, for `status`: `due`, or the open hour's send slot if sooner (it
    is sealed at its end and sent at its end plus this instance's send offset); `mode` as chosen
    from the config when not given."""
    mode = mode or mode_for(config)
    state = ledger.send_state()
    if state.identity_unverified:  # as in due(): nothing leaves
        return None
    offset = send_offset(ledger.get_meta("instance_id") or "", config.metering.send_window)
    times = (
        due(state, mode.pending_bounds(ledger), mode.expires_at),
        sendable_at(state, send_slot(hour_start(now), offset)),
    )
    return min((t for t in times if t is not None), default=None)


def unread_report(u: UnreadUsage | None) -> dict[str, Any]:
    """Usage the dimension's collector found lost for good (kept 90 days): the events, the
    amount known lost (bytes; an event whose amount is unknown adds 0), and the newest with its
    fix (health names it for 24 h)."""
    if u is None:
        return {"events": 0, "amount": 0, "newest": None}
    newest = {"at": iso(u.t), "what": u.what, "fix": u.fix}
    return {"events": u.events, "amount": u.amount, "newest": newest}


def registration_status(ledger: Ledger, config: Config) -> dict[str, Any] | None:
    """The last RegisterUsage of `run` (ledger meta), with the key rotation warning if the
    service named one; None when register_usage is not configured."""
    if config.register_usage is None:
        return None
    from agent.sending.registration import META, rotation_warning

    last = ledger.get_meta(META) or {}
    rotation = last.get("rotation")
    version = last.get("public_key_version", config.register_usage.public_key_version)
    return {
        "registered_at": iso(last["at"]) if last.get("at") is not None else None,
        "public_key_version": version,
        "signature_verified": last.get("verified"),
        "rotation_timestamp": iso(rotation) if rotation is not None else None,
        "warning": rotation_warning(version, rotation) if rotation is not None else None,
    }


def other_mode_pending(ledger: Ledger, mode: Mode) -> dict[str, Any] | None:
    """Pending records of the mode not configured (left by a config of that mode, same
    state_dir): not sent, not expired; they wait for a config of their mode."""
    other = mode.other_pending(ledger)
    if other is None:
        return None
    name, n, oldest = other
    return {"mode": name, "records": n, "oldest_hour": iso_hour(oldest)}


def render(report: dict[str, Any]) -> str:
    lines = [_daemon_line(report["daemon"])]
    if report["ledger"] is None:
        lines.append(
            f"no ledger yet in {report['state_dir']}: `metering-agent run` has not started"
        )
        lines.append(_platform_line(report["platform"]))
        if report["first_reading"]:
            lines.append(f"  logs' first reading: {report['first_reading']}")
        return "\n".join(lines)
    h = report["health"]
    since = f" since {h['failing_since']}" if h["failing_since"] else ""
    verdict = "ok" if h["ok"] else f"FAILING{since}: {h['reason']}"
    lines.append(f"metering health: {verdict}")
    storage = h.get("storage")
    if storage:
        lines.append(
            f"  storage: {storage['state'] or 'works again'}   readings in memory: "
            f"{storage['readings_in_memory']}   folded into later readings: "
            f"{sum(storage['readings_folded'].values())}   dropped: "
            f"{sum(storage['readings_dropped'].values())}"
        )
    lines.append(
        f"  authorized: {_text(h['authorized'])}   last success: {_text(h['last_success'])}   "
        f"pending hours: {h['pending_hours']}   next send: {_text(report['next_send'])}"
    )
    lines.append(
        f"  instance: {report['instance_id']}   send slot: +{report['send_offset_seconds']} s"
    )
    lines.append(_platform_line(report["platform"]))
    if report["first_reading"]:
        lines.append(f"  logs' first reading: {report['first_reading']}")
    other = report.get("other_mode_pending")
    if other:
        text = (
            f"{other['records']} pending record(s) of mode {other['mode']} (from hour "
            f"{other['oldest_hour']}) are not sent in this mode; they wait for mode: "
            f"{other['mode']}"
        )
        lines.append(f"  {warning_line(OTHER_MODE_RECORDS, text)}")
    reg = report.get("register_usage")
    if reg is not None:
        verified = {True: "verified", False: "not verified", None: "-"}[reg["signature_verified"]]
        lines.append(
            f"  RegisterUsage: registered at {_text(reg['registered_at'])}   public key version "
            f"{reg['public_key_version']}   signature {verified}"
        )
        if reg["warning"]:
            lines.append(f"  {warning_line(KEY_ROTATION, 'RegisterUsage: ' + reg['warning'])}")
    lines.append("")
    lines.append(f"dimensions (current hour {report['current_hour']}, so far in billed units):")
    for d in report["dimensions"]:
        line = f"  {d['name']:<24} so far {_text(d['current_hour_so_far']):<10}"
        line += f"   last sample {_text(d['last_sample'])} value {_text(d['last_value'])}"
        if d["last_error"]:  # cleared by the collector's next good reading
            line += f"   errors {d['collector_errors']} (last: {d['last_error']})"
            line += f" at {d['last_error_at']}"
        if d["dropped_late_samples"]:
            line += f"   dropped late samples {d['dropped_late_samples']}"
        if d.get("seal_error"):
            line += f"   CANNOT SEAL {d['seal_error']['hour']}: {d['seal_error']['error']}"
        lines.append(line)
        unread = d["unread"]
        if unread["newest"] is not None:
            newest = unread["newest"]
            lines.append(
                f"    UNREAD {unread['events']} event(s) (amount known lost: {unread['amount']}); "
                f"newest found {newest['at']}: {newest['what']}; fix: {newest['fix']}"
            )
    lines.append("")
    if report.get("mode") == "saas":
        return "\n".join(lines + _saas_lines(report))
    header = ["HOUR", "DIMENSION", "QUANTITY", "STATE", "RECORD ID", "TRIES", "LAST ERROR"]
    cells = [
        [r["hour"], r["dimension"], r["quantity"], r["state"], r["record_id"] or "-",
         str(r["attempts"]), r["last_error"] or ""]
        for r in report["hours"]
    ]  # fmt: skip
    lines.extend(table([header, *cells]) if cells else ["no sealed hours in this period"])
    return "\n".join(lines)


def _platform_line(p: dict[str, Any]) -> str:
    region = f"{p['region']} (from {p['region_source']})" if p["region"] else "- (not sent yet)"
    return (
        f"  platform: {p['name']} ({p['detected']}; {p['platform_source']})   identity from: "
        f"{_text(p['identity_source'])}   region: {region}   credentials: "
        f"{_text(p['credential_source'])}"
    )


def _saas_lines(report: dict[str, Any]) -> list[str]:
    """SaaS mode: a row per customer record, then the usage held for unknown customers."""
    c = report["customers"]
    lines = [f"customers: {c['known']} known, {c['removed']} removed"]
    subs = report.get("subscriptions") or {"by_state": {}, "attention": []}
    if subs["by_state"]:
        lines.append("  subscriptions: " + ", ".join(f"{n} {k}" for k, n in
                                                       subs["by_state"].items()))  # fmt: skip
    for s in subs["attention"]:
        lines.append(f"  customer {s['customer']}: {s['state']} since {s['since']}")
    for name, by in report["current_hour_so_far_by_customer"].items():
        if by:
            lines.append(f"  {name} so far: " + ", ".join(f"{k} {v}" for k, v in by.items()))
    lines.append("")
    header = ["HOUR", "CUSTOMER", "DIMENSION", "QUANTITY", "STATE", "RECORD ID", "TRIES",
              "LAST ERROR"]  # fmt: skip
    cells = [
        [r["hour"], r["customer"], r["dimension"], r["quantity"], r["state"],
         r["record_id"] or "-", str(r["attempts"]), r["last_error"] or ""]
        for r in report["hours"]
    ]  # fmt: skip
    held = [
        [h["hour"], f"{h['customer']} ({h['label'] or NO_LABEL})", h["dimension"],
         _text(h["quantity"]), "held", "-", "0",
         f"not sent (after its unsubscribe); kept until {h['expires_at']}"
         if h["customer"] == UNSUBSCRIBED else f"sealed once added; expires {h['expires_at']}"]
        for h in report["held"]
    ]  # fmt: skip
    rows = cells + held
    lines.extend(table([header, *rows]) if rows else ["no sealed hours in this period"])
    return lines


def _daemon_line(daemon: dict[str, Any]) -> str:
    if daemon["running"] is None:
        return "agent: cannot tell whether `run` is active (state lock not readable)"
    if not daemon["running"]:
        return "agent: `run` is not active"
    return f"agent: running, pid {_text(daemon['pid'])}, version {_text(daemon['version'])}"


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return str(value)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.check:  # a product's own probe: exit 0 or 1 only (SPEC); no ledger yet is not ok
        return EX_OK if check(cfg.state_dir, Clock()) else EX_SOFTWARE
    ledger = open_ledger_readonly(cfg.state_dir)
    report = collect(ledger, cfg, Clock(), hours=args.hours)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return EX_OK
