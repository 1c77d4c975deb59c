"""`run`: wires clock, collectors, ledger and sender into APScheduler jobs; signals; the stop flush.

Jobs (all on the injected clock, through ClockTrigger):
- one sampling job per distinct interval: hand each dimension's read to its own worker thread
  (a daemon), with a total deadline (`reads.py`); each read stores its sample with its position;
- a boundary job at every hour: seal (sealing also runs after each round and at start-up, and looks
  at the ledger, not at which trigger fired, so a suspend never skips or repeats an hour);
- a send tick: when the ledger has work due (an hour past its per-instance send slot, a retry, a
  DryRun), run `metering-agent send` as a short-lived child. boto3 is loaded only there, so the
  sampling process stays small.

Wall-clock steps: APScheduler 3 keeps each job's next run as an absolute time and sleeps on the
monotonic clock, so a step back of ten minutes would stall every job (the watchdog ping too) for
ten minutes. The main thread wakes every second on the monotonic clock, asks the Clock whether the
wall clock stepped, and if so gives every ClockTrigger job (sampling, sealing, the send tick, the
watchdog) its next fire time from the new wall time, then wakes the scheduler. A forward step runs
each job once (coalesced), never a burst. Sealing looks at the ledger, not at the trigger, and the
ledger refuses an instant a dimension already has, so re-lived minutes are not billed twice.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.date import DateTrigger

from agent import health, identity, ownership, sealing, stopreason
from agent.clock import HOUR, Clock, hour_start, iso, iso_hour
from agent.config import Config, Dimension, load
from agent.errors import AgentError, LockHeld
from agent.hooks import Hooks
from agent.ledger import INSTANT_TAKEN, Ledger
from agent.metering import Imds
from agent.productlock import ProductLock, is_loopback
from agent.reads import Reads
from agent.sampling import Sample, Sampler
from agent.sdnotify import Notifier
from agent.sending import next_due, work_due

log = logging.getLogger(__name__)

SEND_TICK = 15  # seconds of clock time between checks for due work
STOP_FLUSH = 30  # seconds the stop flush may spend sending
SENDER_TIMEOUT = 600  # a send child that runs longer than this is killed (it is safe to)
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


def keep_snapshot(state_dir: Path, tmp: Path) -> Path:
    dest = state_dir / RUNNING_CONFIG
    os.replace(tmp, dest)
    ownership.adopt(state_dir, dest)
    return dest


def bills_alike(a: Dimension | None, b: Dimension) -> bool:
    """Same name, collector, aggregate, scale, rounding, decimals and interval (its place in the
    file aside): samples of one can be continued under the other."""
    return a is not None and dataclasses.replace(a, path="") == dataclasses.replace(b, path="")


def changed_dimensions(old: Config, new: Config) -> list[Dimension]:
    """The old config's dimensions that the new one drops or bills differently: their open hour
    cannot be continued."""
    now = {d.name: d for d in new.dimensions}
    return [d for d in old.dimensions if not bills_alike(now.get(d.name), d)]


class ClockTrigger(BaseTrigger):
    """Fires at every multiple of `period` (+ `phase`) on the agent's clock, which may be faster
    than the wall clock APScheduler sleeps on (demo) or equal to it (production)."""

    def __init__(self, clock: Clock, period: float, phase: float = 0.0) -> None:
        self.clock, self.period, self.phase = clock, period, phase

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        base = self.clock.from_wall(now.timestamp())
        if previous_fire_time is not None:
            base = max(base, self.clock.from_wall(previous_fire_time.timestamp()))
        k = math.floor((base - self.phase) / self.period + 1e-9) + 1
        wall = self.clock.to_wall(k * self.period + self.phase)
        return datetime.fromtimestamp(wall, tz=timezone.utc)

    def __str__(self) -> str:
        return f"every {self.period}s (+{self.phase}s) on the agent clock"


def snap(t: float, interval: int) -> float:
    """Put a reading taken a hair before or after its instant on the instant itself, so a round
    fired at 09:59:59.999 for 10:00 lands in the 10:00 hour."""
    grid = round(t / interval) * interval
    return float(grid) if abs(t - grid) <= min(1.0, interval / 4) else t


class StateLock:
    """An exclusive flock on <state_dir>/lock: one `run` per state directory; the file says which
    process holds it and its version ("PID VERSION")."""

    def __init__(self, state_dir: Path, name: str = "lock") -> None:
        self.path = state_dir / name
        self._file: IO[str] | None = None

    def acquire(self, wait: bool = False) -> None:
        """Take the lock for this process's lifetime; `wait` blocks instead of failing."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")  # noqa: SIM115 - held for the process lifetime
        ownership.adopt(self.path.parent, self.path)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self._file.close()
            raise LockHeld(
                f"another metering-agent run holds {self.path}; stop it first "
                "(systemctl stop metering-agent)"
            ) from None
        from agent import __version__  # here: keeps this edit off the module's imports

        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()} {__version__}\n")  # read by `status`
        self._file.flush()


