"""`run`: wires clock, collectors, ledger and sender into APScheduler jobs; signals; the stop flush.

Jobs (all on the injected clock, through ClockTrigger):
- one sampling job per distinct interval: hand each dimension's read to its own worker thread
  (a daemon), with a total deadline (`collecting/reads.py`); each read stores its sample with its
  position;
- a boundary job at every hour: seal (sealing also runs after each round and at start-up, and looks
  at the ledger, not at which trigger fired, so a suspend never skips or repeats an hour), as the
  billing mode seals (`self.mode`, chosen by `start` in commands/run.py: agent/modes/);
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

Every stop first takes one last reading of every dimension (`begin_last_reading`): SIGTERM/SIGINT,
a container's stop, a restart (the hour stays open; the reading is stored for the restarted agent
to bill), and a reload that seals a changed dimension (the old collector reads
before its hour is sealed). All dimensions at once, each within its timeout, all within
STOP_READING seconds; a hung source is left behind and the stop goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from agent.billing.hour import Sealed, carries
from agent.clock import HOUR, Clock, hour_start, iso, iso_hour
from agent.collecting.reads import Reads
from agent.collecting.sampling import Sample, Sampler
from agent.collecting.unstored import Kept
from agent.config.loader import keep_snapshot, load, snapshot_config
from agent.config.model import Config, Dimension, bills_alike, changed_dimensions
from agent.config.watch import FileWatch
from agent.daemon.hooks import Hooks
from agent.daemon.metrics import Metrics, metrics_for
from agent.daemon.metrics import check as check_metrics
from agent.daemon.sender import STOP_FLUSH, SenderProcess
from agent.daemon.storage import StateDirGone, Storage
from agent.daemon.triggers import ClockTrigger, snap
from agent.daemon.turns import Turns
from agent.daemon.wake import SLEEP_FLUSH, Wake
from agent.errors import EX_NOPERM, AgentError
from agent.host import identity, stopreason
from agent.host import platform as platforms
from agent.host.locks import StateLock
from agent.host.sdnotify import Notifier
from agent.ledger import Ledger
from agent.ledger.faults import DAMAGED
from agent.ledger.samples import INSTANT_TAKEN
from agent.modes.instance import InstanceMode
from agent.modes.mode import Mode
from agent.sending import health
from agent.sending.policy import due
from agent.windows import send_offset, span_for

log = logging.getLogger(__name__)

SEND_TICK = 15  # seconds of clock time between checks for due work
# In a task or pod the whole stop must fit the platform's grace (ECS stopTimeout and Kubernetes'
# terminationGracePeriodSeconds default to 30 s, then SIGKILL): the flush gets 20 s, its child is
# ended 2 s after, so seal + flush + exit stay well inside it.
CONTAINER_STOP_FLUSH = 20
# A stop's last reading takes at most this long (every dimension at once, each within its own
# timeout, default 10 s): in a task or pod it comes out of the flush's 20 s and leaves it 10 s.
STOP_READING = 10
STORE_GRACE = 0.5  # seconds after a read's deadline for it to store what it read by then


@dataclasses.dataclass(frozen=True)
class LastReading:
    """A stop's last reading under way: its instant, and each dimension's read with the time
    (monotonic) it has until."""

    t: float
    until: dict[str, float]
    dims: tuple[Dimension, ...]


class Daemon:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        ledger: Ledger,
        ident: identity.Identity,
        sampler: Sampler,
        sender: SenderProcess,
        held: tuple[object, ...] = (),
        platform: platforms.Platform | None = None,
        where: str = "",
        registration: Any = None,
        modes: Callable[[Config], Mode] | None = None,
        notifications: Any = None,
        config_watch: FileWatch | None = None,
    ) -> None:
        """`modes` chooses the billing mode of a config (start passes modes.choose.mode_for;
        without it, instance mode, the config's default); `registration` is the mode's
        fulfillment handler child, if it serves one; `notifications` its subscription queue
        child, if it applies Marketplace's notifications. Both are kept alike. `config_watch`: the
        config file as it was when `config` was read from it (default: as it is now)."""
        self.config = config
        self.choose_mode = modes or (lambda _config: InstanceMode())
        self.mode = self.choose_mode(config)  # how hours are keyed, sealed and sent
        self.platform = platform or platforms.Platform("ec2", "default")
        self.where = where  # the start-up line's platform, identity, region, credentials
        # metering.on_check_failure: exit: a refused start-up DryRun ends `run` with 77
        self._startup_pending = config.metering.startup_check and (
            platforms.check_failure_policy(config.metering.on_check_failure, self.platform.name)
            == "exit"
        )
        self.exit_code = 0
        self.registration = registration  # fulfillment.HandlerProcess (saas.registration)
        # the children kept beside the daemon (started again if they exit), ended at its stop
        self.kept = [c for c in (registration, notifications) if c is not None]
        self.clock = clock
        self.ledger = ledger
        self.identity = ident
        self.sampler = sampler
        self.sender = sender
        self.held = held  # the locks this run holds, for as long as it runs
        self.state_dir = Path(config.state_dir)
        self.offset = send_offset(ledger.get_meta("instance_id"), config.metering.send_window)
        self.hooks = Hooks(config, ledger, clock)
        self.notify = Notifier()
        self.stop_event = threading.Event()
        self._last_error: dict[str, str] = {}
        self._round_lock = Turns()  # sealing gives way between its steps (turns.py)
        self.restarting: Callable[[], bool] = stopreason.restarting  # asked at each stop
        self._reload = threading.Event()
        # SIGHUP sets _reload; so does the config file changing on disk (a ConfigMap update)
        self.config_watch = config_watch or FileWatch(config.source)
        self._dropped_warned: dict[str, int] = {}  # dimension -> hour whose drops were logged
        self.reads = Reads(clock.monotonic)
        self._stopped = False  # set under _round_lock by the stop seal: no read stores after it
        self._signalled: float | None = None  # clock.time() of the first SIGTERM/SIGINT
        self._seal_errors: list[tuple[str, int, str]] = []
        self.wake = Wake(clock)  # SIGUSR1 (the sleep hook) or a resume: send now (wake.py)
        self.storage = Storage(self.state_dir)  # disk full, ledger damaged, state dir gone
        # metrics: {textfile: PATH}, or nothing (daemon/metrics.py), chosen once
        self.metrics: Metrics = metrics_for(config, ledger, clock.time())
        self.scheduler = self._scheduler()

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> int:
        log.info(
            "metering-agent started: product %s, %d dimensions, instance %s, send slot +%.1f s "
            "after each hour; %s",
            self.config.product_code,
            len(self.config.dimensions),
            self.ledger.get_meta("instance_id"),
            self.offset,
            self.where or f"platform {self.platform.name}",
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        signal.signal(signal.SIGUSR1, self.wake.ask)
        self.close_hours()
        for interval in sorted({d.interval for d in self.config.dimensions}):
            self.sample_round(interval)
        self.publish_health()  # this run's own storage state, not a previous run's
        self.scheduler.start()
        for child in self.kept:
            child.ensure()
        self.identity.keep_asking(self.stop_event, self._swap_ledger, self._imds_wanted)
        self.notify.ready(
            f"metering {len(self.config.dimensions)} dimensions for {self.config.product_code}"
        )
        while not self.stop_event.wait(1.0):
            try:
                if self.config_watch.changed():
                    log.info("config %s changed on disk (now %s): reloading", self.config.source,
                             self.config_watch.target())  # fmt: skip
                    self._reload.set()
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
                self.check_clock()
                self.send_if_woken()
                self.check_startup()
            except Exception as e:  # the ledger's storage failing is a state, not the end of run
                if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                    raise
                self.publish_health()
        self.shutdown()
        return self.exit_code

    def check_startup(self) -> None:
        """metering.on_check_failure: exit. Until the start-up DryRun has passed, a sender that
        ended paused (77: the DryRun, or the credentials, refused; throttling and 5xx back off
        and exit 69) stops `run` as SIGTERM would, and `run` exits 77 (AWS asks container
        products to stop when the check fails)."""
        if not self._startup_pending:
            return
        self.sender.running()  # reaps a finished child
        code = self.sender.take_exit()
        state = self.ledger.send_state()
        if state.authorized and state.dryrun_due is None:
            self._startup_pending = False  # passed: later refusals pause sending, as on EC2
            return
        if code != EX_NOPERM:
            return
        log.error(
            "stopping with exit 77: the start-up check failed (%s); metering.on_check_failure "
            "is exit on %s",
            state.reason or "not authorized",
            self.platform.name,
        )
        self.exit_code = EX_NOPERM
        self.notify.stopping("start-up check failed")
        self.stop_event.set()

    def _verified(self) -> bool:
        """Whether this run may seal and send from its ledger (see identity)."""
        return self.identity.verified.is_set()

    def _imds_wanted(self) -> bool:
        """Keep asking IMDS while the ledger is unverified or has only a random id."""
        return not self._verified() or self.ledger.get_meta("instance_id_source") != "imds"

    def _swap_ledger(self, settle: Callable[[Ledger], Ledger]) -> bool:
        """Apply IMDS's late answer between sampling rounds; a moved-aside ledger is replaced.
        Not once the stop has begun (False): the stop keeps what it decided with."""
        with self._round_lock:
            if self.stop_event.is_set():
                return False
            try:
                ledger = settle(self.ledger)
            except Exception as e:  # no usable ledger: stop (exit 1) rather than store into none
                log.error("stopping: the ledger is unusable after a failed identity swap: %s", e)
                identity.stop_now(1)
            if ledger is not self.ledger:
                self.ledger = self.hooks.ledger = ledger
                if self.config.metering.startup_check:
                    ledger.schedule_dryrun(self.clock.time())
            instance_id = ledger.get_meta("instance_id")
            self.offset = send_offset(instance_id, self.config.metering.send_window)
            health.write(self.state_dir, ledger, self.clock.time())
            return True

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signalled is None:
            self._signalled = self.clock.time()  # the container's grace counts from here
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.notify.stopping("stopping")
        self.stop_event.set()

    def _scheduler(self) -> BackgroundScheduler:
        """The jobs, not yet started (`run` starts them)."""
        scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
        )
        self._add_sampling_jobs(scheduler, self.config)
        scheduler.add_job(self._close_hours_locked, ClockTrigger(self.clock, HOUR), id="seal")
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
        return scheduler

    def _add_sampling_jobs(self, scheduler: BackgroundScheduler, config: Config) -> None:
        for interval in sorted({d.interval for d in config.dimensions}):
            scheduler.add_job(
                self.sample_round,
                ClockTrigger(self.clock, interval),
                args=[interval],
                id=f"sample-{interval}s",
            )

    def reload(self) -> None:
        """SIGHUP (`systemctl reload`), or the config file changed on disk (config/watch.py: a
        ConfigMap update): re-read the config file without stopping; the hour and its samples
        go on. A config that does not load is logged and the running one kept.

        What only a restart may change (state_dir, product code, endpoint: the locks and the
        ledger depend on them) is refused. A dimension that the new config drops or bills
        differently has its open hour sealed first, under the config it was sampled with:
        its samples could not be aggregated under the new one."""
        snapshot: Path | None = None
        try:
            new, snapshot = snapshot_config(self.config.source, self.state_dir)
            mode = self.choose_mode(new)
            for key, old_value, new_value in (
                ("state_dir", self.state_dir, Path(new.state_dir)),
                ("product_code", self.config.product_code, new.product_code),
                ("metering.endpoint_url", self.config.metering.endpoint_url,
                 new.metering.endpoint_url),
                ("platform", self.config.platform, new.platform),
                # the kept children are chosen at start; a reload restarts them, with the new
                # queue_url, but cannot add or end the subscription queue child
                ("saas.notifications", self._notices(self.mode, self.config),
                 self._notices(mode, new)),
            ):  # fmt: skip
                if old_value != new_value:
                    raise AgentError(f"{key}: changed to {new_value}; that needs a restart")
            check_metrics(new)  # its directory writable, as `check --offline` says (78)
            sampler = Sampler(new)
        except Exception as e:  # a reload must never take the running agent down
            log.error("reload of %s failed, keeping the running config: %s", self.config.source, e,
                      exc_info=not isinstance(e, AgentError))  # fmt: skip
            if snapshot is not None:
                snapshot.unlink(missing_ok=True)
            return
        changed = changed_dimensions(self.config, new)
        if changed and self.storage.failing:  # their hour cannot be sealed without what is kept
            log.error("reload of %s refused, keeping the running config: the agent cannot store "
                      "(%s), and %s must be sealed as sampled first; reload again once health "
                      "is ok", self.config.source, self.storage.kind,
                      ", ".join(d.name for d in changed))  # fmt: skip
            snapshot.unlink(missing_ok=True)
            return
        keep_snapshot(self.state_dir, snapshot)
        last_t = None
        if changed:  # their hour is sealed now: first the old collectors' last reading goes in
            last = self.begin_last_reading(changed, self.sampler)
            self.finish_last_reading(last)
            last_t = last.t
        with self._round_lock:
            if self._verified():
                now = self.clock.time()
                # the last reading may stand at a round's instant snapped just past the boundary
                now = now if last_t is None else max(now, last_t)
                try:
                    if self.storage_works():  # what the last reading could not store goes first
                        self._seal_as_sampled(changed, now)
                except Exception as e:
                    if not self.storage.failed(e, now, self.ledger.path):
                        raise
            old_intervals = {d.interval for d in self.config.dimensions}
            if new.metering.send_window != self.config.metering.send_window:
                self.offset = send_offset(
                    self.ledger.get_meta("instance_id"), new.metering.send_window
                )
            sampler.carry_over(self.sampler)
            self.config, self.sampler, self.hooks.config = new, sampler, new
            self.mode = mode
            self.metrics = self.metrics.reconfigured(new, self.ledger, self.clock.time())
            for interval in old_intervals:
                self.scheduler.remove_job(f"sample-{interval}s")
            self._add_sampling_jobs(self.scheduler, new)
        for child in self.kept:
            child.restart()  # it reads the running config only when it starts
        log.info(
            "reloaded %s: product %s, %d dimensions",
            new.source,
            new.product_code,
            len(new.dimensions),
        )
        self.notify.status(f"metering {len(new.dimensions)} dimensions for {new.product_code}")

    def _notices(self, mode: Mode, config: Config) -> str:
        """Whether `mode` keeps a subscription queue child for `config` (none is started)."""
        child = mode.notifications(config, self.state_dir, self.clock, "text")
        return "not set" if child is None else "set"

    def _seal_as_sampled(self, changed: list[Dimension], now: float) -> None:
        """Seal now the open hour of the dimensions a new config drops or bills differently,
        under the config they were sampled with: the new one cannot continue their samples."""
        if not changed:
            return
        for dim in changed:
            log.info("dimension %s: dropped or billed differently by the new config; sealing "
                     "its hour %s as it was sampled", dim.name, iso_hour(now))  # fmt: skip
        old = dataclasses.replace(self.config, dimensions=tuple(changed))
        self.mode.seal_hours(self.ledger, old, now, self.offset, include_current=True)

    def shutdown(self) -> None:
        """Stop sampling; take the last reading; seal the partial hour and send what is pending
        for at most 30 s.

        The last reading runs while the sender and the registration child are stopped, and
        is stored (or abandoned, see finish_last_reading) before anything is sealed. A restart
        (stopreason: systemd's own job for the unit) leaves the current hour open and sends
        nothing: the restarted agent continues the hour, seals it at the boundary and
        sends at once what is pending."""
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        last = self.begin_last_reading(self.config.dimensions, self.sampler)
        # In a container the grace is short: a running sender is ended at once (its requests
        # are resent identically), and the flush budget counts from the signal.
        self.sender.stop(at_once=self.platform.container)
        for child in self.kept:
            child.stop()
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
        self.finish_last_reading(last)
        with self._round_lock:  # a read storing its sample finishes its write first
            self._stopped = True  # reads still running (hung sources) are abandoned
            stop = self.clock.time()
            try:
                stored = self.storage_works()  # readings kept in memory are stored first
                if stored:  # an integral's time ends at the last reading
                    for dim in self.config.dimensions:
                        self.ledger.clip_last_span(dim.name, min(last.t, stop))
                if stored and self._verified():
                    # a shutdown seals the hour of the last reading too: its instant may be a
                    # round's, snapped just past the boundary the wall clock has not reached
                    upto = stop if restart else max(stop, last.t)
                    self.mode.seal_hours(
                        self.ledger, self.config, upto, self.offset, include_current=not restart
                    )
                    if restart:
                        self._seal_as_sampled(changed, stop)
            except Exception as e:
                if not self.storage.failed(e, stop, self.ledger.path):
                    raise
            if self.storage.failing:
                log.error("stopping while the agent cannot store (%s): %d reading(s) kept in "
                          "memory are lost; the samples in the ledger are sealed at the next start",
                          self.storage.kind, len(self.storage.unstored))  # fmt: skip
        self.publish_health()
        if not self._verified():
            log.warning("stopping with the ledger's instance unverified: nothing sealed or sent")
        elif restart:
            log.info(
                "restart: hour %s stays open; the restarted agent continues it", iso_hour(stop)
            )
        elif self.mode.pending_bounds(self.ledger):
            if self.platform.container:
                begun = self._signalled if self._signalled is not None else stop
                deadline = begun + CONTAINER_STOP_FLUSH * self.clock.rate
                left = max(1.0, (deadline - self.clock.time()) / self.clock.rate)
                self.sender.flush(deadline, wait=left + 2, grace=2.0)
            else:
                self.sender.flush(deadline=stop + STOP_FLUSH * self.clock.rate)
        self.hooks.wait(timeout=5)
        self.refresh_metrics()  # what the stop flush sent, and what it left pending
        left = self.ledger.pending_hour_count()
        log.info("stopped; %d hour(s) still pending will be sent after the next start", left)
        self.ledger.close()

    def begin_last_reading(self, dims: Sequence[Dimension], sampler: Sampler) -> LastReading:
        """Start a stop's last reading of `dims` with `sampler`'s collectors: each on its own
        worker, right after the read in flight there (a collector is never used by two threads),
        within its timeout after that one's deadline, and all by STOP_READING s from now. Its
        instant is now, or just after the newest round's instant when a round snapped ahead of
        it: a level or counter is never refused as an instant already lived."""
        now = self.clock.time()
        newest = self.reads.newest()
        t = now if newest is None or newest < now else newest + 0.001
        end = self.clock.monotonic() + STOP_READING
        until = {}
        for dim in dims:
            timeout = min(
                float(dim.collector.options.get("timeout", 10)), dim.interval / self.clock.rate
            )
            read = functools.partial(self._read, dim, t, sampler)
            until[dim.name] = self.reads.last(dim.name, t, timeout, end, read)
        return LastReading(t, until, tuple(dims))

    def finish_last_reading(self, last: LastReading) -> None:
        """Wait for the last reading, each read until its time (and STORE_GRACE to store what it
        had by then). A dimension still reading then is left behind, counted as its collector's
        error: nothing of that read is stored, so its position stays and the next start reads
        what it had not."""
        late = self.reads.idle({n: end + STORE_GRACE for n, end in last.until.items()})
        for dim in last.dims:
            if dim.name in late:
                self._collector_error(
                    dim, last.t, "no last reading at the stop: a read still ran past its timeout"
                )

    # -- jobs --------------------------------------------------------------------------------

    def check_clock(self) -> None:
        """Reschedule every job after a wall-clock step (see the module docstring)."""
        step = self.clock.stepped()
        if not step:
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

    def send_if_woken(self) -> None:
        """Before a sleep and after a resume (daemon/wake.py): seal the hours that ended, then
        send every pending record now, whatever its send slot; asked again each second while
        an earlier flush still runs."""
        why = self.wake.due()
        if why is None or self.stop_event.is_set():
            return  # a stop sends by itself
        self._close_hours_locked()
        if not self._verified() or not self.mode.pending_bounds(self.ledger):
            self.wake.done()  # nothing may leave, or nothing is pending
            return
        if self.sender.start_flush(self.clock.time() + SLEEP_FLUSH * self.clock.rate):
            log.info("%s: sending the %d pending hour(s) now, whatever their send slot", why,
                     self.ledger.pending_hour_count())  # fmt: skip
            self.wake.done()

    def sample_round(self, interval: int) -> None:
        """Start a read of every dimension on this interval, each on its own (see reads.py)."""
        if self.stop_event.is_set():
            return
        t = snap(self.clock.time(), interval, self.clock.rate)
        for dim in self.config.dimensions:
            if dim.interval == interval:
                budget = min(
                    float(dim.collector.options.get("timeout", 10)), interval / self.clock.rate
                )
                read = functools.partial(self._read, dim, t, self.sampler)
                busy = self.reads.start(dim.name, t, budget, read)
                if busy is not None:
                    self._collector_error(dim, t, busy)
        self._close_hours_locked()

    def _read(
        self, dim: Dimension, t: float, sampler: Sampler, in_time: Callable[[], bool]
    ) -> None:
        """One dimension's read at instant `t` (on its worker thread), stored with its position.

        A read that ends after its deadline has already cost its dimension the instants it
        overran (and no longer held sealing); its answer is still stored, with the position it
        advanced to, so a slow log backlog is never read again from the same place forever; the
        lateness is a collector error in `status`. After the stop seal nothing is stored.
        """
        try:
            if self._stopped:
                return
            position = self._position(dim.name)
            if isinstance(position, bool):
                return  # the ledger cannot say where the last reading ended: read next round
            sample = sampler.take(dim, t, position, in_time)
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
                    self.close_hours()  # a read that outlived its hour (the round's seal held it)
        except Exception:  # a ledger failure: logged, the next round tries again
            log.exception("dimension %s: storing the sample at %s failed", dim.name, iso(t))

    def _position(self, name: str) -> dict[str, Any] | bool | None:
        """Where the dimension's last reading ended: the newest reading kept in memory, else the
        ledger's; False when the ledger cannot be read (a storage state, noted)."""
        if self.storage.unstored.held(name):
            return self.storage.unstored.position(name)
        try:
            return self.ledger.position(name)
        except Exception as e:
            if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                raise
            return False

    def _collector_error(self, dim: Dimension, t: float, error: str) -> None:
        """Every failure is counted for `status`; the journal hears of each new error once."""
        self.metrics.collector_error(dim.name)
        if self._last_error.get(dim.name) != error:
            log.warning("dimension %s: collector failed: %s", dim.name, error)
            self._last_error[dim.name] = error
        try:
            self.ledger.record_collector_error(dim.name, t, error)
        except Exception as e:  # not stored: the journal has it; the storage state is named
            if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                raise

    def _sample(self, dim: Dimension, t: float, sample: Sample) -> None:
        self.metrics.lines_read(dim.name, sample.lines)
        if sample.error or sample.value is None:
            self._collector_error(dim, t, sample.error or "no value")
            return
        if sample.warning:
            self._collector_error(dim, t, sample.warning)
        elif self._last_error.pop(dim.name, None) is not None:
            log.info("dimension %s: collector works again", dim.name)
        self._store(dim, t, sample)

    def _store(self, dim: Dimension, t: float, sample: Sample) -> None:
        """Store the readings kept in memory first, then this one; where the ledger cannot store
        (see storage.py), keep it in memory and publish health at once."""
        try:
            self._store_kept(dim.name)
            if not self.storage.unstored.held(dim.name):
                self._record(dim, t, sample)
                return
        except Exception as e:
            if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                raise
        self.storage.keep(Kept(dim, t, sample))
        self.publish_health()

    def _store_kept(self, name: str) -> None:
        """Store the dimension's kept readings, oldest first, each with its own instant."""
        while (kept := self.storage.unstored.oldest(name)) is not None:
            if self.ledger.gone():
                raise StateDirGone(f"{self.ledger.path}: no longer there")
            self._record(kept.dimension, kept.t, kept.sample)
            self.storage.unstored.stored(name)

    def _record(self, dim: Dimension, t: float, sample: Sample) -> None:
        assert sample.value is not None
        hour = self.ledger.record_sample(
            dim.name,
            t,
            sample.value,
            span_for(t, dim.interval),
            sample.state,
            carry=carries(dim),
            increment=dim.collector.kind == "increment",
            breakdown=sample.breakdown,
            unread=sample.unread,
        )
        if sample.unread:  # stored with the position past it: logged once, health says so now
            for lost in sample.unread:
                log.warning(
                    "dimension %s: usage went unread: %s; fix: %s", dim.name, lost.what, lost.fix
                )
            self.publish_health()
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

    def _close_hours_locked(self) -> None:
        """Each round's end and the hourly job: under the lock a read stores with, not after
        the stop seal."""
        with self._round_lock:
            if not self._stopped:
                self.close_hours()

    def close_hours(self) -> None:
        """After each round, at each boundary and at start-up: seal the hours that ended; if any
        did, prune, publish health and schedule their send; else publish a changed seal error.

        Not while readings wait in memory to be stored (an hour is sealed only once all of its
        readings are in the ledger) or the ledger cannot store: a seal that failed is retried
        here once it can, so the hour is billed as its own."""
        if not self._verified():
            return
        if not self.storage_works():
            return
        try:
            self._seal_and_publish()
        except Exception as e:
            if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                raise
            self.publish_health()

    def storage_works(self) -> bool:
        """Each round: notice the state dir gone; while a storage state lasts, try to end it
        (repair, restore, store what was kept); whether sealing may go on."""
        now = self.clock.time()
        was = self.storage.kind
        try:
            if self.ledger.gone():
                self._restore_state_dir()
            if self.storage.may_repair(now) and self.ledger.repair():
                log.info("ledger %s: its indexes were rebuilt (REINDEX): whole again",
                         self.ledger.path)  # fmt: skip
            elif self.storage.kind == DAMAGED:
                return False  # a write elsewhere in a damaged file proves nothing
            for name in self.storage.unstored.dimensions():
                self._store_kept(name)
            if self.storage.failing:
                self.ledger.note_storage_works(now)  # a write: the first that succeeds ends it
        except Exception as e:
            if not self.storage.failed(e, now, self.ledger.path):
                raise
            if was != self.storage.kind:
                self.publish_health()
            return False
        if was is not None:
            self.storage.recovered(now)
            self.publish_health()
        elif self.storage.failing:  # began and was mended this round (the state dir made
            self.publish_health()  # again): named until the next round ends it
        return True

    def _restore_state_dir(self) -> None:
        """The ledger's file is gone from its path (see storage.restore); raises StateDirGone,
        noted, when it cannot be restored."""
        self.storage.failed(
            StateDirGone(f"{self.state_dir} or its ledger was deleted while running"),
            self.clock.time(),
            self.ledger.path,
        )
        try:
            restored, lock = self._restore()
        except OSError as e:
            raise StateDirGone(
                f"{self.state_dir} was deleted while running and cannot be made again: "
                f"{e.strerror or e}"
            ) from None
        old, self.ledger = self.ledger, restored
        self.hooks.ledger = restored
        self.held = (*self.held, lock)
        old.close()
        log.warning(
            "state dir %s was deleted while running: made it again and restored the ledger "
            "from the open file (%d pending hour(s) kept)",
            self.state_dir,
            restored.pending_hour_count(),
        )

    def _restore(self) -> tuple[Ledger, StateLock]:
        """Make the state dir again, copy the open (deleted) ledger back into it, take the state
        lock and the running-config copy again. OSError when the directory cannot be made (or a
        file already took the ledger's place)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger.copy_to(self.ledger.path)
        restored = Ledger(self.state_dir)
        lock = StateLock(self.state_dir)
        lock.acquire()
        _config, snapshot = snapshot_config(self.config.source, self.state_dir)
        keep_snapshot(self.state_dir, snapshot)
        return restored, lock

    def _seal_and_publish(self) -> None:
        if self.seal_closed_hours():
            self.ledger.prune(self.clock.time())  # once an hour: sealed hours are kept 90 days
            self.publish_health()
            self.schedule_send()
        elif self.ledger.seal_errors() != self._seal_errors:
            self.publish_health()

    def seal_closed_hours(self) -> list[Sealed]:
        """Seal every hour that ended (a read still in time holds its own); the hours sealed.
        Between its steps the round lock goes to the reads waiting to store (turns.py)."""
        return self.mode.seal_hours(
            self.ledger,
            self.config,
            self.clock.time(),
            self.offset,
            hold=self.reads.holds,
            turn=self._round_lock,
        )

    def publish_health(self) -> None:
        """Rewrite health.json; remember the seal errors it shows, to notice when they change.
        With the state dir gone and not made again, there is no place for it (`status --check`
        finds no ledger there: not ok)."""
        report = self.storage.report(self.ledger.path)
        try:
            if report is None or report["state"] is None:
                self._seal_errors = self.ledger.seal_errors()
            health.write(self.state_dir, self.ledger, self.clock.time(), storage=report)
            self.metrics.refresh(self.ledger, self.clock.time())
        except Exception as e:
            if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                raise

    def refresh_metrics(self) -> None:
        """The metrics' counts and health taken again, and the file rewritten."""
        now = self.clock.time()
        try:
            self.metrics.refresh(self.ledger, now)
        except Exception as e:
            if not self.storage.failed(e, now, self.ledger.path):
                raise

    def schedule_send(self) -> None:
        """Start the sender at the exact send slot, not at the next tick: on a 15 s grid, a
        fleet's slots would bunch into bursts that the service throttles (benchmarks/fleet.py)."""
        when = due(
            self.ledger.send_state(), self.mode.pending_bounds(self.ledger), self.mode.expires_at
        )
        if when is None or not self.scheduler.running:  # at start-up the send tick fires at once
            return
        wall = self.clock.to_wall(max(when, self.clock.time()))
        self.scheduler.add_job(
            self.send_tick,
            DateTrigger(datetime.fromtimestamp(wall, tz=timezone.utc)),
            id="send-at",
            replace_existing=True,
        )

    def send_tick(self) -> None:
        """Start a sender child when work is due; never waits for it (the next tick reaps it).
        The ledger's storage failing is noted (health), not a traceback at every tick."""
        try:
            self._send_tick()
        except Exception as e:
            if not self.storage.failed(e, self.clock.time(), self.ledger.path):
                raise
            self.publish_health()

    def _send_tick(self) -> None:
        self.hooks.check()
        if not self.stop_event.is_set():
            for child in self.kept:
                child.ensure()  # started again if it exited
            if self.mode.sealing_due(self.ledger):  # an unsubscribe: not at the next round
                self._close_hours_locked()
        if self.stop_event.is_set() or self.sender.running() or not self._verified():
            self.metrics.tick(self.ledger, self.clock.time())
            return
        state, bounds = self.ledger.send_state(), self.mode.pending_bounds(self.ledger)
        self.metrics.tick(self.ledger, self.clock.time(), state, bounds)
        when = due(state, bounds, self.mode.expires_at)
        if when is not None and when <= self.clock.time():
            self.sender.start()
