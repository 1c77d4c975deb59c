"""`metering-agent trial` on a SaaS config: customers registered through the emulator's
ResolveCustomer under their labels (`customers add --token - --as LABEL`), the real daemon on a
fast clock, a table per customer. The oracle is what the emulator's BatchMeterUsage accepted; the
trial's own ledger then answers `report --customer LABEL` with the same records."""

from __future__ import annotations

import io
import json
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.clock import iso_hour
from agent.commands import trial
from agent.emulator import Emulator
from tests.conftest import PRODUCT, run_cli

CONFIG = """\
    product_code: {product}
    state_dir: {state}
    mode: saas
    sampling: {{interval: 120}}  # so 600x is within the trial's speed limit
    saas:
      customer_label: customer
      registration: {{listen: '127.0.0.1:9', redirect: 'https://example.com/'}}
    dimensions:
      - name: api
        collector: {{type: log, path: {log}, pattern: 'c=(?P<customer>\\w+) '}}
      - name: api_k
        collector: {{type: log, path: {log}, pattern: 'c=(?P<customer>\\w+) '}}
        scale: 0.1
        rounding: up
"""


def write_usage(log: Path, stop: threading.Event) -> None:
    """acme twice as busy as the buyer labelled by its account id; a label no customer has."""
    with open(log, "a") as f:
        while not stop.wait(0.05):
            f.write("GET c=acme /x\nGET c=acme /x\nGET c=210987654321 /x\nGET c=stranger /x\n")
            f.flush()


@pytest.mark.e2e
def test_a_saas_trial_bills_each_customer_under_its_label(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept: list[Emulator] = []

    class KeptEmulator(Emulator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            kept.append(self)

    monkeypatch.setattr(trial, "Emulator", KeptEmulator)
    scratch = tmp_path / "scratch"  # the trial's temporary dir, kept for report and status
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    log = tmp_path / "app.log"
    log.touch()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        textwrap.dedent(CONFIG.format(product=PRODUCT, state=tmp_path / "state", log=log))
    )
    listed = tmp_path / "customers.txt"
    listed.write_text("# label[=account]\nacme\nglobex=111122223333  # idle\n210987654321\n")
    stop = threading.Event()
    writer = threading.Thread(target=write_usage, args=(log, stop))
    writer.start()
    out = io.StringIO()
    try:
        outcome = trial.run(
            cfg, hours=1, speed=600, out=out, customers=trial.customer_list(str(listed))
        )
    finally:
        stop.set()
        writer.join()
    (emulator,) = kept
    records = emulator.records()
    assert outcome.exit_code == 0, out.getvalue()
    assert outcome.refusals == []
    labels = {c.label: f"{c.account}|{c.license}" for c in outcome.view.registrations()}
    assert set(labels) == {"acme", "globex", "210987654321"}
    by_label = {v: k for k, v in labels.items()}
    got = {(iso_hour(r.hour), by_label[r.customer or ""], r.dimension): r.quantity_text
           for r in records}  # fmt: skip
    whole = iso_hour(outcome.first_hour)
    # every customer in the whole hour: acme's usage twice the account-labelled buyer's, globex
    # an idle zero; the stranger's usage held (no record: no customer has that label)
    assert {k[1:] for k in got if k[0] == whole} == {
        (c, d) for c in labels for d in ("api", "api_k")
    }
    assert got[(whole, "globex", "api")] == "0"
    acme, other = int(got[(whole, "acme", "api")]), int(got[(whole, "210987654321", "api")])
    assert other > 0 and abs(acme - 2 * other) <= 2  # a read may fall inside one write

    # the table is what BatchMeterUsage accepted, a row per customer
    text = trial.render(outcome)
    lines = text.splitlines()
    assert lines[0] == "BatchMeterUsage received:"
    rows = {tuple(line.split()[:4]) for line in lines[2:] if line.startswith("  20")}
    assert rows == {(h, c, d, q) for (h, c, d), q in got.items()}
    (held,) = text.split("held, not sent:\n")[1].splitlines()
    assert held.startswith("  label 'stranger' (no customer has it): api, api_k in ")

    # the trial's ledger: the labels work in report --customer and customers list
    assert outcome.work.parent == scratch
    config = outcome.work / "config.yaml"
    for label in ("acme", "210987654321"):
        report = run_cli("report", "--since", "2000-01-01", "--customer", label, "-c",
                         str(config), "--format", "json")  # fmt: skip
        assert report.returncode == 0, report.stderr
        mine = {(r["hour"], r["dimension"]): (r["quantity"], r["state"])
                for r in json.loads(report.stdout)}  # fmt: skip
        assert mine == {(h, d): (q, "sent") for (h, c, d), q in got.items() if c == label}
    listing = run_cli("customers", "list", "--json", "-c", str(config))
    assert {c["label"] for c in json.loads(listing.stdout)} == set(labels)
    status = run_cli("status", "--json", "--hours", "48", "-c", str(config))
    held = {h["label"] for h in json.loads(status.stdout)["held"]}
    assert held == {"stranger"}


def test_customers_refused_in_one_line(tmp_path: Path) -> None:
    """A malformed --customers entry (78), and customers for an instance-mode config (78)."""
    log = tmp_path / "app.log"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        textwrap.dedent(CONFIG.format(product=PRODUCT, state=tmp_path / "state", log=log))
    )
    bad = run_cli("trial", "-c", str(cfg), "--customers", "acme=12345")
    assert bad.returncode == 78 and "12 digits" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    twice = run_cli("trial", "-c", str(cfg), "--customers", "acme,acme")
    assert twice.returncode == 78 and "twice" in twice.stderr
    instance = tmp_path / "instance.yaml"
    instance.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'i'}\ndimensions:\n"
        "  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n"
    )
    refused = run_cli("trial", "-c", str(instance), "--customers", "acme")
    assert refused.returncode == 78 and "SaaS mode" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "i").exists()
