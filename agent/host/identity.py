"""One instance, one ledger, verified before anything is sent from it.

A ledger records the IMDS instance-id it was made on. A ledger baked into an AMI on the seller's
build instance names that instance; on the buyer's first boot IMDS may be slow to answer. Until
IMDS has confirmed the id, the ledger is *unverified*: `run` keeps sampling into it but seals and
sends nothing (health says why), and asks IMDS again with backoff (quickly for the first minute,
then every minute). Once IMDS answers: the same id verifies it; another id moves the ledger aside
unsent and starts a fresh one that takes over the samples and positions written since the first
unverified run began. That instant is kept in the ledger's meta (`unverified_since`), so a run that
stops before IMDS answers loses nothing: the next start carries its samples too; samples the build
instance took before baking predate it and stay behind.

A ledger with no id yet, or a random one (made where IMDS never answered: not EC2), is this
host's own and is verified at once; an IMDS id that answers later is adopted.
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from agent.clock import Clock, iso
from agent.errors import AgentError
from agent.host.imds import Imds, ImdsError
from agent.ledger import Ledger, replace_closed
from agent.ledger.database import LEDGER_FILE
from agent.sending import health

log = logging.getLogger(__name__)

# Seconds between IMDS tries: about a minute of quick ones, then once a minute for good.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)
RETRY_EVERY = 60.0
SINCE = "unverified_since"  # start of the first unverified run: its samples are this machine's


def ask(imds: Imds) -> str | None:
    try:
        return imds.instance_id()
    except ImdsError as e:
        log.info("no IMDS instance id (%s)", e)
        return None


def settle(
    ledger: Ledger,
    instance_id: str | None,
    state_dir: Path,
    now: float,
    carry_since: float | None = None,
) -> Ledger:
    """Apply one IMDS answer (None: no answer) to the ledger; returns the ledger to use.

    A ledger naming another IMDS instance is moved aside unsent, and a fresh one takes over the
    samples, positions and usage found unread written since the earlier of `carry_since` and the
    ledger's `unverified_since` mark (the unverified runs', this one's or earlier ones that
    stopped before IMDS answered)."""
    known = ledger.get_meta("instance_id")
    source = ledger.get_meta("instance_id_source")
    if instance_id and known and known != instance_id and source == "imds":
        marks = [t for t in (carry_since, ledger.get_meta(SINCE)) if t is not None]
        samples, positions, unread = ledger.since(min(marks)) if marks else ([], [], [])
        ledger.close()

        def fill(fresh: Ledger) -> None:
            fresh.take_over(samples, positions, unread)
            fresh.update_meta(instance_id=instance_id, instance_id_source="imds")

        moved = replace_closed(state_dir, f"instance-{known}", now, fill)
        ledger = Ledger(state_dir)
        log.warning(
            "the ledger belongs to instance %s, this is %s (an image baked with state?): moved "
            "it to %s and started a fresh one; nothing from it will be sent",
            known,
            instance_id,
            moved,
        )
        known = instance_id
    if instance_id and known != instance_id:
        ledger.update_meta(instance_id=instance_id, instance_id_source="imds")
    elif not known:
        ledger.update_meta(instance_id=f"local-{uuid.uuid4()}", instance_id_source="random")
    if instance_id or source != "imds":
        ledger.mark_verified()
    return ledger


def usable(ledger: Ledger, state_dir: Path) -> Ledger:
    """The ledger after a failed settle: the same one if still open, else the file reopened.

    Why: settle closes the ledger before replacing it; a failure after that (the old file is
    untouched, see replace_closed) must not leave the daemon storing into a closed ledger. No
    file to reopen (deleted meanwhile, or it will not open): AgentError, and the daemon stops
    rather than run on without a ledger."""
    try:
        ledger.get_meta("instance_id")
        return ledger
    except sqlite3.Error:
        ledger.close()
    path = Path(state_dir) / LEDGER_FILE
    if not path.exists():  # a new file here would pair with a WAL left by the old one
        raise AgentError(f"{path}: gone after a failed move aside; restart to recover it")
    try:
        return Ledger(state_dir)
    except (OSError, sqlite3.Error) as e:
        raise AgentError(f"{path}: cannot reopen it after a failed move aside: {e}") from None


def stop_now(code: int = 1) -> NoReturn:
    """Exit the process at once, from any thread, with `code` (systemd restarts the agent).

    Why: for a daemon left without a usable ledger every later store would fail silently; a
    restart loses nothing, as the unverified run's samples are carried from `unverified_since`."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(code)


