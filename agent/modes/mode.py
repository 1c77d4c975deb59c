"""What a billing mode is: the one interface instance mode and SaaS mode implement.

The two modes differ in what a record is keyed by ((dimension, hour), or (customer, dimension,
hour)), how an hour is sealed (one record, or one per customer with idle zeros and usage held for
unknown customers), which API sends it (MeterUsage, or BatchMeterUsage) and its window (6 h, or
24 h and the month-end cutoff), and so in what `check`, `sample`, `status` and `report` show.
Everything else is shared. A mode is chosen once, from the config, by the command that starts
(`modes.choose.mode_for`: `run`'s start, the `send` child, `status`, `report`, `check`, `sample`,
`trial`, the customers commands, `prepare-image`) and passed down; nothing below asks the config
which mode it is. A new mode is a new implementation of this Protocol, not a new branch.

Implementations: `InstanceMode` (modes/instance.py), `SaasMode` (modes/saas.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from agent.billing.hour import Sealed
from agent.billing.turn import Turn
from agent.clock import Clock
from agent.config.model import Config, Dimension, Saas
from agent.fulfillment.process import HandlerProcess
from agent.host.identity import Identity
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.modes.trials import TrialCustomer, TrialView
from agent.sending.client import MeteringClient
from agent.sending.send_pass import SendPass

Say = Callable[[str, str], None]  # `check`'s line printer: (status, text)


class Mode(Protocol):
    """Instance mode or SaaS mode (see the module docstring)."""

    name: str  # as the config's `mode:` says it

    # -- the record: what it is keyed by, its window -----------------------------------------

    def key(self, h: SealedHour) -> dict[str, str]:
        """What tells this mode's records apart besides dimension and hour, as `status` and
        `report` show it (a customer column, or nothing)."""
        ...

    def expires_at(self, timestamp: float) -> float:
        """When a record of this Timestamp can no longer be sent (agent/windows.py)."""
        ...

    def pending_bounds(self, ledger: Ledger) -> list[SealedHour]:
        """What `sending.policy.due` needs of this mode's pending records."""
        ...

    def other_pending(self, ledger: Ledger) -> tuple[str, int, int] | None:
        """Pending records of the other mode (its name, how many, the oldest hour): left by a
        config of that mode in this state_dir, never sent or expired by this one."""
        ...

    # -- sealing and sending -------------------------------------------------------------------

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
        """Seal every past hour with unsealed samples (the current one too at a stop), in
        short transactions; `turn` lets sample writes in between them (billing.sealing.Turn)."""
        ...

    def sender(self, ledger: Ledger, config: Config, client: Any, clock: Clock) -> SendPass:
        """The send pass for this mode's records, on `client` (a MeteringClient, or a fake)."""
        ...

    # -- run -----------------------------------------------------------------------------------

    def identity(self, clock: Clock, state_dir: Path) -> Identity:
        """Whose ledger it is where no container platform names the task or pod."""
        ...

    def registration(
        self, config: Config, running_config: Path, clock: Clock, log_format: str
    ) -> HandlerProcess | None:
        """The fulfillment handler child `run` keeps, if this mode serves one."""
        ...

    def notifications(
        self, config: Config, running_config: Path, clock: Clock, log_format: str
    ) -> HandlerProcess | None:
        """The subscription queue child `run` keeps, if this mode applies Marketplace's
        subscription notifications."""
        ...

    def sealing_due(self, ledger: Ledger) -> bool:
        """Whether something asks for a seal before the next round (SaaS mode: a customer's
        unsubscribe, whose open usage is sealed and sent at once)."""
        ...

    # -- commands ------------------------------------------------------------------------------

    def credentials(self, platform: str, method: str | None) -> tuple[str | None, str | None]:
        """`check`: a refusal of these credentials (exit 77) and a warning about them."""
        ...

    def check_permission(
        self, client: MeteringClient, config: Config, clock: Clock, say: Say
    ) -> None:
        """`check`: the permission probe, a line each; raises the error `check` exits with."""
        ...

    def sample_lines(self, breakdown: Mapping[Any, Decimal], ledger: Ledger | None) -> list[str]:
        """`sample`: a reading's breakdown as this mode bills it."""
        ...

    def customer_option(self, customer: str | None, source: Path) -> None:
        """`report --customer`: refused where records have no customer."""
        ...

    def so_far(self, ledger: Ledger, dim: Dimension, hour: int) -> str | None:
        """`status`: what the dimension's open hour would bill if sealed now, as the sum of the
        records it would be sealed into (None: no sample yet)."""
        ...

    def status(self, ledger: Ledger, config: Config, now: float) -> dict[str, Any]:
        """`status`: this mode's own sections."""
        ...

    def customers(self, command: str, source: Path) -> Saas:
        """The customer settings the customers commands and the fulfillment handler use;
        refused (78) where there are no customers."""
        ...

    def trial(self, customers: Sequence[TrialCustomer], source: Path) -> TrialView:
        """`trial`: this mode's part of it (modes/trials.py); customers where there are none
        refused (78)."""
        ...

    def image_refusal(self) -> str | None:
        """`prepare-image`: why it must not remove this mode's ledger (None: it may)."""
        ...
