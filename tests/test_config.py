from __future__ import annotations

import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from agent import config
from agent.collectors import Registry
from agent.errors import EX_CONFIG, ConfigError
from tests.billing import make_config
from tests.conftest import PRODUCT, ROOT, run_cli

BASE = f"""
product_code: {PRODUCT}
dimensions:
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
"""


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load(path)


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


def test_example_config_loads_and_documents_every_dimension_option() -> None:
    cfg = config.load(ROOT / "config.example.yaml")
    assert cfg.product_code == PRODUCT
    assert {d.aggregate for d in cfg.dimensions} >= {"max", "integral", "sum", "avg"}
    egress = next(d for d in cfg.dimensions if d.name == "egress_gb")
    assert egress.interval == 300
    assert egress.collector.cumulative and egress.collector.kind == "increment"
    assert egress.scale == Decimal("0.000000001")
    text = (ROOT / "config.example.yaml").read_text()
    for key in [*config.TOP.fields, *config.METERING.fields, *config.DIMENSION_FIELDS]:
        assert key in text, f"config.example.yaml does not document {key}"


def test_defaults(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    assert cfg.state_dir == Path("/var/lib/metering-agent")
    assert cfg.metering.region == "auto"
    assert cfg.metering.send_window == config.DEFAULT_SEND_WINDOW
    assert cfg.metering.startup_check is True
    assert cfg.interval == 60
    (dim,) = cfg.dimensions
    assert (dim.aggregate, dim.rounding, dim.decimals, dim.scale) == ("max", "nearest", None, 1)


def test_durations_accept_seconds_and_units(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        BASE + "metering: {send_window: 10m}\nsampling: {interval: 30s}\n",
    )
    assert cfg.metering.send_window == 600
    assert cfg.interval == 30
    cfg = load_text(tmp_path, BASE + "sampling: {interval: 1h}\n")
    assert cfg.interval == 3600


def test_aggregate_defaults_follow_collector_kind(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        f"""
        product_code: {PRODUCT}
        dimensions:
          - name: bytes
            collector: {{type: system, metric: net_recv_bytes}}
          - name: users
            collector: {{type: system, metric: users}}
          - name: total
            collector: {{type: system, metric: users, counter: true}}
        """,
    )
    assert [d.aggregate for d in cfg.dimensions] == ["sum", "max", "sum"]
    assert cfg.dimensions[2].collector.cumulative


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        # unknown keys, at every level, with a suggestion
        ("extra: 1", "extra: unknown key (known: version, product_code"),
        (
            "metering: {sendwindow: 5}",
            'metering.sendwindow: unknown key (known: region, endpoint_url, send_window, startup_check, on_check_failure; did you mean "send_window"?)',
        ),
        # wrong types
        (
            "metering: {startup_check: 'yes please'}",
            'metering.startup_check: expected true or false; found "yes please"',
        ),
        ("metering: [1]", "metering: expected a mapping; found a list"),
        ("state_dir: 5", "state_dir: expected a string; found 5"),
        (
            "metering: {region: Mars}",
            'metering.region: "Mars" is not valid: expected auto or a region name',
        ),
        ("metering: {endpoint_url: 'ftp://x'}", "metering.endpoint_url"),
        ("version: 2", "version: expected 1..1; found 2"),
        # durations
        ("metering: {send_window: 2h}", "metering.send_window: expected 0..3600 s; found 7200 s"),
        (
            "metering: {send_window: soon}",
            'metering.send_window: expected a duration in seconds or like 90s, 10m, 1h; found "soon"',
        ),
        ("sampling: {interval: 7}", "sampling.interval: must divide 3600 s evenly"),
        ("sampling: {interval: 0}", "sampling.interval: expected 1..3600 s; found 0 s"),
        ("sampling: {interval: 1.5}", "sampling.interval: expected a duration"),
    ],
)
def test_top_level_errors_name_the_key(tmp_path: Path, snippet: str, expected: str) -> None:
    assert expected in error_of(tmp_path, BASE + snippet + "\n")


