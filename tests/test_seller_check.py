"""Issue 25, `check`, `sample`, `prepare-image`: named warnings (accepted in the config, failed by
`check --strict`), interfaces that match nothing, JMESPath calls that cannot run, and the YAML
text of a decimal. Oracles: exit codes and lines of the real command, the agent's own source for
the one prefix, the host's interfaces as `ip` and psutil list them, jmespath itself, the YAML
text."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import jmespath
import psutil
import pytest
import yaml
from jmespath.exceptions import JMESPathError

from agent import warnings as registry
from agent.collecting.sampling import Sampler
from agent.collectors import system
from agent.config import load
from agent.config.loader import dump_yaml, read_yaml
from agent.emulator import Emulator
from agent.errors import EX_CONFIG, EX_OK, EX_UNAVAILABLE
from agent.sending import health
from tests.billing import H
from tests.conftest import PRODUCT, ROOT, ConfigWriter, run_cli
from tests.fakes import FakeClock
from tests.test_daemon import FakeImds, open_daemon, run_round

TRAPS = """
product_code: {product}
metering: {{endpoint_url: 'http://127.0.0.1:8787'}}
dimensions:
  - name: api_requests
    collector: {{type: system, metric: cpu_count}}
    scale: 0.001
    rounding: up
{accept}"""


def warning_names(stdout: str) -> list[str]:
    return re.findall(r"^warning \[([a-z_]+)\] ", stdout, flags=re.M)


# -- named warnings, accept, --strict ------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "printed", "strict_code"),
    [
        ("", ["loopback_endpoint", "rounding_up"], EX_CONFIG),
        ("warnings: {accept: [rounding_up]}", ["loopback_endpoint"], EX_CONFIG),
        ("warnings: {accept: [rounding_up, loopback_endpoint]}", [], EX_OK),
    ],
)
def test_accepted_warnings_are_silent_and_strict_fails_on_the_rest(
    write_config: ConfigWriter, accept: str, printed: list[str], strict_code: int
) -> None:
    path = write_config(TRAPS.format(product=PRODUCT, accept=accept))
    plain = run_cli("check", "--offline", "-c", str(path))
    assert plain.returncode == EX_OK  # a warning alone never fails a plain check
    assert warning_names(plain.stdout) == printed
    strict = run_cli("check", "--offline", "--strict", "-c", str(path))
    assert strict.returncode == strict_code
    assert warning_names(strict.stdout) == printed
    if printed:
        (line,) = strict.stderr.strip().splitlines()
        assert all(name in line for name in printed) and "warnings.accept" in line
    else:
        assert strict.stderr == ""


def test_an_unknown_name_in_accept_is_a_config_error_naming_it(write_config: ConfigWriter) -> None:
    accept = "warnings: {accept: [rounding_up, rounding_upp]}"
    path = write_config(TRAPS.format(product=PRODUCT, accept=accept))
    result = run_cli("check", "--offline", "-c", str(path))
    assert result.returncode == EX_CONFIG
    (line,) = result.stderr.strip().splitlines()
    assert "warnings.accept[1]" in line and '"rounding_upp"' in line
    assert "rounding_up" in line.split("expected one of", 1)[1]  # the known names, and a hint


def _leading_texts(tree: ast.AST) -> list[str]:
    """Every string literal, and the leading text of every f-string, in the source."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append(node.value)
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append(first.value)
    return found


def test_no_command_prints_a_warning_outside_the_registry() -> None:
    """Every warning goes through agent/warnings.py (one prefix, a name): no text that begins
    `warning: `, `WARNING ` or `warn ` and no `_say("warn", ...)` anywhere in the agent."""
    offenders = []
    for path in sorted((ROOT / "agent").rglob("*.py")):
        if path.name == "warnings.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for text in _leading_texts(tree):
            if re.match(r"\s*(warning: |WARNING |warn\s)", text):
                offenders.append(f"{path.relative_to(ROOT)}: {text!r}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "_say"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and node.args[0].value not in ("ok", "fail")
            ):
                offenders.append(f"{path.relative_to(ROOT)}: _say({node.args[0].value!r})")
    assert offenders == []
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", name) for name in registry.KINDS)


