"""What `trial` (commands/trial.py) does differently in each mode: the trial is the same run of
the daemon against the emulator on a fast clock; a mode says what its config needs changed, which
customers to register first, what a row of the table is keyed by, when an hour has all it should,
and what the service refused.

Instance mode: a row per (hour, dimension), MeterUsage. SaaS mode: a row per (hour, customer,
dimension), BatchMeterUsage; the customers (labels, with account ids made up where not given) get
registration tokens from the emulator and are stored with `customers add --token - --as LABEL`,
as a seller would, before the daemon starts.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.clock import hour_start
from agent.config.model import Saas
from agent.emulator.rules import Record, ServiceError, _timestamp
from agent.ledger import Ledger

ACCOUNT = re.compile(r"[0-9]{12}")
FIRST_ACCOUNT = 100_000_000_001  # made-up account ids: 1000 0000 0001, ... (skipping given ones)


@dataclass(frozen=True)
class TrialCustomer:
    """A customer of a SaaS trial: the label its usage carries, the buyer's made-up ids."""

    label: str
    account: str
    license: str


@dataclass(frozen=True)
class Refusal:
    hour: int | None
    what: str  # the dimension (SaaS mode: "customer dimension"), "DryRun ..." for a DryRun
    code: str
    count: int
    key: tuple[str, ...] = ()  # the table row's key it stands for (none for a DryRun)


Key = tuple[str, ...]  # what a row is keyed by besides its hour: (dimension,) or (customer, dim)


class TrialView(Protocol):
    """One mode's part of a trial (see the module docstring)."""

    operation: str  # the API whose records the table shows
    key_names: tuple[str, ...]  # the table's columns for a Key

    def adapt(self, data: dict[str, Any]) -> None:
        """Change the trial's copy of the config (already given the trial's state dir and
        endpoint) where this mode must."""
        ...

    def registrations(self) -> list[TrialCustomer]:
        """The customers to register before the daemon starts."""
        ...

    def key(self, record: Record) -> Key: ...

    def expected(self, dimensions: Sequence[str], got: set[Key]) -> set[Key]:
        """What a whole hour must have received (or had refused), given what it has."""
        ...

    def refusals(self, calls: Iterable[dict[str, Any]]) -> list[Refusal]:
        """The emulator's calls that refused records, grouped by hour, key and code."""
        ...

    def held(self, ledger: Ledger | None) -> list[str]:
        """What the trial's ledger kept unsent that the table cannot show, a line each."""
        ...


Seen = Counter[tuple[int | None, tuple[str, ...], str, str]]  # (hour, key, what, code)


def _group(seen: Seen) -> list[Refusal]:
    return [
        Refusal(h, w, c, n, k)
        for (h, k, w, c), n in sorted(seen.items(), key=lambda i: (i[0][0] or 0, i[0][2:]))
    ]


def _hour(timestamp: Any) -> int | None:
    try:
        return hour_start(_timestamp(timestamp))
    except ServiceError:  # a malformed request has no hour to show
        return None


class InstanceTrial:
    """Instance mode: MeterUsage, one record per (hour, dimension)."""

    operation = "MeterUsage"
    key_names: tuple[str, ...] = ("dimension",)

    def adapt(self, data: dict[str, Any]) -> None:
        return None

    def registrations(self) -> list[TrialCustomer]:
        return []

    def key(self, record: Record) -> Key:
        return (record.dimension,)

    def expected(self, dimensions: Sequence[str], got: set[Key]) -> set[Key]:
        return {(d,) for d in dimensions}

    def refusals(self, calls: Iterable[dict[str, Any]]) -> list[Refusal]:
        """MeterUsage answers that were errors (DryRun's success answer aside)."""
        seen: Seen = Counter()
        for call in calls:
            request = call.get("request") or {}
            if call.get("outcome") != "error" or call.get("code") == "DryRunOperation":
                continue
            if call.get("operation") not in (None, "MeterUsage"):
                continue
            dim = str(request.get("UsageDimension"))
            code = str(call.get("code"))
            if request.get("DryRun"):
                seen[(None, (), f"DryRun {dim}", code)] += 1
            else:
                seen[(_hour(request.get("Timestamp")), (dim,), dim, code)] += 1
        return _group(seen)

    def held(self, ledger: Ledger | None) -> list[str]:
        return []


