"""SaaS mode's `status`, `report --customer`, `sample` and `trial`, through the real command."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from agent.ledger import Ledger
from agent.modes.saas import seal_hours
from tests.billing import H
from tests.conftest import run_cli
from tests.test_saas_sealing import add, key, record, saas_config

D = Decimal


def dims(log: Path) -> str:
    return f"""\
  - name: api
    collector: {{type: log, path: {log}, pattern: 'GET (?:c=(?P<customer>\\w+) )?/api',
                 start_at: beginning}}
"""


def sealed_state(tmp_path: Path) -> Path:
    """A ledger with one sealed hour: acme 3, globex 0 (idle), stranger held."""
    cfg = saas_config(tmp_path, dims(tmp_path / "app.log"))
    ledger = Ledger(cfg.state_dir)
    add(ledger, "acme")
    add(ledger, "globex")
    record(ledger, H + 60, {key("acme", None): D(3), key("stranger", None): D(2)})
    seal_hours(ledger, cfg, H + 3700, offset=0)
    ledger.close()
    return cfg.source


def test_status_shows_each_customer_and_held_usage(tmp_path: Path) -> None:
    config = sealed_state(tmp_path)
    result = run_cli("status", "--json", "--hours", "100000", "-c", str(config))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["customers"] == {"known": 2, "removed": 0}
    got = {(r["customer"], r["dimension"]): r["quantity"] for r in data["hours"]}
    assert got == {("acme", "api"): "3", ("globex", "api"): "0"}
    (held,) = data["held"]
    assert (held["customer"], held["label"], held["quantity"]) == (
        "unknown customer",
        "stranger",
        "2",
    )
    text = run_cli("status", "--hours", "100000", "-c", str(config))
    assert text.returncode == 0 and "unknown customer (stranger)" in text.stdout


def test_report_for_one_customer(tmp_path: Path) -> None:
    config = sealed_state(tmp_path)
    args = ("report", "--since", "2027-01-01", "-c", str(config), "--format", "json")
    result = run_cli(*args, "--customer", "acme")
    assert result.returncode == 0, result.stderr
    assert [(r["customer"], r["quantity"]) for r in json.loads(result.stdout)] == [("acme", "3")]
    everyone = json.loads(run_cli(*args).stdout)
    assert sorted(r["customer"] for r in everyone) == ["acme", "globex"]
    unknown = run_cli(*args, "--customer", "nobody")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1


def test_sample_prints_per_customer_and_trial_refuses_saas(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("GET c=acme /api\nGET c=acme /api\nGET c=zed /api\nGET /api\n")
    config = sealed_state(tmp_path)
    result = run_cli("sample", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if "customer " in line}
    assert lines["acme"].split()[2] == "2" and "unknown" not in lines["acme"]
    assert lines["zed"].split()[2] == "1" and "unknown customer" in lines["zed"]
    assert lines["(no"].split()[3] == "1"
    trial = run_cli("trial", "-c", str(config), "--hours", "1")
    assert trial.returncode == 78 and len(trial.stderr.strip().splitlines()) == 1
    assert "Traceback" not in trial.stderr
