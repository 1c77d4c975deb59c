"""Instance mode: one record per (dimension, hour), sealed from every sample of the hour, sent
with MeterUsage signed by the instance's (or the task's) role, within MeterUsage's 6 h.

The mode (`InstanceMode`, the Mode of modes/mode.py), its sealing pass (`seal_hours`) and its send
pass (`Sender`: one MeterUsage per hour, oldest first, the identical sealed request every time;
a held hour re-issued under a corrected product code when the service never accepted it).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.aggregate import plain, shown
from agent.billing import instance_sealing
from agent.billing.hour import Sealed, so_far
from agent.billing.sealing import seal_pass
from agent.billing.turn import Turn
from agent.clock import Clock, iso, iso_hour
from agent.config.model import Config, Dimension, Saas
from agent.errors import ConfigError, NotAuthorized, UsageError
from agent.fulfillment.process import HandlerProcess
from agent.host import platform as platforms
from agent.host.identity import Identity
from agent.host.imds import Imds
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.modes.trials import InstanceTrial, TrialCustomer, TrialView
from agent.sending.client import MeteringClient, dry_run_verdict
from agent.sending.outcomes import Outcome
from agent.sending.policy import (
    BACKOFF_BASE,
    DRYRUN_RECHECK,
    Client,
    Report,
    _never,
    backoff,
    expires_at,
    out_of_window,
    sendable_at,
)
from agent.sending.send_pass import SendPass
from agent.windows import OUT_OF_WINDOW, instance_expires_at

log = logging.getLogger(__name__)

Say = Callable[[str, str], None]


def seal_hours(
    ledger: Ledger,
    config: Config,
    now: float,
    offset: float,
    include_current: bool = False,
    hold: Callable[[str, int], bool] | None = None,
    turn: Turn | None = None,
) -> list[Sealed]:
    """Seal every past hour with unsealed samples into one record each (the current one too at a
    stop): the sealing pass (billing/sealing.py) with instance mode's (dimension, hour)."""

    def one(dim: Dimension, hour: int) -> list[Sealed]:
        done = instance_sealing.seal_one(ledger, config, dim, hour, now, offset)
        return [] if done is None else [done]

    sealed = seal_pass(ledger, config, now, one, include_current, hold, turn=turn)
    instance_sealing.log_sealed(sealed)
    return sealed


