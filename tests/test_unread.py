"""Usage a collector found lost for good (issue 21, "silent loss must speak"): stored with its
sample, logged once, counted in `status`, and health not ok for 24 h with the fix. Oracles: the
ledger's rows, health.json's fields, `status --json`'s keys, exit codes; a fake collector whose
reading carries `Reading.unread`."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent import cli, collectors
from agent.clock import Clock
from agent.collecting.sampling import Sampler
from agent.collectors import Collector, Reading, Registry, Sources, Unread
from agent.commands import status
from agent.config import Config
from agent.config import load as config_load
from agent.daemon import daemon
from agent.ledger import Ledger
from agent.ledger.dimensions import UnreadUsage
from agent.sending import health
from tests.billing import H, make_config
from tests.conftest import PRODUCT, run_cli
from tests.fakes import FakeClock, RecordingLog
from tests.test_daemon import FakeImds, open_daemon, run_round

GONE = Unread("app.log.1 was deleted with 4096 bytes unread", "keep rotate N above 1", 4096)
CUT = Unread("app.log was truncated under its reader", "use create, not copytruncate")
HIDDEN = Unread("copies in /var/log/app/old are not seen", "set rotated: /var/log/app/old/*")
DAY = health.LOOKBACK


class Lossy(Collector):
    """Counts one per reading; each reading reports `lost` (a class attribute the test sets)."""

    type_name = "lossy"
    produces = "increment"
    lost: ClassVar[tuple[Unread, ...]] = ()

    def read(self, state: dict[str, Any] | None) -> Reading:
        n = (state or {}).get("n", 0) + 1
        return Reading(Decimal(1), state={"n": n}, unread=type(self).lost)


@pytest.fixture(autouse=True)
def nothing_lost() -> None:
    Lossy.lost = ()


def lossy_config(tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\ndimensions:\n"
        "  - name: api_bytes\n    collector: {type: lossy}\n"
        "  - name: vcpus\n    collector: {type: system, metric: cpu_count}\n"
    )
    registry = Registry()
    registry.register("lossy", Lossy)
    return config_load(path, registry)


def test_the_daemon_stores_each_loss_with_its_sample_logs_it_once_and_health_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = lossy_config(tmp_path)
    registry = Registry()
    registry.register("lossy", Lossy)
    clock = FakeClock(H + 60)
    d = open_daemon(cfg, clock, FakeImds("i-1"), Sampler(cfg, registry, Sources()),
                    sender_command=lambda *_: ["true"])  # fmt: skip
    journal = RecordingLog()
    monkeypatch.setattr(daemon, "log", journal)
    d.ledger.note_success(H)
    Lossy.lost = (GONE, CUT)
    run_round(d)
    Lossy.lost = ()
    clock.advance(60)
    run_round(d)
    assert d.ledger.unread_usage() == [UnreadUsage("api_bytes", 2, 4096, H + 60, CUT.what, CUT.fix)]
    assert d.ledger.position("api_bytes") == {"collector": {"n": 2}}
    told = {(u.what, u.fix) for u in (GONE, CUT)}
    warned = [args for args in journal.at("warning") if args[1:] in told]
    assert warned == [("api_bytes", GONE.what, GONE.fix), ("api_bytes", CUT.what, CUT.fix)]
    written = json.loads((Path(cfg.state_dir) / health.HEALTH_FILE).read_text())
    assert written["ok"] is False  # written at once, not at the next seal
    assert "api_bytes" in written["reason"] and CUT.fix in written["reason"]


def test_health_names_the_newest_dimension_with_its_fix_for_24_h(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.note_success(H)
    assert health.snapshot(ledger, H)["ok"] is True
    ledger.record_sample("api_bytes", H + 60, Decimal(1), 60, None, carry=True, increment=True,
                         unread=(GONE,))  # fmt: skip
    ledger.record_sample("rows", H + 600, Decimal(1), 60, None, carry=True, increment=True,
                         unread=(HIDDEN,))  # fmt: skip
    both = health.snapshot(ledger, H + 700)
    assert both["ok"] is False and both["failing_since"] is None
    assert both["reason"] == (
        "dimension rows: usage went unread (found 2027-01-15T08:10:00Z): copies in "
        "/var/log/app/old are not seen; fix: set rotated: /var/log/app/old/* "
        "(and 1 more dimension(s))"
    )
    one = health.snapshot(ledger, H + 60 + DAY)  # api_bytes' loss is 24 h old: out of view
    assert one["ok"] is False
    assert one["reason"].startswith("dimension rows: ") and "more dimension" not in one["reason"]
    assert health.snapshot(ledger, H + 600 + DAY - 1)["ok"] is False
    after = health.snapshot(ledger, H + 600 + DAY)
    assert (after["ok"], after["reason"]) == (True, None)
    assert status.check(tmp_path, FakeClock(H + 700)) is False
    assert status.check(tmp_path, FakeClock(H + 600 + DAY)) is True
    # another reason already there: both are named
    ledger.note_failure(H + 700, "ThrottlingException: slow down")
    named = health.snapshot(ledger, H + 800)["reason"]
    assert named.startswith("ThrottlingException: slow down; dimension rows: usage went unread")


def loss_near_now(cfg: Config, ago: float) -> None:
    """A ledger (as `run` leaves it) with a loss `ago` seconds before the real time, which the
    `status` child reads."""
    ledger = Ledger(cfg.state_dir)
    now = Clock().time()
    ledger.note_success(now - 2 * DAY)
    ledger.record_sample("vcpus", now - ago, Decimal(4), 60, {"n": 1}, carry=False,
                         unread=(GONE, CUT))  # fmt: skip
    ledger.close()


def test_status_check_exits_1_while_a_loss_is_in_view(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    loss_near_now(cfg, ago=DAY + 60)
    assert run_cli("status", "--check", "-c", str(cfg.source)).returncode == 0  # 24 h old
    loss_near_now(cfg, ago=60)
    result = run_cli("status", "--check", "-c", str(cfg.source))
    assert (result.returncode, result.stdout) == (1, "")


def test_status_json_and_text_show_each_dimensions_unread_usage(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    loss_near_now(cfg, ago=60)
    result = run_cli("status", "--json", "-c", str(cfg.source))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    dims = {d["name"]: d for d in report["dimensions"]}
    assert dims["vcpus"]["unread"]["events"] == 2
    assert dims["vcpus"]["unread"]["amount"] == 4096
    newest = dims["vcpus"]["unread"]["newest"]
    assert set(newest) == {"at", "what", "fix"} and (newest["what"], newest["fix"]) == (
        CUT.what, CUT.fix
    )  # fmt: skip
    assert dims["requests"]["unread"] == {"events": 0, "amount": 0, "newest": None}
    assert report["health"]["ok"] is False and CUT.fix in report["health"]["reason"]
    ledger = Ledger(cfg.state_dir, readonly=True)
    text = status.render(status.collect(ledger, cfg, FakeClock(Clock().time())))
    (line,) = [x for x in text.splitlines() if "UNREAD" in x]
    assert "2 event(s)" in line and CUT.fix in line


def test_sample_prints_each_loss_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(collectors.BUILTINS, "lossy", f"{__name__}:Lossy")
    cfg = lossy_config(tmp_path)
    Lossy.lost = (GONE, HIDDEN)
    assert cli.main(["sample", "-c", str(cfg.source)]) == 0
    out, err = capsys.readouterr()
    warnings = [
        line for line in err.splitlines() if line.startswith("warning [usage_unread] api_bytes: ")
    ]
    assert len(warnings) == 2
    assert all(u.what in w and u.fix in w for u, w in zip((GONE, HIDDEN), warnings, strict=True))
    assert "api_bytes 1" in out  # the reading itself is still shown
    assert not (Path(cfg.state_dir) / "ledger.db").exists()
