"""`run` (the daemon), `send` (its sender child: what is due, then exit) and `register-usage`
(its RegisterUsage child)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.clock import Clock, iso
from agent.collecting.sampling import Sampler
from agent.collectors import Sources, imagerecord
from agent.commands.common import load_config, make_clock
from agent.config.loader import RUNNING_CONFIG, keep_snapshot, snapshot_config
from agent.config.model import Config
from agent.config.watch import FileWatch
from agent.daemon import metrics
from agent.daemon.daemon import Daemon
from agent.daemon.sender import SenderProcess, send_command
from agent.errors import EX_NOPERM, EX_OK, EX_UNAVAILABLE, AgentError, Unavailable
from agent.host import identity, ownership
from agent.host import platform as platforms
from agent.host.imds import resolve_region
from agent.host.locks import ProductLock, StateLock, is_loopback
from agent.ledger import Ledger
from agent.modes.choose import mode_for

log = logging.getLogger("agent")


def cmd_run(args: argparse.Namespace) -> int:
    from agent.collectors import linecount
    from agent.host import malloc

    malloc.one_arena()  # before any thread: see host/malloc.py
    linecount.compile_in_child()  # the compiler's memory stays out of the long-lived daemon
    cfg = load_config(args)
    ownership.check_writer(Path(cfg.state_dir), "run")
    return start(cfg, make_clock(args), log_format=args.log_format).run()


def cmd_send(args: argparse.Namespace) -> int:
    """Send what is due (all pending with --flush), in this process; used by `run` as a child."""
    from agent.host.imds import resolve_region
    from agent.sending import client as metering
    from agent.sending.send_pass import note_unreachable

    cfg = load_config(args)
    clock = make_clock(args)
    ownership.check_writer(Path(cfg.state_dir), "send --flush" if args.flush else "send")
    send_lock = StateLock(Path(cfg.state_dir), name="send.lock")
    send_lock.acquire(wait=True)  # one sender at a time, even an orphan of a killed daemon
    ledger = Ledger(cfg.state_dir)
    plat = platforms.detect(cfg.platform, os.environ)
    try:
        region, where = resolve_region(cfg.metering.region, platform=plat.name)
    except Unavailable as e:
        note_unreachable(ledger, cfg, clock.time(), str(e))
        return EX_UNAVAILABLE
    connect, read = call_timeouts(clock, args.deadline)
    client = metering.MeteringClient(
        region, cfg.metering.endpoint_url, connect, read, platform=plat.name
    )
    note_sender_context(ledger, plat, region, where, client)
    sender = mode_for(cfg).sender(ledger, cfg, client, clock)  # MeterUsage, or BatchMeterUsage
    report = sender.run(flush=args.flush, deadline=args.deadline)
    ledger.close()
    if report.paused:
        return EX_NOPERM
    return EX_UNAVAILABLE if report.retry else EX_OK


def call_timeouts(clock: Any, deadline: float | None) -> tuple[float, float]:
    """With a deadline (the stop flush), no call may block past it: the connect and read
    timeouts are capped at the seconds left (at least 1 s); none: botocore's own (5 s, 15 s)."""
    if deadline is None:
        return 5.0, 15.0
    left = max(1.0, (deadline - clock.time()) / clock.rate)
    return min(5.0, left), min(15.0, left)


def note_sender_context(ledger: Any, plat: Any, region: str, where: str, client: Any) -> None:
    """Keep in the ledger's meta what only the sender knows (botocore's credential source) with
    the region it signs for, for `status`; logged when it changes."""
    try:
        method = client.credential_source()
    except Exception as e:  # botocore raises many kinds while fetching from IMDS/ECS/STS
        method = f"lookup failed: {e}"
    context = {
        "platform": plat.name,
        "region": region,
        "region_source": where,
        "credential_source": method,
    }
    if ledger.get_meta("sender_context") != context:
        log.info(
            "sending as platform %s, region %s (from %s), credentials %s",
            plat.name,
            region,
            where,
            method,
        )
        ledger.update_meta(sender_context=context)


def cmd_register_usage(args: argparse.Namespace) -> int:
    """RegisterUsage once (with retries), for `run`: one JSON line on stdout (registration)."""
    from agent.sending import registration

    return registration.child_main(load_config(args), make_clock(args))


# -- run: the daemon's start --------------------------------------------------------------------


def take_product_lock(config: Config) -> ProductLock | None:
    """One sender per product per machine (host/locks.py); none for a loopback emulator."""
    if is_loopback(config.metering.endpoint_url):
        return None
    lock = ProductLock(config.product_code, Path(config.source).resolve())
    return lock if lock.acquire() else None


