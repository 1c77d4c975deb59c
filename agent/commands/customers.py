"""SaaS mode's customers: `customers add|list|remove`, `resolve-customer` (prints the answer,
stores nothing), `serve-registration` (the fulfillment handler, as `run` starts it) and
`watch-subscriptions` (the subscription queue child, as `run` starts it)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.billing.saas_sealing import NOT_NOTIFIED, subscription_json
from agent.clock import Clock, iso
from agent.commands.common import load_config, make_clock, open_ledger_readonly, table
from agent.errors import EX_OK, AgentError
from agent.host import ownership
from agent.ledger.customers import Customer
from agent.ledger.subscriptions import Subscription
from agent.modes.choose import mode_for


def _token_argument(token: str) -> str:
    """A token from the command line, or from stdin with `-` (out of `ps` and shell history)."""
    from agent.fulfillment.customers import BadArgument

    if token == "-":
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        raise BadArgument("the registration token is empty")
    return token


def _resolver(cfg: Any) -> Any:
    from agent.host.imds import resolve_region
    from agent.sending import client as metering

    region, _ = resolve_region(cfg.metering.region)
    return metering.MeteringClient(region, cfg.metering.endpoint_url)


def cmd_customers_add(args: argparse.Namespace) -> int:
    from agent.fulfillment import customers
    from agent.ledger import Ledger

    cfg = load_config(args)
    mode_for(cfg).customers("customers add", cfg.source)  # SaaS mode only
    now = Clock().time()
    if args.token is not None:
        if args.account or args.license_arn or args.customer_identifier or args.agreement:
            raise customers.BadArgument(
                "--token takes the customer from ResolveCustomer: without --account, --license, "
                "--agreement or --customer-identifier"
            )
        if args.label is not None:
            customers.check_label(args.label)
        token = _token_argument(args.token)
        ownership.check_writer(Path(cfg.state_dir), "customers add")  # before the token is used
        resolved = _resolver(cfg).resolve_customer(token)
        customer = customers.from_resolved(resolved, args.label, now, cfg.product_code)
    else:
        if args.label is None:
            raise customers.BadArgument(
                "--as LABEL is required with --account/--license or --customer-identifier"
            )
        customer = customers.by_hand(args.label, now, args.account, args.license_arn,
                                     args.agreement, args.customer_identifier)  # fmt: skip
    ownership.check_writer(Path(cfg.state_dir), "customers add")
    ledger = Ledger(cfg.state_dir)
    try:
        stored = customers.store(ledger, customer)
    finally:
        ledger.close()
    print(stored.line())
    return EX_OK


def cmd_customers_list(args: argparse.Namespace) -> int:
    from agent.fulfillment import customers

    cfg = load_config(args)
    mode_for(cfg).customers("customers list", cfg.source)  # SaaS mode only
    ledger = open_ledger_readonly(cfg.state_dir, "customers list")
    found = [] if ledger is None else ledger.customers(include_removed=True)
    states = {} if ledger is None else ledger.subscription_states()
    if ledger is not None:
        ledger.close()
    if args.json:
        print(json.dumps([dict(customers.as_json(c), subscription=subscription_json(
            c.label, states.get(c.label))) for c in found], indent=2))  # fmt: skip
    else:
        print(customers_table(found, states))
    return EX_OK


def cmd_customers_remove(args: argparse.Namespace) -> int:
    from agent.ledger import Ledger

    cfg = load_config(args)
    mode_for(cfg).customers("customers remove", cfg.source)  # SaaS mode only
    ownership.check_writer(Path(cfg.state_dir), "customers remove")
    ledger = Ledger(cfg.state_dir)
    try:
        known = ledger.customer(args.label)
        if known is None:
            raise AgentError(
                f"no customer labelled {args.label!r} (metering-agent customers list shows them)"
            )
        if not ledger.remove_customer(args.label, Clock().time()):
            print(f"customer {args.label} was already removed")
            return EX_OK
    finally:
        ledger.close()
    print(f"customer {args.label} removed: no more idle zeros; its usage is still billed")
    return EX_OK


def cmd_resolve_customer(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    resolved = _resolver(cfg).resolve_customer(_token_argument(args.token))
    print(json.dumps(resolved.as_json(), indent=2))
    return EX_OK


def cmd_serve_registration(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from agent.fulfillment import server as fulfillment

    cfg = load_config(args)
    saas = mode_for(cfg).customers("serve-registration", cfg.source)  # SaaS mode only
    if saas.registration is None:
        raise ConfigError("saas.registration", "not set: add listen and redirect to serve it")
    return fulfillment.serve(cfg, saas.registration, make_clock(args))


def cmd_watch_subscriptions(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError
    from agent.sending import subscriptions

    cfg = load_config(args)
    saas = mode_for(cfg).customers("watch-subscriptions", cfg.source)  # SaaS mode only
    if saas.notifications is None:
        raise ConfigError("saas.notifications", "not set: add queue_url to apply notifications")
    ownership.check_writer(Path(cfg.state_dir), "watch-subscriptions")
    return subscriptions.child_main(cfg, make_clock(args))


def customers_table(
    customers: list[Customer], states: Mapping[str, Subscription] | None = None
) -> str:
    """`customers list`: a line per customer, removed ones marked (their usage is still billed),
    with its subscription as AWS Marketplace's notifications last said it."""
    if not customers:
        return "no customers yet (metering-agent customers add --token TOKEN)"
    states = states or {}
    header = ["label", "account", "license / customer identifier", "agreement", "added", "state",
              "subscription"]  # fmt: skip
    rows = [
        [
            c.label,
            c.account_id or "-",
            (c.customer_identifier or "-") if c.legacy else (c.license_arn or "-"),
            c.agreement_id or "-",
            iso(c.added_at) or "-",
            f"removed {iso(c.removed_at)}" if c.removed_at is not None else "active",
            _subscription_cell(states.get(c.label)),
        ]
        for c in customers
    ]
    return "\n".join(table([header, *rows]))


def _subscription_cell(s: Subscription | None) -> str:
    if s is None:
        return NOT_NOTIFIED
    return f"{s.state} {iso(s.event_at)}"