class Sender(SendPass):
    """One instance-mode send pass: each due hour in its own MeterUsage call."""

    client: Client
    saas = False  # sends instance hours only (customer '')
    other_kind = ("SaaS record(s)", "saas")
    probe_name = "MeterUsage DryRun"  # the permission probe, in log lines

    def _probe(self, now: float) -> Outcome:
        """The permission probe: MeterUsage DryRun of the first dimension."""
        dim = self.config.dimensions[0]
        return self.client.dry_run(self.config.product_code, dim.name, dim.decimals, now)

    def _expire_out_of_window(self, now: float, report: Report) -> None:
        for h in (h for h in self.ledger.pending(saas=False) if now >= expires_at(h)):
            self._mark_expired(h, now, out_of_window(h), report)

    def _send_pending(self, report: Report, flush: bool, deadline: float) -> None:
        queue = self.ledger.pending(saas=False)
        while queue:
            now = self.clock.time()
            if now >= deadline:
                return
            h = queue[0]
            if not flush:
                at = sendable_at(self.ledger.send_state(), h.next_attempt)
                if at is None or at > now:
                    queue.pop(0)
                    continue
            if now >= expires_at(h):
                self._mark_expired(h, now, OUT_OF_WINDOW, report)
                queue.pop(0)
                continue
            h = queue[0] = self._current_product(h, now, report)
            self.ledger.begin_attempt(h.dimension, h.hour, now)
            outcome = self.client.meter_usage(h)
            now = self.clock.time()
            where = f"hour {iso_hour(h.hour)} dimension {h.dimension}"
            error, until = outcome.error, iso(expires_at(h))
            match outcome.status:
                case "retry":
                    delay = self.ledger.back_off(now, error or "send failed", self._backoff)
                    log.warning("%s: send failed (%s); retrying after %.1f s (until %s)", where,
                                error, delay, until)  # fmt: skip
                    self.ledger.schedule_retry(h.dimension, h.hour, error=error,
                                               next_attempt=now + delay)  # fmt: skip
                    report.retry.append((h.dimension, h.hour, error or ""))
                    if now + delay >= deadline:
                        return
                    self.clock.sleep(delay)
                    continue  # the same hour again, the identical request
                case "unauthorized":
                    log.error("%s: not authorized (%s); sending paused, DryRun every %d s", where,
                              error, DRYRUN_RECHECK)  # fmt: skip
                    self.ledger.schedule_retry(h.dimension, h.hour, error=error,
                                               next_attempt=h.next_attempt)  # fmt: skip
                    self.ledger.deauthorize(now, error or "not authorized", now + DRYRUN_RECHECK)
                    report.paused = True
                    return
                case "held":
                    # The seller's configuration was refused (product code, dimension): pending
                    # until it expires, retried on its own backoff so other hours keep going out.
                    delay = max(BACKOFF_BASE, backoff(h.attempts + 1, self.rng))
                    log.error("%s: quantity %s refused (%s); held, not lost: fix the config "
                              "(product_code, dimensions[].name) or the listing and restart; "
                              "retrying in %.0f s until %s", where, h.quantity.text, error, delay,
                              until)  # fmt: skip
                    self.ledger.hold(h.dimension, h.hour, error=error, next_attempt=now + delay)
                    self.ledger.note_failure(now, f"{where} refused: {error}")
                    report.held.append((h.dimension, h.hour, error or ""))
                case "sent":
                    self.ledger.mark_sent(h.dimension, h.hour, record_id=outcome.record_id, now=now)
                    self.ledger.note_success(now, accepted=True)
                    log.info("%s: sent quantity %s, record %s", where, h.quantity.text,
                             outcome.record_id)  # fmt: skip
                    report.sent.append((h.dimension, h.hour, outcome.record_id or ""))
                case "expired":
                    self._mark_expired(h, now, "the service said so", report, error=error)
                case "rejected" | "dryrun_ok":
                    log.error("%s: quantity %s rejected: %s", where, h.quantity.text, error)
                    self.ledger.reject(h.dimension, h.hour, error=error, now=now)
                    self.ledger.note_failure(now, f"{where} rejected: {error}")
                    report.rejected.append((h.dimension, h.hour, error or ""))
                case _:
                    _never(outcome.status)
            queue.pop(0)

    def _current_product(self, h: SealedHour, now: float, report: Report) -> SealedHour:
        """An hour sealed under another product code goes out under the config's current one,
        with a new ClientToken, when the service never accepted it: no request of it left, or
        every one was refused for its product code. Otherwise (one may have been recorded: a
        timeout, a send child killed mid-request) it is resent identically."""
        current = self.config.product_code
        if h.product_code == current:
            return h
        if h.refusals != h.attempts:
            return h
        token = str(uuid.uuid4())
        if not self.ledger.reissue(
            h.dimension, h.hour, product_code=current, client_token=token, now=now
        ):
            return h
        log.warning(
            "hour %s dimension %s: re-issued under product code %s with a new ClientToken "
            "(sealed under %s, which the service never accepted)",
            iso_hour(h.hour),
            h.dimension,
            current,
            h.product_code,
        )
        report.reissued.append((h.dimension, h.hour))
        fresh = [x for x in self.ledger.pending() if (x.dimension, x.hour) == (h.dimension, h.hour)]
        return fresh[0] if fresh else h


