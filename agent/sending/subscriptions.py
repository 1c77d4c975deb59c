"""The `watch-subscriptions` child: long-polls the seller's SQS queue of AWS Marketplace
subscription notifications and applies each to the ledger, deleting a message only after it is
applied (`run` keeps this child, as it keeps the fulfillment handler; boto3 lives only here).

At least once, never lost: a message received but not yet applied (the child killed, the ledger
busy, the machine off) is not deleted, so SQS shows it again after the queue's visibility
timeout and the next receive applies it. Applying is idempotent and ordered by the
notification's own time (ledger/subscriptions.py), so a redelivery or SQS's own duplicate
changes nothing. What it cannot apply is logged; see notices.py for which messages are deleted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.clock import Clock, iso
from agent.ledger import Ledger
from agent.sending.notices import Ignored, Malformed, Notice, parse

log = logging.getLogger(__name__)

RETRY_BASE = 1.0  # seconds before polling again after a failed receive; doubled, capped
RETRY_CAP = 300.0
PERMISSIONS = "sqs:ReceiveMessage and sqs:DeleteMessage on the queue (and kms:Decrypt if SSE-KMS)"


class Queue(Protocol):
    def receive(self) -> Sequence[Mapping[str, Any]]: ...

    def delete(self, receipt_handle: str) -> None: ...


@dataclass
class Tally:
    """What one poll did, by outcome (the tests' oracle beside the ledger and the queue)."""

    applied: list[str] = field(default_factory=list)  # ledger outcome: applied/duplicate/stale
    ignored: int = 0
    malformed: int = 0
    undeleted: int = 0  # applied, but the delete failed: the redelivery is a duplicate


def apply(ledger: Ledger, notice: Notice, now: float) -> str:
    """One notification into the ledger: 'applied', 'duplicate' or 'stale'."""
    return ledger.apply_subscription(
        account_id=notice.account_id,
        customer_identifier=notice.customer_identifier,
        state=notice.state,
        event_at=notice.event_at,
        now=now,
        offer=notice.offer,
        free_trial=notice.free_trial,
        message_id=notice.message_id,
    )


def handle(
    queue: Queue, ledger: Ledger, product_code: str, messages: Sequence[Mapping[str, Any]],
    now: Callable[[], float],
) -> Tally:  # fmt: skip
    """Apply each received message, then delete it; a malformed one is left for the queue's
    dead-letter queue. An error applying one (the ledger's storage) propagates: nothing after
    it is deleted, so all of them come back."""
    tally = Tally()
    for m in messages:
        parsed = parse(m, product_code, now())
        sqs_id = m.get("MessageId", "?")
        if isinstance(parsed, Malformed):
            tally.malformed += 1
            count = (m.get("Attributes") or {}).get("ApproximateReceiveCount", "?")
            log.error("subscription notification %s not applied: %s; left in the queue (received "
                      "%s time(s); a redrive policy moves it to your dead-letter queue)", sqs_id,
                      parsed.reason, count)  # fmt: skip
            continue
        if isinstance(parsed, Ignored):
            tally.ignored += 1
            log.warning("subscription notification %s ignored: %s", sqs_id, parsed.reason)
        else:
            result = apply(ledger, parsed, now())
            tally.applied.append(result)
            level = logging.WARNING if parsed.action == "subscribe-fail" else logging.INFO
            log.log(level, "subscription: %s for buyer %s (offer %s, sent %s): %s",
                    parsed.action, parsed.buyer, parsed.offer or "-", iso(parsed.event_at),
                    result)  # fmt: skip
        try:
            queue.delete(str(m["ReceiptHandle"]))
        except Exception as e:  # applied: the redelivery will be a harmless duplicate
            tally.undeleted += 1
            log.warning("subscription notification %s: applied, but not deleted (%s); it comes "
                        "back and changes nothing", sqs_id, e)  # fmt: skip
    return tally


def watch(
    queue: Queue, ledger: Ledger, product_code: str, clock: Clock,
    running: Callable[[], bool] = lambda: True,
) -> None:  # fmt: skip
    """Poll until `running()` is false (the child runs until `run` ends it). A failed receive,
    or a ledger that cannot apply (its messages stay in the queue), is logged when it begins and
    when it ends, and retried with a capped backoff."""
    from agent.sending.client import QueueError

    failing: tuple[str, str] | None = None  # ("receive" | "apply", the error), logged once
    delay = RETRY_BASE
    while running():
        try:
            messages = queue.receive()
            if messages:
                handle(queue, ledger, product_code, messages, clock.time)
        except Exception as e:
            if isinstance(e, QueueError):
                now_failing = ("receive", e.code)
                hint = f"; the agent's role needs {PERMISSIONS}" if e.denied else ""
                line = f"cannot receive ({e}){hint}; retrying"
            else:  # the ledger cannot store (disk full, damaged): nothing after it deleted
                now_failing = ("apply", f"{type(e).__name__}: {e}")
                line = (f"cannot apply notifications to the ledger ({now_failing[1]}); they stay "
                        "in the queue and are applied once it can")  # fmt: skip
            if failing != now_failing:
                log.error("subscription queue: %s", line)
                failing = now_failing
            clock.sleep(delay)
            delay = min(RETRY_CAP, delay * 2)
            continue
        if failing is not None and (failing[0] == "receive" or messages):
            log.info("subscription queue: working again")
            failing, delay = None, RETRY_BASE


def child_main(cfg: Any, clock: Clock) -> int:
    """`metering-agent watch-subscriptions`: poll until SIGTERM/SIGINT, or until the `run` that
    started it is gone. Ending it at any instant is safe (see the module docstring), so a signal
    ends it at once, even in the middle of a long poll."""
    import os
    import signal
    import sys

    from agent.host.imds import resolve_region
    from agent.sending.client import SubscriptionQueue, queue_endpoint

    notifications = cfg.saas.notifications
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    region, _ = queue_endpoint(notifications.queue_url)
    if region is None:
        region, _where = resolve_region(cfg.metering.region)
    queue = SubscriptionQueue(notifications.queue_url, region)
    ledger = Ledger(cfg.state_dir)
    parent = os.getppid()

    def running() -> bool:
        if os.getppid() != parent:  # `run` was killed (-9): no orphan keeps polling
            log.warning("subscription queue: the parent process %d is gone; stopping", parent)
            return False
        return True

    log.info("subscription queue: polling %s (region %s)", notifications.queue_url, region)
    try:
        watch(queue, ledger, cfg.product_code, clock, running)
    finally:
        ledger.close()
    return 0
