"""What sealing is given to let sample writes in between its steps: the daemon's round lock
(daemon/turns.py), held by the sealing pass. A seal of many records (SaaS mode: one per customer)
runs in steps, each its own short transaction (billing/saas_sealing.py)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class Turn(Protocol):
    """How sealing lets sample writes in: the daemon's round lock (daemon/turns.py), which the
    sealing pass holds. A seal of many records runs in steps, each its own short transaction."""

    def give_way(self) -> None:
        """Before each step: the writes waiting for the lock go first."""
        ...

    def released(self) -> AbstractContextManager[None]:
        """Around work that writes nothing (reading customers, the arithmetic)."""
        ...


def released(turn: Turn | None) -> AbstractContextManager[None]:
    return nullcontext() if turn is None else turn.released()