def test_docs_list_every_warning_name() -> None:
    text = (ROOT / "docs/commands.md").read_text()
    assert [n for n in registry.KINDS if f"`{n}`" not in text] == []


# -- the YAML text of a decimal ------------------------------------------------------------------


@pytest.mark.parametrize(
    "written",
    ["0.000000000931322574615478515625", "0.1", "1_000.25", "1.5e-3", "0.30000000000000004441"],
)
def test_an_unquoted_decimal_scale_is_the_digits_the_yaml_holds(
    write_config: ConfigWriter, written: str
) -> None:
    text = (
        f"product_code: {PRODUCT}\ndimensions:\n  - name: d\n"
        f"    collector: {{type: system, metric: cpu_count}}\n    scale: {written}\n"
    )
    assert isinstance(yaml.safe_load(text)["dimensions"][0]["scale"], float)  # YAML says float
    path = write_config(text)
    expected = Decimal(written.replace("_", ""))
    assert load(path).dimensions[0].scale == expected
    # trial writes the config back (with its overrides): the digits survive the round trip
    again = path.parent / "again.yaml"
    again.write_text(dump_yaml(read_yaml(path)))
    assert load(again).dimensions[0].scale == expected


# -- interfaces that match nothing ---------------------------------------------------------------


def host_interfaces() -> set[str]:
    """The oracle: `ip -o link` where iproute2 is installed, else psutil's list."""
    if shutil.which("ip"):
        out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
        return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}
    return set(psutil.net_if_stats())


def _egress(write_config: ConfigWriter, tmp_path: Path, globs: str, endpoint: str = "") -> Path:
    metering = f"metering: {{endpoint_url: '{endpoint}'}}\n" if endpoint else ""
    return write_config(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\n{metering}dimensions:\n"
        f"  - name: egress\n    collector: {{type: system, metric: net_sent_bytes, "
        f"interfaces: [{globs}]}}\n"
    )


def test_interfaces_that_match_nothing_fail_check_naming_the_hosts_interfaces(
    write_config: ConfigWriter, tmp_path: Path, emulator: Emulator
) -> None:
    names = host_interfaces()
    assert "nosuch0" not in names
    path = _egress(write_config, tmp_path, "nosuch0, ens99*", emulator.url)
    result = run_cli(
        "check", "-c", str(path), env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url}
    )
    assert result.returncode == EX_UNAVAILABLE, result.stdout + result.stderr
    (fail,) = [line for line in result.stdout.splitlines() if line.startswith("fail ")]
    assert "interfaces nosuch0, ens99* match none" in fail and "set interfaces" in fail
    listed = fail.split("network interfaces (", 1)[1].split(")", 1)[0].split(", ")
    assert set(listed) == names
    offline = run_cli("check", "--offline", "-c", str(path))  # ExecStartPre: may appear later
    assert offline.returncode == EX_OK
    assert warning_names(offline.stdout) == ["source_missing", "loopback_endpoint"]
    # a glob that matches one of the host's interfaces is fine
    ok = run_cli("check", "--offline", "-c", str(_egress(write_config, tmp_path, "lo*")))
    assert ok.returncode == EX_OK and warning_names(ok.stdout) == []


