"""moto's BatchMeterUsage (moto server, an implementation nobody here wrote) as a second check of
the request shape the batch sender builds.

moto 5 models legacy integrations only: it reads the request's ProductCode and each record's
CustomerIdentifier and Quantity (a LicenseArn record, which must go without ProductCode, or a
QuantityAsDecimal one fails inside moto), and it never stores records, so DuplicateRecord never
comes back. Those rules are checked against the emulator (test_batching.py)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ledger import Ledger
from agent.modes.saas import BatchSender
from agent.sending.client import MeteringClient
from tests.conftest import PRODUCT
from tests.saas import ServiceClock, add_customers, saas_config, seal

H = 1_800_000_000


@pytest.fixture
def moto_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDMOTOTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "moto")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_moto_accepts_the_legacy_batches_and_answers_each_record(
    tmp_path: Path, moto_url: str
) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.meteringmarketplace.models import meteringmarketplace_backends

    cfg = saas_config(tmp_path, moto_url)
    ledger = Ledger(cfg.state_dir)
    customers = add_customers(ledger, [f"m{i:02d}" for i in range(30)], legacy=True)
    backend = meteringmarketplace_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    unsubscribed = customers[7]
    for c in customers:
        if c is not unsubscribed:
            backend.customers_by_product[PRODUCT].append(c.customer_identifier)
        seal(ledger, c.label, "requests", H, 12)
        seal(ledger, c.label, "users", H, 3)
    clock = ServiceClock(H + 3600 + 30)  # moto checks no window
    client = MeteringClient("us-east-1", moto_url, clock=clock)
    sender = BatchSender(ledger, cfg, client, clock, random.Random(1))
    sender.run()
    assert sender.calls == 3  # 60 records: 25, 25, 10, every one answered
    states = {(h.customer, h.dimension): (h.state, h.record_id) for h in ledger.hours()}
    assert len(states) == 60
    for (label, _), (state, record_id) in states.items():
        if label == unsubscribed.label:
            assert state == "rejected"
        else:
            assert state == "sent" and record_id
    rejected = [h.last_error for h in ledger.hours() if h.state == "rejected"]
    assert len(rejected) == 2 and all(e.startswith("CustomerNotSubscribed") for e in rejected)
    ledger.close()
