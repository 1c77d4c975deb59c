"""Subscription notifications through a real SQS implementation (moto's server mode), delivered by
moto's SNS from a topic named as AWS Marketplace names it, to the real daemon and its
`watch-subscriptions` child; BatchMeterUsage is the project's emulator.

- An unsubscribe-pending customer's usage so far is sealed and accepted by BatchMeterUsage within
  seconds, long before the hour AWS allows is over (send_window 3600 would otherwise send it
  after the hour); its usage after the unsubscribe is held, not sent; the other customer's hour is
  billed whole.
- A kill -9 of the daemon (its child with it) while a received notification waits to be applied
  loses nothing: the message comes back after the queue's visibility timeout and the restarted
  agent applies it (oracle: the queue's counts and the ledger).
- Raw message delivery is applied; another product's message is deleted; a malformed one is left
  in the queue and reaches the dead-letter queue through its redrive policy.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.clock import hour_start
from agent.emulator import Emulator, Settings
from agent.ledger import Ledger
from agent.ledger.customers import Customer
from tests.conftest import PRODUCT, ROOT
from tests.e2e import Agent, stored_total, wait_for
from tests.saas import subscribed

pytestmark = pytest.mark.e2e

ACME, GLOBEX = "111111111111", "222222222222"
TOPIC = f"aws-mp-subscription-notification-{PRODUCT}"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIDSQSTEST", "AWS_SECRET_ACCESS_KEY": "s"}


@pytest.fixture
def moto(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto's state lives in this process, shared by every server: start from none
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"))
    yield url
    server.stop()


def aws(service: str, url: str) -> Any:
    import boto3

    return boto3.client(service, region_name="us-east-1", endpoint_url=url)


def queue(url: str, name: str, raw: bool = False, **attributes: str) -> tuple[str, str]:
    """A queue subscribed to the Marketplace-named topic: (queue URL, topic ARN)."""
    sqs, sns = aws("sqs", url), aws("sns", url)
    q = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "2", **attributes})
    arn = sqs.get_queue_attributes(QueueUrl=q["QueueUrl"], AttributeNames=["QueueArn"])
    topic = sns.create_topic(Name=TOPIC)["TopicArn"]
    sns.subscribe(
        TopicArn=topic, Protocol="sqs", Endpoint=arn["Attributes"]["QueueArn"],
        Attributes={"RawMessageDelivery": "true" if raw else "false"},
    )  # fmt: skip
    return q["QueueUrl"], topic


def publish(url: str, topic: str, action: str, account: str, **extra: Any) -> None:
    """What AWS Marketplace publishes (its documented fields), through SNS."""
    body = {
        "action": action,
        "customer-identifier": f"cid-{account}",
        "customer-aws-account-id": account,
        "product-code": PRODUCT,
        "offer-identifier": "offer-e2e",
        "isFreeTrialTermPresent": "false",
        **extra,
    }
    aws("sns", url).publish(TopicArn=topic, Message=json.dumps(body))


def counts(url: str, q: str) -> tuple[int, int]:
    """(visible, in flight: received and not yet deleted or back)."""
    a = aws("sqs", url).get_queue_attributes(
        QueueUrl=q,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])


def customer(label: str, account: str) -> Customer:
    arn = f"arn:aws:license-manager::{account}:license:l-{label}"
    return Customer(label, account, arn, f"agmt-{label}", None, PRODUCT, 0.0)


def write_config(tmp_path: Path, q: str, endpoint: str) -> Path:
    log = tmp_path / "access.log"
    log.touch()
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            mode: saas
            saas: {{customer_label: customer, idle_zero: true, notifications: {{queue_url: "{q}"}}}}
            metering: {{endpoint_url: "{endpoint}", send_window: 3600, startup_check: false,
                       region: us-east-1}}
            sampling: {{interval: 1}}
            dimensions:
              - name: api
                collector: {{type: log, path: {log}, pattern: 'customer=(?P<customer>[a-z]+)',
                            start_at: beginning}}
            """
        )
    )
    return path


def lines(tmp_path: Path, **by: int) -> None:
    with open(tmp_path / "access.log", "a") as f:
        for who, n in by.items():
            f.writelines(f'"GET /api customer={who}"\n' for _ in range(n))


def subscription(state: Path, label: str) -> str | None:
    if not (state / "ledger.db").exists():
        return None
    ledger = Ledger(state, readonly=True)
    try:
        s = ledger.subscription_states().get(label)
    finally:
        ledger.close()
    return None if s is None else s.state