def test_interfaces_that_match_nothing_are_healths_reason_while_running(
    write_config: ConfigWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(_egress(write_config, tmp_path, "nosuch0"))
    clock = FakeClock(H + 60)
    d = open_daemon(cfg, clock, FakeImds("i-1"), Sampler(cfg), sender_command=lambda *_: ["true"])
    d.ledger.note_success(H)
    for _ in range(3):
        run_round(d)
        clock.advance(60)
    written = json.loads((Path(cfg.state_dir) / health.HEALTH_FILE).read_text())
    assert written["ok"] is False
    assert (
        "dimension egress" in written["reason"]
        and "interfaces nosuch0 match none" in written["reason"]
    )
    assert "fix: set interfaces" in written["reason"]
    (unread,) = d.ledger.unread_usage()
    assert unread.events == 1  # reported once, not at every reading
    monkeypatch.setattr(system, "REPORT_EVERY", 2)  # and again while it lasts (health's 24 h)
    for _ in range(2):
        run_round(d)
        clock.advance(60)
    assert [u.events for u in d.ledger.unread_usage()] == [2]
    d.ledger.close()


def test_interfaces_that_match_stay_healthy(write_config: ConfigWriter, tmp_path: Path) -> None:
    cfg = load(_egress(write_config, tmp_path, "lo"))
    assert "lo" in host_interfaces()
    clock = FakeClock(H + 60)
    d = open_daemon(cfg, clock, FakeImds("i-1"), Sampler(cfg), sender_command=lambda *_: ["true"])
    d.ledger.note_success(H)
    run_round(d)
    assert d.ledger.unread_usage() == []
    assert health.snapshot(d.ledger, clock.time())["ok"] is True
    d.ledger.close()


# -- JMESPath ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("lenght(users)", "unknown function lenght(); did you mean length()?"),
        ("max_by(users)", "max_by() takes 2 argument(s); the query gives it 1"),
        ("not_null()", "not_null() takes at least 1 argument(s); the query gives it 0"),
    ],
)
def test_a_jmespath_call_that_cannot_run_is_a_config_error_naming_the_key(
    write_config: ConfigWriter, query: str, said: str
) -> None:
    with pytest.raises(JMESPathError):  # the oracle: jmespath refuses it when it runs
        jmespath.search(query, {"users": [1, 2]})
    path = write_config(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: users\n"
        f"    collector: {{type: http, url: 'http://127.0.0.1:9/stats', query: '{query}'}}\n"
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == EX_CONFIG
    (line,) = result.stderr.strip().splitlines()
    assert f"dimensions[0].collector.query: invalid JMESPath: {said}" in line


def test_a_jmespath_query_that_runs_is_accepted(write_config: ConfigWriter) -> None:
    query = "max_by(users, &n).n"
    assert jmespath.search(query, {"users": [{"n": 1}, {"n": 3}]}) == 3
    path = write_config(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: users\n"
        f"    collector: {{type: http, url: 'http://127.0.0.1:9/stats', query: '{query}'}}\n"
    )
    assert run_cli("check", "--offline", "-c", str(path)).returncode == EX_OK


def test_a_tiny_scale_is_shown_with_every_digit_and_no_exponent(write_config: ConfigWriter) -> None:
    tiny = "0.000000000931322574615478515625"
    path = write_config(
        f"product_code: {PRODUCT}\ndimensions:\n  - name: d\n"
        f"    collector: {{type: system, metric: cpu_count}}\n    scale: {tiny}\n    rounding: up\n"
    )
    result = run_cli("check", "--offline", "-c", str(path))
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("warning [rounding_up]")]
    assert f"scale {tiny} " in line and f"= {Decimal(tiny) * 3:f})" in line
    assert "E-" not in line


def test_a_scalar_float_keeps_its_text_through_copy_and_pickle(tmp_path: Path) -> None:
    import copy
    import pickle

    from agent.fields import ScalarFloat

    path = tmp_path / "list.yaml"
    path.write_text("[0.10]\n")
    (read,) = read_yaml(path)
    assert isinstance(read, ScalarFloat) and read.text == "0.10" and read == 0.1
    for again in (copy.deepcopy(read), pickle.loads(pickle.dumps(read))):
        assert type(again) is ScalarFloat and again.text == "0.10" and again == 0.1
