"""SaaS mode's customers: who a label value in the usage bills, kept in the ledger.

A customer is ResolveCustomer's answer for a buyer's registration token (or the ids a seller
already has, added by hand) under the label value that names the buyer in every dimension's usage
(`saas.customer_label`); by default the buyer's AWS account id. Adding one is all there is to do:
sealing bills that label's usage from then on, held usage included (within the service's window).

Why a label may not change hands while it may still bill: usage under it, held or arriving late,
would be billed to another account; once removed with every record final it may (a customer added
by mistake is fixed so; sealed records keep the ids they were sealed with). The same buyer may come
back (a new license or agreement): updated in place. One label per buyer: two labels' records for
one hour would share a key in a call, and one's usage would be lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent.clock import iso
from agent.errors import AgentError, NotAuthorized
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from agent.sending.outcomes import Resolved

ACCOUNT_ID = re.compile(r"\d{12}")
ARN = re.compile(r"arn:aws[a-z-]*:[a-z0-9-]+:[^\s]*")
LABEL = re.compile(r"[^\x00-\x1f\x7f]{1,256}")


class BadArgument(AgentError):
    """A command-line value that cannot be right (as argparse's own usage errors: exit 2)."""

    exit_code = 2


class LabelTaken(AgentError):
    """The label already names another buyer."""


class BuyerTaken(LabelTaken):
    """The buyer already has another label (`existing`): one label per buyer."""

    def __init__(self, message: str, existing: Customer) -> None:
        super().__init__(message)
        self.existing = existing


def check_label(label: str, option: str = "--as") -> str:
    if not LABEL.fullmatch(label) or label != label.strip():
        raise BadArgument(
            f"{option} {label!r}: expected the customer label's value as the usage carries it "
            "(1 to 256 printable characters, no leading or trailing spaces)"
        )
    return label


class OtherProduct(NotAuthorized):
    """The token is a subscription to another product than the one this config meters."""


def from_resolved(
    resolved: Resolved, label: str | None, now: float, product_code: str | None = None
) -> Customer:
    """ResolveCustomer's answer under `label` (default: the account id, else the legacy
    CustomerIdentifier). With `product_code`, a token for another product is refused: its buyer
    is not subscribed to this one, and every record for them would be refused."""
    if product_code and resolved.product_code and resolved.product_code != product_code:
        raise OtherProduct(
            f"ResolveCustomer: the token is a subscription to product {resolved.product_code}, "
            f"but this config meters product_code {product_code}; point that product's "
            "fulfillment URL at its own agent"
        )
    chosen = label or resolved.account_id or resolved.customer_identifier
    if not chosen:
        raise AgentError("ResolveCustomer answered neither CustomerAWSAccountId nor "
                         "CustomerIdentifier; pass --as LABEL")  # fmt: skip
    if resolved.license_arn is None and resolved.customer_identifier is None:
        raise AgentError(
            "ResolveCustomer answered no LicenseArn and no CustomerIdentifier: no record could "
            "name this customer"
        )
    return Customer(
        label=check_label(chosen),
        account_id=resolved.account_id,
        license_arn=resolved.license_arn if resolved.customer_identifier is None else None,
        agreement_id=resolved.agreement_id,
        customer_identifier=resolved.customer_identifier,
        product_code=resolved.product_code,
        added_at=now,
    )


def by_hand(
    label: str,
    now: float,
    account: str | None = None,
    license_arn: str | None = None,
    agreement: str | None = None,
    identifier: str | None = None,
) -> Customer:
    """A customer the seller already knows (from an earlier integration, or its own records)."""
    check_label(label)
    if identifier is not None:
        if account is not None or license_arn is not None:
            raise BadArgument(
                "--customer-identifier names a legacy customer: without --account and --license"
            )
        if not 1 <= len(identifier) <= 255 or identifier != identifier.strip():
            raise BadArgument(f"--customer-identifier {identifier!r}: expected 1 to 255 characters")
    else:
        if account is None or license_arn is None:
            raise BadArgument(
                "customers add needs --token TOKEN, or --account ID --license ARN --as LABEL, "
                "or --customer-identifier ID --as LABEL (legacy)"
            )
        if not ACCOUNT_ID.fullmatch(account):
            raise BadArgument(f"--account {account!r}: expected a 12-digit AWS account id")
        if not ARN.fullmatch(license_arn):
            raise BadArgument(
                f"--license {license_arn!r}: expected the license's ARN "
                "(arn:aws:license-manager::...:license:l-...)"
            )
    return Customer(label, account, license_arn, agreement, identifier, None, now)


@dataclass(frozen=True)
class Stored:
    outcome: str  # added | updated | unchanged
    customer: Customer

    def line(self) -> str:
        c = self.customer
        return f"customer {c.label} {self.outcome}: {describe(c)}"


def store(ledger: Ledger, customer: Customer) -> Stored:
    """Keep the customer under its label (one transaction); LabelTaken if another buyer has it,
    BuyerTaken if another label has this buyer."""
    outcome, old = ledger.register_customer(customer)
    if outcome == "duplicate":
        assert old is not None
        raise BuyerTaken(
            f"this buyer ({describe(customer)}) already has label {old.label!r}: one label per "
            f"buyer, or two records for one hour would share a key; keep {old.label!r} as the "
            "label value of its usage (metering-agent customers list)",
            old,
        )
    if outcome == "conflict":
        assert old is not None
        raise LabelTaken(
            f"label {customer.label!r} already names another customer ({describe(old)}); "
            "choose another --as, or, if it was added by mistake, "
            f"`metering-agent customers remove {customer.label}` and add it again once its "
            "pending records are sent (`metering-agent status`)"
        )
    return Stored(outcome, ledger.customer(customer.label) or customer)


def describe(c: Customer) -> str:
    if c.legacy:
        who = f"legacy CustomerIdentifier {c.customer_identifier}"
        return who + (f", account {c.account_id}" if c.account_id else "")
    text = f"account {c.account_id}, license {c.license_arn}"
    return text + (f", agreement {c.agreement_id}" if c.agreement_id else "")


def as_json(c: Customer) -> dict[str, Any]:
    return {
        "label": c.label,
        "customer_aws_account_id": c.account_id,
        "license_arn": c.license_arn,
        "agreement_id": c.agreement_id,
        "customer_identifier": c.customer_identifier,
        "product_code": c.product_code,
        "legacy": c.legacy,
        "added_at": iso(c.added_at),
        "removed_at": iso(c.removed_at),
    }
