"""SaaS-mode test helpers: a config, customers and sealed per-customer records, and the emulator
on the agent's fake clock (its token bucket too, so pacing is checked on the same time)."""

from __future__ import annotations

import textwrap
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

from agent import config
from agent.aggregate import Allocation, Quantity
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from tests.conftest import PRODUCT
from tests.fakes import FakeClock

ACCOUNT = "111122223333"


class ServiceClock(FakeClock):
    """A fake clock whose monotonic time moves with it: the emulator's throttling sees the
    agent's paced calls on the same (fake) time."""

    def monotonic(self) -> float:
        return self.t


def saas_config(tmp_path: Path, endpoint: str, extra: str = "") -> config.Config:
    log = tmp_path / "usage.log"
    log.touch()
    text = f"""
        product_code: {PRODUCT}
        state_dir: {tmp_path / "state"}
        mode: saas
        saas: {{customer_label: customer}}
        metering: {{region: us-east-1, endpoint_url: {endpoint}, send_window: 0}}
        dimensions:
          - name: requests
            collector: {{type: log, path: {log}, pattern: 'customer=(?P<customer>\\S+)'}}
            aggregate: sum
          - name: storage_gb
            collector: {{type: log, path: {log}, pattern: 'customer=(?P<customer>\\S+) gb'}}
            aggregate: sum
            decimals: 3
          - name: users
            collector: {{type: log, path: {log}, pattern: 'customer=(?P<customer>\\S+) user'}}
            aggregate: sum
    """
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text) + textwrap.dedent(extra))
    return config.load(path)


def license_arn(label: str) -> str:
    return f"arn:aws:license-manager::294406891311:license:l-{label}"


def add_customers(ledger: Ledger, labels: Sequence[str], legacy: bool = False) -> list[Customer]:
    out = []
    for label in labels:
        if legacy:
            c = Customer(label, None, None, None, f"cid-{label}", PRODUCT, 0.0)
        else:
            account = str(100000000000 + zlib.crc32(label.encode()))
            c = Customer(label, account, license_arn(label), f"agmt-{label}", None, PRODUCT, 0.0)
        ledger.add_customer(c)
        out.append(c)
    return out


def subscribed(customers: Sequence[Customer]) -> list[dict[str, str]]:
    """The emulator's `customers` setting for these customers."""
    return [
        {"legacy_identifier": c.customer_identifier or ""}
        if c.legacy
        else {"account": c.account_id or "", "license": c.license_arn or ""}
        for c in customers
    ]


def seal(
    ledger: Ledger,
    customer: str,
    dimension: str,
    hour: int,
    quantity: int | str,
    *,
    timestamp: int | None = None,
    allocations: Sequence[Allocation] = (),
    next_attempt: float | None = None,
) -> None:
    """A sealed SaaS record, as E's sealing will write it (Timestamp: the hour's last sample)."""
    with ledger.transaction() as db:
        ledger.insert_sealed(
            db, dimension=dimension, hour=hour, product_code=PRODUCT, quantity=Quantity(quantity),
            timestamp=hour + 3599 if timestamp is None else timestamp,
            client_token=str(uuid.uuid4()), samples=60, raw=str(quantity), sealed_at=hour + 3600,
            next_attempt=hour + 3600 if next_attempt is None else next_attempt,
            allocations=allocations, customer=customer, keep_samples=True,
        )  # fmt: skip
