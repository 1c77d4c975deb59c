"""The real `metering-agent send` child in SaaS mode, killed with SIGKILL mid-batch: the next send
resends the identical batch and the service bills nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from agent.clock import Clock, hour_start
from agent.daemon.sender import send_command
from agent.emulator import Emulator, Settings
from agent.ledger import Ledger
from tests.conftest import PRODUCT, ROOT
from tests.e2e import ledger_hours, wait_for
from tests.saas import add_customers, saas_config, seal

pytestmark = pytest.mark.e2e


def batches(emulator: Emulator) -> list[dict]:
    return [
        c
        for c in emulator.received()
        if c["operation"] == "BatchMeterUsage" and c["request"]["UsageRecords"]
    ]


@pytest.mark.parametrize("faults", [["slow"], ["lose", "slow"]])
def test_a_send_child_killed_mid_batch_is_resent_identically_and_billed_once(
    tmp_path: Path, faults: list[str]
) -> None:
    emulator = Emulator(Settings(product_codes={PRODUCT}))
    url = emulator.serve(0)
    try:
        cfg = saas_config(tmp_path, url)
        ledger = Ledger(cfg.state_dir)
        hour = hour_start(time.time()) - 3600  # the last full hour: inside the window
        for c in add_customers(ledger, [f"k{i:02d}" for i in range(60)]):
            seal(ledger, c.label, "requests", hour, 11)
        ledger.close()
        # slow: the service records the call after 3 s, long after the child is gone; lose: it
        # records it and closes the connection (the child backs off and resends, slowly)
        for fault in faults:
            emulator.inject(fault, delay=3.0, operation="BatchMeterUsage")
        env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDKILLTEST", AWS_SECRET_ACCESS_KEY="k")
        command = send_command(cfg.source, Clock(), "text", False, None)
        log = open(tmp_path / "send.log", "w")  # noqa: SIM115 - both children write here
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log)
        n = len(faults)
        wait_for("the batch in flight", lambda: len(batches(emulator)) == n, 30)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
        killed = ledger_hours(cfg.state_dir)
        assert {h.state for h in killed} == {"pending"}  # no answer was recorded
        assert sorted(h.attempts for h in killed) == [0] * 35 + [n] * 25  # counted before it left

        again = subprocess.run(command, env=env, cwd=ROOT, stdout=log, stderr=log, timeout=60)
        log.close()
        assert again.returncode == 0, (tmp_path / "send.log").read_text()[-3000:]
        wait_for("the slow call to finish", lambda: len(emulator.calls()) >= n + 3, 10)
        first, *resent = batches(emulator)[: n + 1]
        for call in resent:  # the identical records, in the same order
            assert (call["request"], call["size"]) == (first["request"], first["size"])
        rest = batches(emulator)[n + 1 :]
        assert [len(b["request"]["UsageRecords"]) for b in rest] == [25, 10]
        records = emulator.records()
        assert len(records) == 60  # billed once each
        ids = {r.customer.split("|")[1]: r.record_id for r in records if r.customer}
        hours = ledger_hours(cfg.state_dir)
        assert {h.state for h in hours} == {"sent"}
        customers = {c.label: c.license_arn for c in Ledger(cfg.state_dir).customers()}
        assert all(h.record_id == ids[customers[h.customer]] for h in hours)
    finally:
        emulator.stop()