class InstanceMode:
    """Instance mode (see the module docstring)."""

    name = "instance"

    def key(self, h: SealedHour) -> dict[str, str]:
        return {}

    def expires_at(self, timestamp: float) -> float:
        return instance_expires_at(timestamp)

    def pending_bounds(self, ledger: Ledger) -> list[SealedHour]:
        return ledger.pending_bounds(saas=False)

    def other_pending(self, ledger: Ledger) -> tuple[str, int, int] | None:
        n, oldest = ledger.pending_other_kind(False)
        return ("saas", n, oldest) if n and oldest is not None else None

    def seal_hours(
        self,
        ledger: Ledger,
        config: Config,
        now: float,
        offset: float,
        include_current: bool = False,
        hold: Callable[[str, int], bool] | None = None,
        turn: Turn | None = None,
    ) -> list[Sealed]:
        return seal_hours(ledger, config, now, offset, include_current, hold, turn)

    def sender(self, ledger: Ledger, config: Config, client: Any, clock: Clock) -> SendPass:
        return Sender(ledger, config, client, clock)

    def identity(self, clock: Clock, state_dir: Path) -> Identity:
        """The EC2 instance, as IMDS names it (one instance, one ledger)."""
        return Identity(Imds(), clock, state_dir)

    def registration(
        self, config: Config, running_config: Path, clock: Clock, log_format: str
    ) -> HandlerProcess | None:
        return None

    def notifications(
        self, config: Config, running_config: Path, clock: Clock, log_format: str
    ) -> HandlerProcess | None:
        return None

    def sealing_due(self, ledger: Ledger) -> bool:
        return False

    def credentials(self, platform: str, method: str | None) -> tuple[str | None, str | None]:
        """AWS refuses the node's role for a container product's MeterUsage."""
        return (
            platforms.node_role_refusal(platform, method),
            platforms.static_keys_warning(platform, method),
        )

    def check_permission(
        self, client: MeteringClient, config: Config, clock: Clock, say: Say
    ) -> None:
        """DryRun each dimension, so a name the listing lacks fails `check` (77) and is named.

        A refusal that is not about the dimension (role, entitlement, network) ends it at once."""
        unknown = []
        for dim in config.dimensions:
            outcome = client.dry_run(config.product_code, dim.name, dim.decimals, clock.time())
            if outcome.code == "InvalidUsageDimensionException":
                unknown.append(dim.name)
                say("fail", f"MeterUsage DryRun {dim.name}: {outcome.error}")
                continue
            say("ok", f"{dry_run_verdict(outcome)} for {dim.name}")
        if unknown:
            raise NotAuthorized(
                f"MeterUsage DryRun: dimension {', '.join(unknown)} is not a dimension of "
                f"product {config.product_code}'s listing; fix dimensions[].name in "
                f"{config.source} (or add it to the listing)"
            )

    def sample_lines(self, breakdown: Mapping[Any, Decimal], ledger: Ledger | None) -> list[str]:
        """A reading's breakdown: the 5 largest label sets, then what the rest add."""
        top = 5
        ranked = sorted(breakdown.items(), key=lambda kv: (-kv[1], kv[0]))
        lines = [
            f"  {' '.join(f'{k}={shown(v, 60)}' for k, v in labels) or '(no labels)'}  "
            f"{plain(value)}"
            for labels, value in ranked[:top]
        ]
        rest = ranked[top:]
        if rest:
            total = sum((v for _, v in rest), Decimal(0))
            lines.append(f"  ... {len(rest)} more label sets  {plain(total)}")
        return lines

    def customer_option(self, customer: str | None, source: Path) -> None:
        if customer is not None:
            raise UsageError(f"--customer is for SaaS mode; {source} has mode: instance")

    def so_far(self, ledger: Ledger, dim: Dimension, hour: int) -> str | None:
        return so_far(ledger, dim, hour)

    def status(self, ledger: Ledger, config: Config, now: float) -> dict[str, Any]:
        return {}

    def customers(self, command: str, source: Path) -> Saas:
        raise ConfigError(
            "mode",
            f"`{command}` is for SaaS products; set mode: saas in {source} (see docs/saas.md)",
        )

    def trial(self, customers: Sequence[TrialCustomer], source: Path) -> TrialView:
        if customers:
            raise ConfigError(
                "mode", f"trial --customers is for SaaS mode; {source} has mode: instance"
            )
        return InstanceTrial()

    def image_refusal(self) -> str | None:
        return None
