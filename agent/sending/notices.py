"""Pure: an SQS message from the seller's queue -> what AWS Marketplace said (a `Notice`), or why
it is not applied.

The queue is subscribed to the product's Marketplace SNS topic, so a message is an SNS envelope
(`Type: Notification`, its `Message` a JSON string) around a JSON object with `action`,
`customer-identifier`, `customer-aws-account-id` (newer integrations), `product-code`,
`offer-identifier` and `isFreeTrialTermPresent`; with the subscription's raw message delivery
the object is the body itself. Three outcomes:

- `Notice`: applied to the ledger, then the message is deleted.
- `Ignored`: nothing to apply, deleted (logged): another product's notification (a queue shared
  by several products' topics), `entitlement-updated` (contracts: the agent bills usage and keeps
  no entitlement), SNS's subscription confirmations.
- `Malformed`: not applied and NOT deleted (logged at error level): the queue's redrive policy
  moves it to the seller's dead-letter queue after maxReceiveCount receives, where it can be read;
  a message the agent does not understand (a new action, a changed format) is never destroyed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.ledger.subscriptions import FAILED, PENDING, SUBSCRIBED, UNSUBSCRIBED

ACTIONS = {
    "subscribe-success": SUBSCRIBED,
    "subscribe-fail": FAILED,
    "unsubscribe-pending": PENDING,
    "unsubscribe-success": UNSUBSCRIBED,
}
NOT_APPLIED = {
    "entitlement-updated": "entitlement-updated (contracts): the agent keeps no entitlements; "
    "GetEntitlements says what changed",
}


@dataclass(frozen=True)
class Notice:
    action: str  # as AWS names it: subscribe-success, ...
    state: str  # the subscription state it leads to (ledger/subscriptions.py)
    account_id: str | None
    customer_identifier: str | None
    product_code: str
    offer: str | None
    free_trial: bool | None
    event_at: float  # the SNS Timestamp, else the SQS SentTimestamp, else when it was received
    message_id: str | None

    @property
    def buyer(self) -> str:
        return self.account_id or self.customer_identifier or ""


@dataclass(frozen=True)
class Ignored:
    reason: str


@dataclass(frozen=True)
class Malformed:
    reason: str


Parsed = Notice | Ignored | Malformed


def parse(message: Mapping[str, Any], product_code: str, received_at: float) -> Parsed:
    """One SQS message (as ReceiveMessage returns it: Body, MessageId, Attributes)."""
    body = message.get("Body")
    try:
        outer = json.loads(body) if isinstance(body, str) else None
    except ValueError:
        outer = None
    if not isinstance(outer, dict):
        return Malformed("the body is not a JSON object")
    event_at = _sent_at(message.get("Attributes") or {}, received_at)
    message_id = message.get("MessageId")
    if "Type" in outer:  # an SNS envelope
        kind = outer.get("Type")
        if kind in ("SubscriptionConfirmation", "UnsubscribeConfirmation"):
            return Ignored(f"SNS {kind} for {outer.get('TopicArn')}: nothing to apply")
        if kind != "Notification":
            return Malformed(f"an SNS envelope of Type {kind!r}, not Notification")
        inner = outer.get("Message")
        try:
            payload = json.loads(inner) if isinstance(inner, str) else None
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return Malformed("the SNS envelope's Message is not a JSON object")
        stamp = _iso(outer.get("Timestamp"))
        if stamp is None:
            when = outer.get("Timestamp")
            return Malformed(f"the SNS envelope's Timestamp {when!r} is not a time")
        event_at = stamp
        message_id = outer.get("MessageId") or message_id
    else:
        payload = outer
    return _notice(payload, product_code, event_at, message_id)


def _notice(
    payload: Mapping[str, Any], product_code: str, event_at: float, message_id: Any
) -> Parsed:
    action = payload.get("action")
    code = payload.get("product-code")
    if not isinstance(code, str) or not code:
        return Malformed("no product-code")
    if code != product_code:
        return Ignored(f"a notification for product {code}, not {product_code}")
    if action in NOT_APPLIED:
        return Ignored(NOT_APPLIED[action])
    if action not in ACTIONS:
        return Malformed(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    account = _text(payload.get("customer-aws-account-id"))
    identifier = _text(payload.get("customer-identifier"))
    if account is not None and not (len(account) == 12 and account.isdigit()):
        return Malformed(f"customer-aws-account-id {account!r} is not 12 digits")
    if account is None and identifier is None:
        return Malformed("neither customer-aws-account-id nor customer-identifier")
    trial = payload.get("isFreeTrialTermPresent")
    free_trial = trial if isinstance(trial, bool) else {"true": True, "false": False}.get(
        str(trial).lower()) if trial is not None else None  # fmt: skip
    return Notice(
        action=str(action), state=ACTIONS[str(action)], account_id=account,
        customer_identifier=identifier, product_code=code,
        offer=_text(payload.get("offer-identifier")), free_trial=free_trial, event_at=event_at,
        message_id=message_id if isinstance(message_id, str) else None,
    )  # fmt: skip


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _sent_at(attributes: Mapping[str, Any], received_at: float) -> float:
    """SQS's SentTimestamp (epoch milliseconds), else when it was received."""
    try:
        return int(attributes["SentTimestamp"]) / 1000.0
    except (KeyError, TypeError, ValueError):
        return received_at


def _iso(value: Any) -> float | None:
    """An SNS Timestamp (`2026-12-06T11:00:00.123Z`) as epoch seconds."""
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t.timestamp() if t.tzinfo is not None else None
