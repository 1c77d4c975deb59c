"""SaaS mode's `status`, `report --customer` and `sample`, through the real command (`trial`:
test_trial_saas.py)."""

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


def test_sample_prints_per_customer(tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("GET c=acme /api\nGET c=acme /api\nGET c=zed /api\nGET /api\n")
    config = sealed_state(tmp_path)
    result = run_cli("sample", "-c", str(config))
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if "customer " in line}
    assert lines["acme"].split()[2] == "2" and "unknown" not in lines["acme"]
    assert lines["zed"].split()[2] == "1" and "unknown customer" in lines["zed"]
    assert lines["(no"].split()[3] == "1"


SO_FAR_DIMS = """\
  - name: api
    collector: {type: log, path: /nonexistent/app.log, pattern: 'c=(?P<customer>\\w+) '}
    scale: 0.1
    rounding: up
  - name: peak
    collector: {type: log, path: /nonexistent/app.log, pattern: 'c=(?P<customer>\\w+) ',
                mode: count}
    aggregate: max
"""


def test_status_hour_so_far_is_the_sum_of_that_hours_customer_records(tmp_path: Path) -> None:
    """The oracle is the hour's per-customer records once it is sealed. Billing every
    customer's usage as one (what status did) gave api 3 and peak 17 here: rounding up and `max`
    do not distribute over customers, and a label no customer has is held, not billed."""
    from agent.commands.status import collect
    from agent.modes.choose import mode_for
    from tests.fakes import FakeClock

    cfg = saas_config(tmp_path, SO_FAR_DIMS)
    ledger = Ledger(cfg.state_dir)
    for label in ("acme", "globex", "initech"):  # initech: idle
        add(ledger, label)
    usage = [
        (H + 60, {key("acme", None): D(4), key("stranger", None): D(13)}),
        (H + 120, {key("globex", None): D(4), key(None, None): D(2)}),
        (H + 180, {key("acme", None): D(5), key("globex", None): D(1)}),
    ]
    for t, parts in usage:
        for name in ("api", "peak"):
            ledger.record_sample(name, t, sum(parts.values(), D(0)), 60, None,
                                 carry=name == "api", increment=name == "api",
                                 breakdown=parts)  # fmt: skip
    report = collect(ledger, cfg, FakeClock(H + 1800), mode=mode_for(cfg))
    so_far = {d["name"]: d["current_hour_so_far"] for d in report["dimensions"]}
    seal_hours(ledger, cfg, H + 3700, offset=0)
    sealed: dict[str, Decimal] = {}
    for h in ledger.hours():
        assert h.hour == H
        sealed[h.dimension] = sealed.get(h.dimension, D(0)) + D(h.quantity.text)
    assert {name: D(q) for name, q in so_far.items()} == sealed
    # api: acme 0.9 -> 1, globex 0.5 -> 1, initech 0; peak: acme 5, globex 4, initech 0
    assert sealed == {"api": D(2), "peak": D(9)}