def start(config: Config, clock: Clock, log_format: str = "text") -> Daemon:
    """Take the locks, copy the config for the sender children, open the ledger verified by
    IMDS's instance id (or marked unverified, see identity): a Daemon ready to `run`."""
    metrics.check(config)  # its directory writable (78), before anything is taken or made
    state_dir = Path(config.state_dir)
    # SaaS mode's fulfillment handler child, if configured (its redirect checked now)
    handler = mode_for(config).registration(config, state_dir / RUNNING_CONFIG, clock, log_format)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        # The sleep hook signals the lock's holder: until Daemon.run listens, SIGUSR1 must not
        # end the process (its default). `run` sends what is due as soon as it runs.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        lock = StateLock(state_dir)  # kept: the flock lives as long as the file
        lock.acquire()
        product_lock = take_product_lock(config)
        watch = FileWatch(config.source)  # before the copy: a change after it is reloaded
        config, snapshot = snapshot_config(config.source, state_dir)
        keep_snapshot(state_dir, snapshot)
    except OSError as e:
        raise AgentError(
            f"state_dir {state_dir}: {e.strerror}; it must be writable by the agent's "
            "user (the unit's StateDirectory= makes /var/lib/metering-agent so)"
        ) from None
    earlier = earlier_ledger_this_boot(  # before this run writes
        state_dir,
        Sources().boot_time(),
        {str(product_lock.path): product_lock.written_before} if product_lock else {},
    )
    now = clock.time()
    plat = platforms.detect(config.platform, os.environ)
    metadata = platforms.TaskMetadata(os.environ) if plat.name == "ecs" else None
    ident: identity.Identity
    if plat.container:  # PlatformError (69, one line) when the task or pod cannot be named
        task_id, source = platforms.identity(plat.name, os.environ, metadata)
        ident = identity.ContainerIdentity(task_id, source, clock, state_dir)
    else:  # the EC2 instance (IMDS), or in SaaS mode the seller's host
        ident = mode_for(config).identity(clock, state_dir)
    ledger = Ledger(state_dir)  # LedgerDamaged (exit 1, one line): empty, or its -wal gone
    repaired = ledger.verify(now)  # quick_check; rebuilt from its tables, or LedgerDamaged
    if repaired:
        log.warning("ledger %s: %s", ledger.path, repaired)
        if ledger.reopen:
            ledger = Ledger(state_dir)
    ledger = ident.start(ledger)
    # `status` may run in another environment (a shell on the node, kubectl exec): it shows this
    ledger.update_meta(run_platform={"name": plat.name, "how": plat.how})
    if config.register_usage is not None:  # once, before sampling; a refusal ends `run` (77)
        from agent.sending import registration

        registration.at_start(
            registration.child_command(state_dir / RUNNING_CONFIG, clock, log_format), ledger
        )
    if config.metering.startup_check:
        ledger.schedule_dryrun(now)
    command = functools.partial(send_command, state_dir / RUNNING_CONFIG, clock, log_format)
    sender = SenderProcess(command, clock.monotonic)
    where = describe_platform(config, plat, ledger, ident, metadata)
    sampler = Sampler(config, sources=first_boot_sources(state_dir, ledger, clock, earlier))
    # SaaS mode's subscription queue child, if configured (boto3 lives there, not here)
    notices = mode_for(config).notifications(config, state_dir / RUNNING_CONFIG, clock, log_format)
    return Daemon(config, clock, ledger, ident, sampler, sender, (lock, product_lock),
                  plat, where, registration=handler, modes=mode_for,
                  notifications=notices, config_watch=watch)  # fmt: skip


def first_boot_sources(
    state_dir: Path, ledger: Ledger, clock: Clock, earlier: str | None = None
) -> Sources:
    """The collectors' sources, with the image record when this is the first boot of an
    instance made from the image (claimed now, so it never applies to a later boot); `earlier`:
    what shows a ledger was used before in this boot (see earlier_ledger_this_boot)."""
    sources = Sources()
    try:
        record, line = imagerecord.claim(
            state_dir, ledger.get_meta("instance_id"), sources.boot_id(), iso(clock.time()) or ""
        )
    except OSError as e:  # cannot mark it used: not used, rather than used at every start
        record, line = None, f"image record not used: cannot write it ({e.strerror})"
    log.info("where logs start: %s", line)
    sources.image = record
    if earlier is not None:
        sources.count_from_boot = False
        log.info(
            "counters: a ledger was used earlier in this boot (%s), so a counter without a saved "
            "reading starts from its first reading, not from 0 (what it counted may be billed)",
            earlier,
        )
    return sources


def earlier_ledger_this_boot(
    state_dir: Path, boot_time: Decimal | None, written: Mapping[str, float | None] | None = None
) -> str | None:
    """A file written since the machine booted by a run with another ledger: the health file
    (every run writes it; `prepare-image` removes it), a ledger moved aside as damaged
    (`reset-ledger`), or outside the state dir (which may have been deleted with its ledger) the
    product lock an earlier run wrote (`written`: name -> when, taken before this run wrote it).
    Asked before this run writes its own health file."""
    if boot_time is None:
        return None
    for path in [state_dir / "health.json", *sorted(state_dir.glob("ledger.db.damaged-*"))]:
        try:
            if path.stat().st_mtime > boot_time:
                return path.name
        except OSError:
            continue
    for name, when in (written or {}).items():
        if when is not None and when > boot_time:
            return name
    return None


def describe_platform(
    config: Config,
    plat: platforms.Platform,
    ledger: Ledger,
    ident: identity.Identity,
    metadata: platforms.TaskMetadata | None,
) -> str:
    """The start-up line's platform part: platform and how decided, identity and its source,
    region and its source, the credentials the environment points at (botocore's own answer
    is the sender's, kept for `status`). IMDS is asked for the region only on EC2 once it has
    answered for the identity, so a slow first boot is not slowed further."""
    region = "region at send time"
    if plat.container or ledger.get_meta("instance_id_source") == "imds":
        try:
            name, source = resolve_region(
                config.metering.region, platform=plat.name, metadata=metadata
            )
            region = f"region {name} (from {source})"
        except Unavailable as e:
            region = f"region unresolved ({e})"
    elif config.metering.region != "auto":
        region = f"region {config.metering.region} (from config metering.region)"
    policy = platforms.check_failure_policy(config.metering.on_check_failure, plat.name)
    return (
        f"platform {plat.name} ({plat.how}), identity {ledger.get_meta('instance_id')} (from "
        f"{ledger.get_meta('instance_id_source')}), {region}, credentials expected: "
        f"{platforms.expected_credentials(os.environ)}, on check failure: {policy}"
    )