class SaasTrial:
    """SaaS mode: BatchMeterUsage, one record per (hour, customer, dimension)."""

    operation = "BatchMeterUsage"
    key_names: tuple[str, ...] = ("customer", "dimension")

    def __init__(self, settings: Saas, customers: Sequence[TrialCustomer]) -> None:
        self.settings = settings
        self.customers = list(customers)
        self._labels = {f"{c.account}|{c.license}": c.label for c in customers}

    def adapt(self, data: dict[str, Any]) -> None:
        """No fulfillment handler on the seller's port and no polling of the seller's queue:
        the trial's customers are registered by the trial itself."""
        saas = dict(data.get("saas") or {})
        saas.pop("registration", None)
        saas.pop("notifications", None)
        data["saas"] = saas

    def registrations(self) -> list[TrialCustomer]:
        return self.customers

    def label(self, customer: str | None) -> str:
        """The label of a record's "ACCOUNT|LICENSE" (a legacy identifier as it is)."""
        return self._labels.get(customer or "", customer or "?")

    def key(self, record: Record) -> Key:
        return (self.label(record.customer), record.dimension)

    def expected(self, dimensions: Sequence[str], got: set[Key]) -> set[Key]:
        """Every customer has a record of every dimension with samples (idle zeros); without
        idle zeros, at least the dimensions it got anything for."""
        if self.settings.idle_zero and self.customers:
            return {(c.label, d) for c in self.customers for d in dimensions}
        return got

    def refusals(self, calls: Iterable[dict[str, Any]]) -> list[Refusal]:
        """Whole BatchMeterUsage calls refused (each record counted), and records a call
        answered with a Status other than Success (CustomerNotSubscribed, DuplicateRecord)."""
        seen: Seen = Counter()
        for call in calls:
            if call.get("operation") != "BatchMeterUsage":
                continue
            request = call.get("request") or {}
            if call.get("outcome") == "error":
                for r in request.get("UsageRecords") or []:
                    seen[self._seen(r, str(call.get("code")))] += 1
            elif call.get("outcome") == "ok":
                for result in (call.get("answer") or {}).get("Results") or []:
                    status = str(result.get("Status"))
                    if status != "Success":
                        seen[self._seen(result.get("UsageRecord") or {}, status)] += 1
        return _group(seen)

    def held(self, ledger: Ledger | None) -> list[str]:
        """Usage of labels none of the customers has: held, as in production (`status` shows it
        as `unknown customer`), a line per label."""
        by: dict[str, tuple[set[str], set[int]]] = {}
        for h in ledger.held_usage() if ledger is not None else []:
            dims, hours = by.setdefault(h.customer, (set(), set()))
            dims.add(h.dimension)
            hours.add(h.hour)
        return [
            f"label {label!r} (no customer has it): {', '.join(sorted(dims))} in "
            f"{len(hours)} hour(s); sealed once `customers add` names it, within 24 h"
            if label
            else f"usage without the customer label: {', '.join(sorted(dims))} in "
            f"{len(hours)} hour(s); it expires unsent after 24 h (no customer to bill)"
            for label, (dims, hours) in sorted(by.items())
        ]

    def _seen(self, r: dict[str, Any], code: str) -> tuple[int | None, tuple[str, ...], str, str]:
        who = (
            r.get("CustomerIdentifier") or f"{r.get('CustomerAWSAccountId')}|{r.get('LicenseArn')}"
        )
        key = (self.label(str(who)), str(r.get("Dimension")))
        return (_hour(r.get("Timestamp")), key, " ".join(key), code)


def trial_customers(specs: Sequence[str]) -> list[TrialCustomer]:
    """`LABEL`, `LABEL=ACCOUNT_ID` or a 12-digit `ACCOUNT_ID` (its own label, as `customers add`
    labels a customer by default) -> customers with made-up licenses (and accounts where none is
    given). ValueError names the entry that is wrong."""
    pairs: list[tuple[str, str | None]] = []
    for spec in specs:
        label, _, account = spec.partition("=")
        label, account = label.strip(), account.strip()
        if not label:
            raise ValueError(f"{spec!r}: expected LABEL, LABEL=ACCOUNT_ID or ACCOUNT_ID")
        if account and not ACCOUNT.fullmatch(account):
            raise ValueError(f"{spec!r}: the account id must be 12 digits")
        if not account and ACCOUNT.fullmatch(label):
            account = label
        pairs.append((label, account or None))
    labels = [label for label, _ in pairs]
    for label in set(labels):
        if labels.count(label) > 1:
            raise ValueError(f"customer {label!r} is given twice")
    given = [a for _, a in pairs if a]
    for account in set(given):
        if given.count(account) > 1:
            raise ValueError(f"account {account} is given to two labels (one label per buyer)")
    made = (str(n) for n in range(FIRST_ACCOUNT, FIRST_ACCOUNT + 10 * len(pairs) + 10))
    out = []
    for i, (label, maybe) in enumerate(pairs):
        account = maybe if maybe is not None else next(a for a in made if a not in given)
        out.append(
            TrialCustomer(label, account, f"arn:aws:license-manager::{account}:license:l-trial{i}")
        )
    return out