class Identity:
    """The daemon's view: whether this run may seal and send from its ledger, and the thread that
    keeps asking IMDS until it may (or, for a random id, until IMDS gives the real one)."""

    def __init__(self, imds: Imds, clock: Clock, state_dir: Path) -> None:
        self.imds = imds
        self.clock = clock
        self.state_dir = state_dir
        self.verified = threading.Event()
        self.started = 0.0
        self.settled = False  # the late answer applied (settle succeeded in the swap)
        self._thread: threading.Thread | None = None

    def start(self, ledger: Ledger) -> Ledger:
        """Ask IMDS once; the ledger to sample into (verified or not)."""
        self.started = self.clock.time()
        answer = ask(self.imds)
        source = ledger.get_meta("instance_id_source")
        known = ledger.get_meta("instance_id")
        if answer is not None or source != "imds":
            try:
                ledger = settle(ledger, answer, self.state_dir, self.started)
            except Exception as e:
                if not (answer and known and known != answer and source == "imds"):
                    raise  # not a move aside: nothing to fall back on (exit 1, one line)
                log.error("could not move aside the ledger of instance %s: %s", known, e)
                ledger = usable(ledger, self.state_dir)
            else:
                self.verified.set()  # an IMDS answer, or this host's own ledger (new or random)
                return ledger
            wait = f"IMDS says this is {answer} but that ledger could not be moved aside"
        else:
            wait = f"IMDS has not answered since {iso(self.started)}"
        reason = (
            f"instance identity not verified: {wait}; the ledger names instance {known}, and "
            "nothing is sealed or sent from it until IMDS confirms this is that instance"
        )
        log.warning("%s", reason)
        ledger.mark_unverified(reason, self.started)
        health.write(self.state_dir, ledger, self.started)
        return ledger

    def _settle(self, ledger: Ledger, instance_id: str) -> Ledger:
        """Run by `swap` under the daemon's round lock: the ledger is verified in the same step,
        so a stop cannot slip between the swap and the verification and skip its seal. A failed
        move aside leaves the ledger as it was (reopened), unverified, and is tried again."""
        try:
            ledger = settle(ledger, instance_id, self.state_dir, self.clock.time(), self.started)
        except Exception as e:
            log.error(
                "could not settle the ledger for instance %s (trying again later): %s",
                instance_id,
                e,
            )
            return usable(ledger, self.state_dir)  # AgentError if it cannot be: the caller stops
        self.verified.set()
        self.settled = True
        return ledger

    def keep_asking(
        self,
        stop: threading.Event,
        swap: Callable[[Callable[[Ledger], Ledger]], bool],
        wanted: Callable[[], bool],
    ) -> None:
        """In the background: ask IMDS with backoff while `wanted()`; on an answer, `swap` runs
        the settling under the daemon's round lock (False: stopping), which verifies the ledger."""

        def loop() -> None:
            tries = 0
            while wanted():
                delay = RETRY_DELAYS[tries] if tries < len(RETRY_DELAYS) else RETRY_EVERY
                tries += 1
                if stop.wait(delay):
                    return
                answer = ask(self.imds)
                if answer is None:
                    continue
                if not swap(functools.partial(self._settle, instance_id=answer)):
                    return  # stopping
                if not self.settled:
                    continue  # it failed (logged) and the ledger is as it was: ask again
                log.info("IMDS answered: instance %s; the ledger is verified", answer)
                return

        self._thread = threading.Thread(target=loop, name="imds-identity", daemon=True)
        self._thread.start()


def adopt(ledger: Ledger, task_id: str, source: str) -> Ledger:
    """A container's ledger (ECS task, EKS pod), verified at once: the id is the platform's own
    (TaskARN, pod uid), nothing to wait for. A ledger another task or pod left on a persistent
    volume is kept, not moved aside: its pending hours are the same buyer's usage and are sent;
    this task's id is recorded (and seeds the send offset) and the previous one kept in meta."""
    known = ledger.get_meta("instance_id")
    if known and known != task_id:
        log.warning(
            "the ledger was written by %s, this is %s: kept (a persistent volume); its %d "
            "pending hour(s) are sent from here",
            known,
            task_id,
            ledger.pending_hour_count(),
        )
        ledger.update_meta(previous_instance_id=known)
    if known != task_id or ledger.get_meta("instance_id_source") != source:
        ledger.update_meta(instance_id=task_id, instance_id_source=source)
    ledger.mark_verified()
    return ledger


class ContainerIdentity(Identity):
    """An ECS task's or EKS pod's identity: known at start (platform.identity), so the ledger is
    verified at once and nothing is asked in the background."""

    def __init__(self, task_id: str, source: str, clock: Clock, state_dir: Path) -> None:
        super().__init__(Imds(), clock, state_dir)
        self.task_id, self.source = task_id, source

    def start(self, ledger: Ledger) -> Ledger:
        self.started = self.clock.time()
        ledger = adopt(ledger, self.task_id, self.source)
        self.verified.set()
        self.settled = True
        return ledger

    def keep_asking(
        self,
        stop: threading.Event,
        swap: Callable[[Callable[[Ledger], Ledger]], bool],
        wanted: Callable[[], bool],
    ) -> None:
        """Nothing to ask: the platform gave the identity at start."""
