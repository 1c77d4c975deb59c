"""`metrics: {textfile: PATH}`: the text node_exporter serves (parsed here by prometheus_client's
own parser and linted by promtool), the state it is taken from (a real ledger), the atomic write,
and the config's errors (exit 78 naming the key)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load
from agent.config.model import Metrics as MetricsConfig
from agent.daemon import metrics, textfile
from agent.daemon.metrics import NoMetrics, TextfileMetrics, metrics_for
from agent.errors import EX_CONFIG, ConfigError
from agent.ledger import Ledger
from agent.sending import health
from tests import test_batching
from tests.billing import H, make_config
from tests.conftest import run_cli
from tests.saas import add_customers, seal
from tests.test_batching import Saas
from tests.test_ledger import seal_one

NOW = H + 2 * 3600 + 600  # 10 minutes into the hour after next


def parse(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {labels: value}, as a scraper reads the text (prometheus_client's parser)."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_label_values_are_escaped_as_the_format_says_and_read_back_whole() -> None:
    odd = 'a "quoted" \\ back\nslash'
    text = textfile.render(
        [
            textfile.Family("x_total", "counter", 'help with \\ and\nnewline "q"',
                            [((("dimension", odd),), 3), ((("dimension", "plain"),), 0.5)]),
            textfile.Family("y_seconds", "gauge", "h", [((), 1.7e9 + 0.25)]),
        ]
    )  # fmt: skip
    assert '# HELP x_total help with \\\\ and\\nnewline "q"' in text
    assert 'x_total{dimension="a \\"quoted\\" \\\\ back\\nslash"} 3' in text
    values = parse(text)
    assert values["x_total"] == {(("dimension", odd),): 3.0, (("dimension", "plain"),): 0.5}
    assert values["y_seconds"] == {(): 1700000000.25}
    assert next(f.documentation for f in text_string_to_metric_families(text)) == (
        'help with \\ and\nnewline "q"'
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path / "state")
    yield led
    led.close()


def made(tmp_path: Path, ledger: Ledger, started: float = NOW - 50) -> TextfileMetrics:
    cfg = make_config(tmp_path, extra=f"metrics: {{textfile: {tmp_path / 'm.prom'}}}\n")
    metrics = metrics_for(cfg, ledger, started)
    assert isinstance(metrics, TextfileMetrics)
    return metrics


def test_the_file_says_what_the_ledger_holds(tmp_path: Path, ledger: Ledger) -> None:
    seal_one(ledger, "vcpus", H)
    seal_one(ledger, "vcpu_hours", H)
    seal_one(ledger, "vcpus", H + 3600)
    seal_one(ledger, "requests", H + 3600)
    seal_one(ledger, "vcpus", H - 2 * 86400)  # sent long ago: not in the last 24 h
    ledger.mark_sent("vcpus", H, record_id="r1", now=H + 3700)
    ledger.note_success(H + 3700, accepted=True)
    ledger.reject("vcpu_hours", H, error="ValidationException: no", now=H + 3710)
    ledger.expire("requests", H + 3600, error="too old", now=H + 3720)
    ledger.mark_sent("vcpus", H - 2 * 86400, record_id="r0", now=H - 2 * 86400 + 3700)
    ledger.note_success(NOW - 5)  # a DryRun: not an accepted send
    ledger.record_collector_error("requests", H, "boom")
    ledger.record_collector_error("requests", H + 60, "boom")
    metrics = made(tmp_path, ledger)  # the errors continue the ledger's count
    metrics.collector_error("requests")
    metrics.lines_read("requests", 7)
    metrics.lines_read("requests", 5)
    metrics.lines_read("vcpus", None)  # a collector that reads no lines
    state, bounds = ledger.send_state(), ledger.pending_bounds(saas=False)
    health.write(tmp_path / "state", ledger, NOW)  # not ok: an hour rejected
    metrics.tick(ledger, NOW, state, bounds)  # the first tick takes health and the counts
    text = (tmp_path / "m.prom").read_text()
    values = parse(text)
    pending = [h for h in ledger.hours() if h.state == "pending"]
    assert values["metering_agent_pending_records"] == {(): len(pending)} == {(): 1}
    assert values["metering_agent_recent_records"] == {
        (("state", "sent"),): 1,  # the one two days ago is not recent
        (("state", "rejected"),): 1,
        (("state", "expired"),): 1,
    }
    oldest = min(h.timestamp for h in pending)  # (H + 3600) + 3540
    assert values["metering_agent_oldest_pending_age_seconds"] == {(): NOW - oldest}
    assert values["metering_agent_last_accepted_timestamp_seconds"] == {(): H + 3700}
    assert values["metering_agent_healthy"] == {(): 0}
    assert values["metering_agent_collector_errors_total"] == {
        (("dimension", "requests"),): 3,
        (("dimension", "vcpu_hours"),): 0,
        (("dimension", "vcpus"),): 0,
    }
    assert values["metering_agent_log_lines_read_total"] == {(("dimension", "requests"),): 12}
    assert values["metering_agent_start_time_seconds"] == {(): NOW - 50}
    assert types(text)["metering_agent_collector_errors"] == "counter"  # (the parser drops _total)
    assert types(text)["metering_agent_pending_records"] == "gauge"
    # the next tick: nothing changed, so neither health nor the counts are taken again; the age
    # moves on
    metrics.tick(ledger, NOW + 15, state, bounds)
    again = parse((tmp_path / "m.prom").read_text())
    assert again["metering_agent_oldest_pending_age_seconds"] == {(): NOW + 15 - oldest}
    assert again["metering_agent_healthy"] == {(): 0}
    # a send pass runs (the tick reads only the send state) and sends the pending record
    ledger.mark_sent("vcpus", H + 3600, record_id="r2", now=NOW + 20)
    ledger.note_success(NOW + 20, accepted=True)
    metrics.tick(ledger, NOW + 30)
    after = parse((tmp_path / "m.prom").read_text())
    assert after["metering_agent_healthy"] == {(): 0}  # as health.json still says
    assert after["metering_agent_pending_records"] == {(): 0}
    assert after["metering_agent_oldest_pending_age_seconds"] == {(): 0}
    assert after["metering_agent_recent_records"][(("state", "sent"),)] == 2
    assert after["metering_agent_last_accepted_timestamp_seconds"] == {(): NOW + 20}
    # the pass ends writing health.json (ok: the rejection was more than 24 h ago by then); the
    # next tick, with nothing else changed, reads it
    health.write(tmp_path / "state", ledger, H + 3 * 86400)
    metrics.tick(ledger, NOW + 45)
    assert parse((tmp_path / "m.prom").read_text())["metering_agent_healthy"] == {(): 1}


def test_promtool_finds_nothing_to_lint(tmp_path: Path, ledger: Ledger) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian's prometheus package) is not installed")
    metrics = made(tmp_path, ledger)
    metrics.lines_read("requests", 1)
    metrics.refresh(ledger, NOW)
    done = subprocess.run(
        [promtool, "check", "metrics"],
        input=(tmp_path / "m.prom").read_text(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_written_atomically_mode_0644_whatever_the_umask(tmp_path: Path, ledger: Ledger) -> None:
    metrics = made(tmp_path, ledger)
    metrics.write(NOW)
    assert not (tmp_path / "m.prom").exists()  # nothing before the ledger's counts are taken
    old = os.umask(0o077)
    try:
        metrics.refresh(ledger, NOW)
    finally:
        os.umask(old)
    target = tmp_path / "m.prom"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    inode = target.stat().st_ino
    metrics.write(NOW + 1)
    assert target.stat().st_ino != inode  # a new file renamed over it, never rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "m.prom", "state"]


def test_a_write_that_fails_is_logged_once_and_never_raised(
    tmp_path: Path, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "agent.daemon.metrics")
    metrics = made(tmp_path, ledger)
    metrics.path = tmp_path / "gone" / "m.prom"
    for t in range(3):
        metrics.refresh(ledger, NOW + t)
    assert [r.getMessage() for r in caplog.records].count(
        f"metrics file {metrics.path} cannot be written: No such file or directory"
    ) == 1
    (tmp_path / "gone").mkdir()
    metrics.write(NOW + 5)
    assert metrics.path.exists()
    assert f"metrics file {metrics.path} is written again" in caplog.text


def test_a_reload_keeps_the_counters_and_removes_a_file_it_no_longer_writes(
    tmp_path: Path, ledger: Ledger
) -> None:
    metrics = made(tmp_path, ledger)
    metrics.lines_read("requests", 4)
    metrics.refresh(ledger, NOW)
    cfg = make_config(tmp_path, extra=f"metrics: {{textfile: {tmp_path / 'n.prom'}}}\n")
    moved = metrics.reconfigured(cfg, ledger, NOW + 1)
    assert not (tmp_path / "m.prom").exists()
    values = parse((tmp_path / "n.prom").read_text())
    assert values["metering_agent_log_lines_read_total"] == {(("dimension", "requests"),): 4}
    off = moved.reconfigured(make_config(tmp_path), ledger, NOW + 2)
    assert isinstance(off, NoMetrics) and not (tmp_path / "n.prom").exists()


def test_without_metrics_nothing_is_counted_or_written(tmp_path: Path, ledger: Ledger) -> None:
    metrics = metrics_for(make_config(tmp_path), ledger, NOW)
    assert isinstance(metrics, NoMetrics)
    metrics.tick(ledger, NOW)
    assert not list(tmp_path.glob("*.prom"))


def test_the_key_loads_and_a_name_node_exporter_ignores_is_refused(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra="metrics: {textfile: /var/lib/prometheus/x/agent.prom}\n")
    assert cfg.metrics == MetricsConfig(Path("/var/lib/prometheus/x/agent.prom"))
    for bad in ("/tmp/agent.txt", "relative/agent.prom", "/tmp/.prom/"):
        path = tmp_path / "config.yaml"
        path.write_text(path.read_text().replace("/var/lib/prometheus/x/agent.prom", bad))
        with pytest.raises(Exception, match=r"^metrics\.textfile: .*\*\.prom") as e:
            load(path)
        assert e.value.exit_code == EX_CONFIG  # type: ignore[attr-defined]
        path.write_text(path.read_text().replace(bad, "/var/lib/prometheus/x/agent.prom"))


def config_with_textfile(tmp_path: Path, target: Path) -> Path:
    cfg = make_config(tmp_path, extra=f"metrics: {{textfile: {target}}}\n")
    return cfg.source


@pytest.mark.parametrize("command", [["check", "--offline"], ["run"]])
def test_a_missing_directory_is_a_config_error_naming_the_key(
    tmp_path: Path, command: list[str]
) -> None:
    source = config_with_textfile(tmp_path, tmp_path / "nowhere" / "agent.prom")
    done = run_cli(*command, "-c", str(source))
    assert done.returncode == EX_CONFIG, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert (
        line.startswith("metering-agent: metrics.textfile: directory ") and "does not exist" in line
    )
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_a_read_only_directory_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only tmpfs needs root")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        source = config_with_textfile(tmp_path, ro / "agent.prom")
        done = run_cli("check", "--offline", "-c", str(source))
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert done.returncode == EX_CONFIG, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "metrics.textfile: " in line and "read-only" in line and "ReadWritePaths=" in line


def test_a_file_in_the_state_dir_is_accepted_before_run_makes_the_state_dir(tmp_path: Path) -> None:
    cfg = load(config_with_textfile(tmp_path, tmp_path / "state" / "agent.prom"))
    assert not (tmp_path / "state").exists()
    metrics.check(cfg)  # `run` makes the state dir
    other = load(config_with_textfile(tmp_path, tmp_path / "elsewhere" / "agent.prom"))
    with pytest.raises(ConfigError, match=r"^metrics\.textfile: directory .* does not exist"):
        metrics.check(other)


def test_a_ledger_that_cannot_be_read_keeps_the_last_counts_and_health_says_why(
    tmp_path: Path, ledger: Ledger
) -> None:
    seal_one(ledger, "vcpus", H)
    metrics = made(tmp_path, ledger)
    metrics.refresh(ledger, NOW)
    ledger.close()  # (reads now raise sqlite3.ProgrammingError, as a damaged file's would fail)
    (tmp_path / "state" / "health.json").write_text('{"ok": false, "reason": "ledger damaged"}')
    metrics.refresh(ledger, NOW + 1)
    values = parse((tmp_path / "m.prom").read_text())
    assert values["metering_agent_pending_records"] == {(): 1}
    assert values["metering_agent_healthy"] == {(): 0}


def test_the_daemon_counts_what_it_reads_and_a_reload_turns_metrics_on(tmp_path: Path) -> None:
    """The daemon's wiring, on a fake clock: a reload with a missing directory is refused (the
    running config kept), one with a good one writes at once; rounds count collector errors
    (a dimension whose source fails: psutil's users() raising), the send tick rewrites the file."""
    from tests.fakes import FakeClock, FakePsutil
    from tests.test_daemon import daemon_for, run_round

    clock = FakeClock(H + 600)
    ps = FakePsutil()
    d = daemon_for(tmp_path, clock, ps)
    d.publish_health()
    source = d.config.source
    target = tmp_path / "prom" / "agent.prom"
    source.write_text(source.read_text() + f"metrics: {{textfile: {target}}}\n")
    d.reload()
    assert d.config.metrics is None and not target.exists()  # refused: no such directory
    target.parent.mkdir()
    d.reload()
    assert d.config.metrics is not None
    d.publish_health()
    assert parse(target.read_text())["metering_agent_collector_errors_total"] == {
        (("dimension", n),): 0 for n in ("requests", "vcpu_hours", "vcpus")
    }

    def users() -> list[object]:
        raise OSError("utmp unreadable")

    ps.users = users  # type: ignore[method-assign]
    for _ in range(2):
        run_round(d)
        clock.advance(60)
    d.send_tick()
    values = parse(target.read_text())
    stored = {s.dimension: s.errors for s in d.ledger.dimension_status()}
    assert values["metering_agent_collector_errors_total"][(("dimension", "requests"),)] == 2
    assert stored["requests"] == 2
    assert values["metering_agent_healthy"] == {(): 1}


saas = test_batching.saas  # the fixture: a SaaS ledger, the emulator through a real boto3 client


def test_a_batch_the_service_took_is_the_last_accepted_send_a_probe_is_not(saas: Saas) -> None:
    (customer,) = add_customers(saas.ledger, ["acme"])
    saas.ledger.schedule_dryrun(saas.clock.time())
    saas.sender().run()  # the permission probe only: nothing pending
    state = saas.ledger.send_state()
    assert state.last_success is not None and state.last_accepted is None
    seal(saas.ledger, customer.label, "requests", H, 3)
    saas.sender().run()
    (sent,) = saas.ledger.hours()
    assert sent.state == "sent" and len(saas.emulator.records()) == 1
    assert saas.ledger.send_state().last_accepted == sent.done_at


def test_a_trial_never_writes_the_machines_metrics_file(tmp_path: Path) -> None:
    from agent.commands.trial import trial_config

    raw = {"product_code": "p", "metrics": {"textfile": "/var/lib/prometheus/x/a.prom"}}
    assert "metrics" not in trial_config(raw, tmp_path / "trial", "http://127.0.0.1:1")