def dim_error(tmp_path: Path, dimension: str) -> str:
    text = f"product_code: {PRODUCT}\ndimensions:\n  - name: ok\n    collector: {{type: system, metric: users}}\n"
    return error_of(tmp_path, text + textwrap.indent(textwrap.dedent(dimension), "  "))


@pytest.mark.parametrize(
    ("dimension", "expected"),
    [
        (
            "- name: c\n  collector: {type: system, metric: cpu_cnt}\n",
            'dimensions[1].collector.metric: expected one of cpu_count, cpu_percent, memory_total_gib, memory_used_gib, disk_used_gib, net_sent_bytes, net_recv_bytes, process_count, users; found "cpu_cnt"; did you mean "cpu_count"?',
        ),
        (
            "- name: c\n  collector: {type: sytem, metric: cpu_count}\n",
            'did you mean "system"?); third-party collectors register under the entry-point group metering_agent.collectors',
        ),
        (
            "- name: c\n  collector: {metric: cpu_count}\n",
            "dimensions[1].collector.type: required key is missing",
        ),
        (
            "- name: c\n  collector: system\n",
            'dimensions[1].collector: expected a mapping with a `type`; found "system"',
        ),
        (
            "- name: c\n  collector: {type: system, metric: users, colour: red}\n",
            "dimensions[1].collector.colour: unknown key (known: type, counter, timeout, metric, path, name, interfaces)",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users, path: /}\n",
            'dimensions[1].collector.path: not used by metric "users"; remove it',
        ),
        (
            "- name: c\n  collector: {type: system, metric: process_count, name: '([a-z'}\n",
            'dimensions[1].collector.name: invalid regular expression "([a-z": unterminated character set at position 1',
        ),
        (
            "- name: ok\n  collector: {type: system, metric: users}\n",
            'dimensions[1].name: "ok" is already used by dimensions[0]',
        ),
        (
            "- collector: {type: system, metric: users}\n",
            "dimensions[1].name: required key is missing",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  decimals: 7\n",
            "dimensions[1].decimals: expected 1..6; found 7",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  decimals: 0\n",
            "dimensions[1].decimals: expected 1..6; found 0",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  aggregate: median\n",
            'dimensions[1].aggregate: expected one of max, min, avg, sum, last, integral; found "median"',
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  rounding: ceil\n",
            "dimensions[1].rounding: expected one of up, down, nearest",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  scale: 0\n",
            "dimensions[1].scale: expected a number greater than 0; found 0",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  scale: lots\n",
            'dimensions[1].scale: expected a number; found "lots"',
        ),
        (
            "- name: c\n  collector: {type: system, metric: users}\n  interval: 7m\n",
            "dimensions[1].interval: must divide 3600 s evenly",
        ),
        (
            "- name: c\n  collector: {type: system, metric: users, timeout: 30s}\n  interval: 15s\n",
            "dimensions[1].collector.timeout: 30s is longer than the dimension's sampling "
            "interval (15s); use at most 15s",
        ),
        (
            "- name: c\n  collector: {type: http, url: 'http://x/', query: a, timeout: 2m}\n",
            "dimensions[1].collector.timeout: 120s is longer than the dimension's sampling "
            "interval (60s); use at most 60s",
        ),
        (
            "- name: c\n  collector: {type: system, metric: net_sent_bytes}\n  aggregate: avg\n",
            "dimensions[1].aggregate: avg needs levels, but this collector yields increments; use sum",
        ),
        (
            "- name: c\n  collector: {type: system, metric: net_sent_bytes}\n  aggregate: integral\n",
            "dimensions[1].aggregate: integral needs levels",
        ),
        (
            "- name: c\n  collector: {type: system, metric: net_sent_bytes, counter: true}\n",
            'dimensions[1].collector.counter: "system" already yields increments; remove counter: true',
        ),
        (
            "- name: ''\n  collector: {type: system, metric: users}\n",
            "dimensions[1].name: expected 1 to 255 characters; found 0",
        ),
    ],
)
def test_dimension_errors_name_the_key(tmp_path: Path, dimension: str, expected: str) -> None:
    assert expected in dim_error(tmp_path, dimension)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- a\n- b\n", "expected a mapping at the top; found a list"),
        ("just words\n", 'expected a mapping at the top; found "just words"'),
        ("dimensions: []\n", "product_code: required key is missing"),
        (f"product_code: {PRODUCT}\n", "dimensions: required key is missing"),
        (f"product_code: {PRODUCT}\ndimensions: []\n", "dimensions: expected at least 1 item(s)"),
        (
            "product_code: 'has spaces'\ndimensions: []\n",
            'product_code: "has spaces" is not valid: use the product code from the listing',
        ),
        (
            "product_code: " + "a" * 256 + "\ndimensions: []\n",
            "product_code: expected 1 to 255 characters; found 256",
        ),
    ],
)
def test_whole_file_errors(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "product_code: x\ndimensions:\n  - name: [unclosed\n")
    assert msg.startswith(f"{tmp_path / 'c.yaml'}:4:1: YAML syntax error")


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + f"product_code: {PRODUCT}\n")
    assert f"{tmp_path / 'c.yaml'}:6:1: YAML syntax error" in msg
    assert 'duplicate key "product_code"' in msg


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        config.load(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"product_code: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CI runs as root, which reads any file, so the refusal is simulated at the one call.
    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError, match="permission denied; run as a user that can read it"):
        config.load(tmp_path / "secret.yaml")