def test_unsubscribe_pending_is_billed_at_once_and_a_kill_between_receive_and_apply_loses_nothing(
    tmp_path: Path, moto: str
) -> None:
    now = time.time()
    if hour_start(now + 75) != hour_start(now):  # the test's minute within one clock hour
        wait_for("the next hour", lambda: hour_start(time.time()) != hour_start(now), 80)
    q, topic = queue(moto, "marketplace")
    acme, globex = customer("acme", ACME), customer("globex", GLOBEX)
    emulator = Emulator(Settings(product_codes={PRODUCT}, customers=subscribed([acme, globex])))
    url = emulator.serve(0)
    state = tmp_path / "state"
    ledger = Ledger(state)
    ledger.add_customer(acme)
    ledger.add_customer(globex)
    ledger.close()
    config = write_config(tmp_path, q, url)
    env = {**CREDENTIALS, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url}
    agent = Agent(config, env).start()
    try:
        hour = hour_start(time.time())
        lines(tmp_path, acme=5, globex=3)
        wait_for("the lines read", lambda: stored_total(state, "api") == 8, 20, agent)
        sent = time.time()
        publish(moto, topic, "unsubscribe-pending", ACME)

        def acme_records() -> list[Any]:
            return [r for r in emulator.records() if r.customer == f"{ACME}|{acme.license_arn}"]

        [record] = wait_for("acme's usage accepted", acme_records, 30, agent)
        took = time.time() - sent
        assert (record.hour, str(record.quantity), record.dimension) == (hour, "5", "api")
        assert time.time() < hour + 3600  # within the hour AWS allows, and the clock hour too
        assert [r.customer for r in emulator.records()] == [record.customer]  # globex: its slot
        wait_for("the message deleted", lambda: counts(moto, q) == (0, 0), 10, agent)
        assert subscription(state, "acme") == "unsubscribe-pending"
        print(f"unsubscribe-pending to BatchMeterUsage accepted: {took:.2f} s")

        # kill -9 while a received notification waits for the ledger (held by this test)
        lines(tmp_path, acme=2, globex=1)
        wait_for("the later lines read", lambda: stored_total(state, "api") == 6, 20, agent)
        lock = sqlite3.connect(state / "ledger.db", timeout=30, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        publish(moto, topic, "unsubscribe-success", ACME)
        wait_for("the notification received", lambda: counts(moto, q) == (0, 1), 30, agent)
        agent.kill9()
        lock.execute("ROLLBACK")
        lock.close()
        assert subscription(state, "acme") == "unsubscribe-pending"  # not applied
        wait_for("the notification back in the queue", lambda: counts(moto, q) == (1, 0), 10)
        agent = Agent(config, env).start()
        wait_for("it applied", lambda: subscription(state, "acme") == "unsubscribed", 30, agent)
        wait_for("and deleted", lambda: counts(moto, q) == (0, 0), 10, agent)
        assert agent.terminate() == 0  # the stop seals the partial hour and sends it
        billed = {(r.customer.split("|")[0], str(r.quantity)) for r in emulator.records()}
        assert billed == {(ACME, "5"), (GLOBEX, "4")}  # acme's 2 later lines: held, not sent
        ledger = Ledger(state, readonly=True)
        [held] = ledger.held_usage()
        assert (held.customer, sum(p.value for p in held.points)) == ("acme", 2)
        ledger.close()
        report = json.loads(run_cli("status", "--json", "-c", str(config)))
        attention = report["subscriptions"]["attention"]
        assert [(s["customer"], s["state"]) for s in attention] == [("acme", "unsubscribed")]
        assert "unsubscribed" in run_cli("customers", "list", "-c", str(config))
    finally:
        if agent.alive():
            agent.kill9()
        emulator.stop()


def run_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_raw_delivery_other_products_and_a_malformed_message_left_for_the_dead_letter_queue(
    tmp_path: Path, moto: str
) -> None:
    sqs = aws("sqs", moto)
    dlq = sqs.create_queue(QueueName="marketplace-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])
    redrive = {"deadLetterTargetArn": dlq_arn["Attributes"]["QueueArn"], "maxReceiveCount": "2"}
    q, topic = queue(moto, "marketplace", raw=True, RedrivePolicy=json.dumps(redrive))
    config = write_config(tmp_path, q, "http://127.0.0.1:9")
    state = tmp_path / "state"
    ledger = Ledger(state)
    ledger.add_customer(customer("globex", GLOBEX))
    ledger.close()
    publish(moto, topic, "subscribe-success", GLOBEX, **{"product-code": "otherproduct00000000001"})
    sqs.send_message(QueueUrl=q, MessageBody='{"action": "subscribe-success"')  # cut short
    publish(moto, topic, "subscribe-success", GLOBEX)
    command = [sys.executable, "-m", "agent", "watch-subscriptions", "-c", str(config)]
    log = open(tmp_path / "child.log", "w")  # noqa: SIM115 - closed below
    child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_for("globex subscribed", lambda: subscription(state, "globex") == "subscribed", 30)
        wait_for(
            "the malformed message moved to the dead-letter queue",
            lambda: counts(moto, dlq) == (1, 0) and counts(moto, q) == (0, 0),
            30,
        )
        [dead] = sqs.receive_message(QueueUrl=dlq)["Messages"]
        assert dead["Body"] == '{"action": "subscribe-success"'
    finally:
        child.terminate()
        code = child.wait(timeout=10)
        log.close()
    assert code == 0, (tmp_path / "child.log").read_text()