def resolve_identity(ledger: Ledger, imds: Imds, state_dir: Path, now: float) -> Ledger:
    """One instance, one ledger. A ledger that names another instance (baked into an AMI on the
    seller's build instance) is moved aside unsent and a fresh one started (see identity)."""
    return identity.settle(ledger, identity.ask(imds), state_dir, now)


def take_product_lock(config: Config) -> ProductLock | None:
    """One sender per product per machine (see productlock); none for a loopback emulator."""
    if is_loopback(config.metering.endpoint_url):
        return None
    lock = ProductLock(config.product_code, Path(config.source).resolve())
    return lock if lock.acquire() else None


class Daemon:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        sampler: Sampler | None = None,
        imds: Imds | None = None,
        sender_command: Callable[[bool, float | None], list[str]] | None = None,
        log_format: str = "text",
    ) -> None:
        self.config = config
        self.clock = clock
        self.sampler = sampler or Sampler(config)
        self.imds = imds or Imds()
        self.sender_command = sender_command or self._default_sender_command
        self.state_dir = Path(config.state_dir)
        self.log_format = log_format
        self.hooks: Hooks | None = None
        self.notify = Notifier()
        self.stop_event = threading.Event()
        self.ledger: Ledger | None = None
        self.identity: identity.Identity | None = None
        self.offset = 0.0
        self.scheduler: Any = None
        self._child: subprocess.Popen[bytes] | None = None
        self._child_lock = threading.Lock()
        self._child_started = 0.0
        self._last_error: dict[str, str] = {}
        self._round_lock = threading.Lock()
        self.restarting: Callable[[], bool] = stopreason.restarting  # asked at each stop
        self.running_config: Path | None = None  # snapshot_config's copy, once run() made it
        self._reload = threading.Event()
        self._dropped_warned: dict[str, int] = {}  # dimension -> hour whose drops were logged
        self.reads = Reads(clock.monotonic)
        self._stopped = False  # set under _round_lock by the stop seal: no read stores after it
        self._seal_errors: list[tuple[str, int, str]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.lock = StateLock(self.state_dir)  # kept: the flock lives as long as the file
            self.lock.acquire()
            self.product_lock = take_product_lock(self.config)
            self.config, snapshot = snapshot_config(self.config.source, self.state_dir)
            self.running_config = keep_snapshot(self.state_dir, snapshot)
        except OSError as e:
            raise AgentError(
                f"state_dir {self.state_dir}: {e.strerror}; it must be writable by the agent's "
                "user (the unit's StateDirectory= makes /var/lib/metering-agent so)"
            ) from None
        now = self.clock.time()
        self.identity = identity.Identity(self.imds, self.clock, self.state_dir)
        self.ledger = self.identity.start(Ledger(self.state_dir))
        instance_id = self.ledger.get_meta("instance_id")
        self.offset = sealing.send_offset(instance_id, self.config.metering.send_window)
        if self.config.metering.startup_check:
            self.ledger.update_meta(dryrun_due=now)
        self.hooks = Hooks(self.config, self.ledger, self.clock)
        log.info(
            "metering-agent started: product %s, %d dimensions, instance %s, send slot +%.1f s "
            "after each hour",
            self.config.product_code,
            len(self.config.dimensions),
            instance_id,
            self.offset,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        self.seal()
        for interval in sorted({d.interval for d in self.config.dimensions}):
            self.sample_round(interval)
        self._start_scheduler()
        self.identity.keep_asking(self.stop_event, self._swap_ledger, self._imds_wanted)
        self.notify.ready(
            f"metering {len(self.config.dimensions)} dimensions for {self.config.product_code}"
        )
        while not self.stop_event.wait(1.0):
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            self.check_clock()
        self.shutdown()
        return 0

    def _verified(self) -> bool:
        """Whether this run may seal and send from its ledger (see identity)."""
        return self.identity is None or self.identity.verified.is_set()

    def _imds_wanted(self) -> bool:
        """Keep asking IMDS while the ledger is unverified or has only a random id."""
        assert self.ledger is not None
        return not self._verified() or self.ledger.get_meta("instance_id_source") != "imds"

    def _swap_ledger(self, settle: Callable[[Ledger], Ledger]) -> bool:
        """Apply IMDS's late answer between sampling rounds; a moved-aside ledger is replaced.
        Not once the stop has begun (False): the stop keeps what it decided with."""
        with self._round_lock:
            assert self.ledger is not None
            if self.stop_event.is_set():
                return False
            try:
                ledger = settle(self.ledger)
            except Exception as e:  # no usable ledger: stop (exit 1) rather than store into none
                log.error("stopping: the ledger is unusable after a failed identity swap: %s", e)
                identity.stop_now(1)
            if ledger is not self.ledger:
                self.ledger = ledger
                if self.hooks is not None:
                    self.hooks.ledger = ledger
                if self.config.metering.startup_check:
                    ledger.update_meta(dryrun_due=self.clock.time())
            instance_id = ledger.get_meta("instance_id")
            self.offset = sealing.send_offset(instance_id, self.config.metering.send_window)
            health.write(self.state_dir, ledger, self.clock.time())
            return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.notify.stopping("stopping")
        self.stop_event.set()

    def _start_scheduler(self) -> None:
        scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        for interval in sorted({d.interval for d in self.config.dimensions}):
            scheduler.add_job(
                self.sample_round,
                ClockTrigger(self.clock, interval),
                args=[interval],
                id=f"sample-{interval}s",
            )
        scheduler.add_job(self._seal_at_boundary, ClockTrigger(self.clock, HOUR), id="seal")
        if self.notify.watchdog_seconds:
            # Pinged from the scheduler's own thread pool: a wedged scheduler stops the pings
            # and systemd restarts the agent. Real seconds, whatever the agent clock does.
            scheduler.add_job(
                self.notify.watchdog,
                ClockTrigger(Clock(), max(1.0, self.notify.watchdog_seconds / 2)),
                id="watchdog",
            )
        scheduler.add_job(
            self.send_tick,
            ClockTrigger(self.clock, SEND_TICK),
            id="send",
            next_run_time=datetime.now(timezone.utc),  # at once: start-up DryRun, leftovers
        )
        scheduler.start()
        self.scheduler = scheduler

    def reload(self) -> None:
        """SIGHUP (`systemctl reload`): re-read the config file without stopping; the hour and
        its samples go on. A config that does not load is logged and the running one kept.

        What only a restart may change (state_dir, product code, endpoint: the locks and the
        ledger depend on them) is refused. A dimension that the new config drops or bills
        differently has its open hour sealed first, under the config it was sampled with:
        its samples could not be aggregated under the new one."""
        snapshot: Path | None = None
        try:
            new, snapshot = snapshot_config(self.config.source, self.state_dir)
            for key, old_value, new_value in (
                ("state_dir", self.state_dir, Path(new.state_dir)),
                ("product_code", self.config.product_code, new.product_code),
                ("metering.endpoint_url", self.config.metering.endpoint_url,
                 new.metering.endpoint_url),
            ):  # fmt: skip
                if old_value != new_value:
                    raise AgentError(f"{key}: changed to {new_value}; that needs a restart")
            sampler = Sampler(new)
        except AgentError as e:
            log.error("reload of %s failed, keeping the running config: %s", self.config.source, e)
            self._drop_snapshot(snapshot)
            return
        except Exception:  # a reload must never take the running agent down
            log.exception("reload of %s failed, keeping the running config", self.config.source)
            self._drop_snapshot(snapshot)
            return
        assert self.ledger is not None
        self.running_config = keep_snapshot(self.state_dir, snapshot)
        with self._round_lock:
            changed = changed_dimensions(self.config, new)
            if changed and self._verified():
                for dim in changed:
                    log.info(
                        "reload: dimension %s is dropped or billed differently; sealing its "
                        "hour %s as it was sampled",
                        dim.name,
                        iso_hour(self.clock.time()),
                    )
                old = dataclasses.replace(self.config, dimensions=tuple(changed))
                sealing.seal_hours(
                    self.ledger, old, self.clock.time(), self.offset, include_current=True
                )
            old_intervals = {d.interval for d in self.config.dimensions}
            if new.metering.send_window != self.config.metering.send_window:
                self.offset = sealing.send_offset(
                    self.ledger.get_meta("instance_id"), new.metering.send_window
                )
            self.config, self.sampler = new, sampler
            if self.hooks is not None:
                self.hooks.config = new
            if self.scheduler is not None:
                for interval in old_intervals:
                    self.scheduler.remove_job(f"sample-{interval}s")
                for interval in sorted({d.interval for d in new.dimensions}):
                    self.scheduler.add_job(
                        self.sample_round,
                        ClockTrigger(self.clock, interval),
                        args=[interval],
                        id=f"sample-{interval}s",
                    )
        log.info(
            "reloaded %s: product %s, %d dimensions",
            new.source,
            new.product_code,
            len(new.dimensions),
        )
        self.notify.status(f"metering {len(new.dimensions)} dimensions for {new.product_code}")

    @staticmethod
    def _drop_snapshot(snapshot: Path | None) -> None:
        if snapshot is not None:
            snapshot.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Stop sampling; seal the partial hour and send what is pending for at most 30 s.

        A restart (stopreason: systemd's own job for the unit) leaves the current hour open and
        sends nothing: the restarted agent continues the hour, seals it at the boundary and
        sends at once what is pending."""
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        self._stop_child(grace=5.0)
        restart = self.restarting()
        changed: list[Dimension] = []
        if restart:
            # The restarted agent continues the hour with the config on disk: if that does not
            # load (it would not start), stop as for a shutdown; a dimension it drops or bills
            # differently is sealed now, as it was sampled.
            try:
                changed = changed_dimensions(self.config, load(self.config.source))
            except Exception as e:
                log.warning(
                    "restart, but the config on disk does not load (%s): sealing and sending now",
                    e,
                )
                restart = False
        assert self.ledger is not None
        with self._round_lock:  # a read storing its sample finishes its write first
            self._stopped = True  # reads still running (hung sources) are abandoned
            stop = self.clock.time()
            for dim in self.config.dimensions:
                self.ledger.clip_last_span(dim.name, stop)
            if self._verified():
                sealing.seal_hours(
                    self.ledger, self.config, stop, self.offset, include_current=not restart
                )
                if restart and changed:
                    old = dataclasses.replace(self.config, dimensions=tuple(changed))
                    sealing.seal_hours(self.ledger, old, stop, self.offset, include_current=True)
        health.write(self.state_dir, self.ledger, self.clock.time())
        if not self._verified():
            log.warning("stopping with the ledger's instance unverified: nothing sealed or sent")
        elif restart:
            log.info(
                "restart: hour %s stays open; the restarted agent continues it", iso_hour(stop)
            )
        elif self.ledger.pending():
            self._run_sender(flush=True, deadline=stop + STOP_FLUSH * self.clock.rate)
        if self.hooks is not None:
            self.hooks.wait(timeout=5)
        left = self.ledger.pending_hour_count()
        log.info("stopped; %d hour(s) still pending will be sent after the next start", left)
        self.ledger.close()

    # -- jobs --------------------------------------------------------------------------------

    def check_clock(self) -> None:
        """Reschedule every job after a wall-clock step (see the module docstring)."""
        step = self.clock.stepped()
        if not step or self.scheduler is None:
            return
        log.warning(
            "the wall clock stepped %+.0f s (now %s): rescheduling sampling, sealing and sends",
            step,
            iso(self.clock.time()),
        )
        now = datetime.now(timezone.utc)
        for job in self.scheduler.get_jobs():
            if isinstance(job.trigger, ClockTrigger):
                job.modify(next_run_time=job.trigger.get_next_fire_time(None, now))
        self.scheduler.wakeup()

    def sample_round(self, interval: int) -> None:
        """Start a read of every dimension on this interval, each on its own (see reads.py)."""
        if self.stop_event.is_set():
            return
        assert self.ledger is not None
        t = snap(self.clock.time(), interval)
        for dim in self.config.dimensions:
            if dim.interval == interval:
                budget = min(
                    float(dim.collector.options.get("timeout", 10)), interval / self.clock.rate
                )
                read = functools.partial(self._read, dim, t, self.sampler)
                busy = self.reads.start(dim.name, t, budget, read)
                if busy is not None:
                    self._collector_error(dim, t, busy)
        with self._round_lock:
            if not self._stopped:
                self.seal()

    def _read(
        self, dim: Dimension, t: float, sampler: Sampler, in_time: Callable[[], bool]
    ) -> None:
        """One dimension's read at instant `t` (on its worker thread), stored with its position.

        A read that ends after its deadline has already cost its dimension the instants it
        overran (and no longer held sealing); its answer is still stored, with the position it
        advanced to, so a slow log backlog is never read again from the same place forever; the
        lateness is a collector error in `status`. After the stop seal nothing is stored.
        """
        assert self.ledger is not None
        try:
            if self._stopped:
                return
            sample = sampler.take(dim, t, self.ledger.position(dim.name))
            with self._round_lock:
                current = next((d for d in self.config.dimensions if d.name == dim.name), None)
                if self._stopped or not bills_alike(current, dim):
                    return  # read under a config that a reload replaced: its position not kept
                late = not in_time()
                self._sample(dim, t, sample)
                if late and sample.error is None:  # a late error already says why
                    timeout = dim.collector.options.get("timeout", 10)
                    self._collector_error(
                        dim, t, f"read took longer than its {timeout} s timeout (stored late)"
                    )
                if hour_start(t) < hour_start(self.clock.time()):
                    self.seal()  # a read that ended after its hour did (the round's seal held it)
        except Exception:  # a ledger failure: logged, the next round tries again
            log.exception("dimension %s: storing the sample at %s failed", dim.name, iso(t))

    def _collector_error(self, dim: Dimension, t: float, error: str) -> None:
        """Every failure is counted for `status`; the journal hears of each new error once."""
        assert self.ledger is not None
        if self._last_error.get(dim.name) != error:
            log.warning("dimension %s: collector failed: %s", dim.name, error)
            self._last_error[dim.name] = error
        self.ledger.record_collector_error(dim.name, t, error)

    def _sample(self, dim: Dimension, t: float, sample: Sample) -> None:
        assert self.ledger is not None
        if sample.error or sample.value is None:
            self._collector_error(dim, t, sample.error or "no value")
            return
        if sample.warning:
            self._collector_error(dim, t, sample.warning)
        elif self._last_error.pop(dim.name, None) is not None:
            log.info("dimension %s: collector works again", dim.name)
        hour = self.ledger.record_sample(
            dim.name,
            t,
            sample.value,
            sealing.span_for(t, dim.interval),
            sample.state,
            carry=sealing.carries(dim),
            increment=dim.collector.kind == "increment",
        )
        if hour == INSTANT_TAKEN:
            log.debug(
                "dimension %s: instant %s is already stored (restart or clock step); skipped",
                dim.name,
                iso(t),
            )
        elif hour is None:
            if self._dropped_warned.get(dim.name) != hour_start(t):  # once per hour, not per round
                self._dropped_warned[dim.name] = hour_start(t)
                log.warning(
                    "dimension %s: samples from %s on are for hour %s, already sealed; dropped "
                    "until the hour ends (%s cannot carry into the next hour)",
                    dim.name,
                    iso(t),
                    iso_hour(t),
                    dim.aggregate,
                )
        elif hour != hour_start(t):
            log.info(
                "dimension %s: sample at %s carried into hour %s (its own hour is sealed)",
                dim.name,
                iso(t),
                iso(hour),
            )

    def _seal_at_boundary(self) -> None:
        """The hourly job: seal like a read does, under the same lock, never after the stop."""
        with self._round_lock:
            if not self._stopped:
                self.seal()

    def seal(self) -> None:
        assert self.ledger is not None
        if not self._verified():
            return
        now = self.clock.time()
        sealed = sealing.seal_hours(
            self.ledger, self.config, now, self.offset, hold=self.reads.holds
        )
        errors = self.ledger.seal_errors()
        if sealed:
            self.ledger.prune(now)  # once an hour: sealed hours are kept 90 days
        if sealed or errors != self._seal_errors:
            self._seal_errors = errors
            health.write(self.state_dir, self.ledger, self.clock.time())
        if sealed:
            self._schedule_send()

    def _schedule_send(self) -> None:
        """Start the sender at the exact send slot, not at the next tick: on a 15 s grid, a
        fleet's slots would bunch into bursts that the service throttles (benchmarks/fleet.py)."""
        assert self.ledger is not None
        due = next_due(self.ledger)
        if due is None or self.scheduler is None:
            return
        wall = self.clock.to_wall(max(due, self.clock.time()))
        self.scheduler.add_job(
            self.send_tick,
            DateTrigger(datetime.fromtimestamp(wall, tz=timezone.utc)),
            id="send-at",
            replace_existing=True,
        )

    def send_tick(self) -> None:
        """Start a sender child when work is due; never waits for it (the next tick reaps it)."""
        assert self.ledger is not None
        if self.hooks is not None:
            self.hooks.check()
        if self.stop_event.is_set() or self._sender_running() or not self._verified():
            return
        if work_due(self.ledger, self.clock.time()):
            cmd = self.sender_command(False, None)
            with self._child_lock:
                self._child = subprocess.Popen(cmd)
                self._child_started = self.clock.monotonic()

    # -- the sender child --------------------------------------------------------------------

    def _default_sender_command(self, flush: bool, deadline: float | None) -> list[str]:
        config = self.running_config or self.config.source
        cmd = [sys.executable, "-m", "agent", "send", "-c", str(Path(config).resolve())]
        cmd += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
        cmd += ["--log-format", self.log_format]
        if flush:
            cmd.append("--flush")
        if deadline is not None:
            cmd += ["--deadline", repr(deadline)]
        if self.clock.spec:
            cmd += ["--clock", self.clock.spec]
        return cmd

    def _sender_running(self) -> bool:
        """Reap a finished sender; kill one that hangs (safe: the next resends identically)."""
        with self._child_lock:
            child = self._child
            if child is None:
                return False
            code = child.poll()
            if code is not None:
                self._child = None
                if code not in (0, 69, 77):  # 69/77: retry later / paused, already in health
                    log.error(
                        "send process %d exited %d; pending hours stay pending", child.pid, code
                    )
                return False
            if self.clock.monotonic() - self._child_started > SENDER_TIMEOUT:
                log.error("send process %d ran over %d s; killing it", child.pid, SENDER_TIMEOUT)
                child.kill()
                child.wait()
                self._child = None
                return False
            return True

    def _run_sender(self, flush: bool, deadline: float | None) -> int:
        """Run a sender child to completion (the stop flush)."""
        child = subprocess.Popen(self.sender_command(flush, deadline))
        try:
            return child.wait(timeout=STOP_FLUSH + 10)
        except subprocess.TimeoutExpired:
            log.error("the stop flush ran over %d s; killed it", STOP_FLUSH + 10)
            child.kill()
            return child.wait()

    def _stop_child(self, grace: float) -> None:
        with self._child_lock:
            child = self._child
        if child is None:
            return
        try:
            child.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            child.terminate()
            child.wait()