def test_config_path_resolution(tmp_path: Path) -> None:
    assert config.resolve_path("a.yaml", {"METERING_AGENT_CONFIG": "b.yaml"}) == Path("a.yaml")
    assert config.resolve_path(None, {"METERING_AGENT_CONFIG": "b.yaml"}) == Path("b.yaml")
    assert config.resolve_path(None, {}) == Path("/etc/metering-agent/config.yaml")


def test_float_scale_keeps_its_decimal_spelling(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE + "    scale: 0.1\n")
    assert cfg.dimensions[0].scale == Decimal("0.1")


def test_json_schema_is_generated_from_the_loader_tables() -> None:
    schema = config.json_schema(Registry())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["product_code", "dimensions"]
    assert schema["additionalProperties"] is False
    dim = schema["properties"]["dimensions"]["items"]
    assert set(dim["properties"]) == set(config.DIMENSION_FIELDS)
    variants = {
        v["properties"]["type"]["const"]: v for v in dim["properties"]["collector"]["oneOf"]
    }
    assert set(variants) >= {"http", "log", "system"}
    system = variants["system"]
    assert set(variants["log"]["required"]) == {"type", "path", "pattern"}
    assert "cpu_count" in system["properties"]["metric"]["enum"]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "product_code: [\n",
        f"product_code: {PRODUCT}\ndimensions: [{{name: a, collector: {{type: nope}}}}]\n",
    ],
)
@pytest.mark.parametrize("command", [["check"], ["check", "--offline"], ["sample"]])
def test_cli_bad_config_exits_78_with_one_line(
    tmp_path: Path, text: str, command: list[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = run_cli(*command, "-c", str(path))
    assert result.returncode == EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"metering-agent: {path}") or "dimensions[0]" in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_missing_config_via_env_names_the_variable(tmp_path: Path) -> None:
    result = run_cli("check", "--offline", env={"METERING_AGENT_CONFIG": str(tmp_path / "x.yaml")})
    assert result.returncode == EX_CONFIG
    assert "METERING_AGENT_CONFIG" in result.stderr


def test_every_collector_has_a_timeout_no_longer_than_its_interval(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        dims="""
      - name: a
        collector: {type: system, metric: users}
      - name: b
        collector: {type: system, metric: users}
        interval: 5s
      - name: c
        collector: {type: http, url: 'http://127.0.0.1/', query: n, timeout: 3s}
    """,
    )
    assert [d.collector.options["timeout"] for d in cfg.dimensions] == [10, 5, 3]
