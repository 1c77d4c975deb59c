"""Issue 25, `sample`: what a seller asks of it. Oracles: the machine's CPU count (psutil), the
YAML text of the scale, and Python's `re` run over a real file whose lines the test wrote."""

from __future__ import annotations

import random
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import psutil

from agent.aggregate import to_quantity
from agent.errors import EX_OK
from tests.conftest import PRODUCT, ConfigWriter, run_cli

TINY = "0.000000000931322574615478515625"  # 2^-30: bytes to GiB


def test_an_integral_dimension_says_what_an_hour_at_this_level_bills(
    write_config: ConfigWriter, tmp_path: Path
) -> None:
    path = write_config(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\ndimensions:\n"
        "  - name: vcpu_hours\n    collector: {type: system, metric: cpu_count}\n"
        "    aggregate: integral\n    decimals: 3\n"
        "  - name: gib_hours\n    collector: {type: system, metric: cpu_count}\n"
        f"    aggregate: integral\n    decimals: 6\n    scale: {TINY}\n"
    )
    result = run_cli("sample", "-c", str(path))
    assert result.returncode == EX_OK, result.stderr
    vcpus, gib = result.stdout.splitlines()[:2]
    cpus = psutil.cpu_count(logical=True)
    assert vcpus.startswith(f"vcpu_hours {cpus} ")
    assert vcpus.endswith(f"an hour at this level bills {cpus}.000")
    assert f"(scale {TINY})" in gib  # every digit, not `scale 0`
    hour = to_quantity(Decimal(cpus), Decimal(TINY), "nearest", 6).text
    assert gib.endswith(f"an hour at this level bills {hour}")
    assert "billed units 0 " not in gib  # a tiny but nonzero amount is shown as one


def test_from_beginning_tests_the_pattern_against_the_lines_in_the_file(
    write_config: ConfigWriter, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    huge = "x" * 65536  # a 64 KiB label value
    names = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne")
    lines = [f'10.0.0.{k} "GET /api/v1/orders" tenant={names[k]} 200'
             for k in range(7) for _ in range((k + 1) * 10)]  # fmt: skip
    lines += [f"10.0.0.{i} POST /login 302" for i in range(100)]
    lines += [f'10.0.0.9 "GET /api/v1/orders" tenant={huge} 200'] * 79
    random.Random(25).shuffle(lines)
    lines.insert(0, f'10.0.0.9 "GET /api/v1/orders" tenant={huge} 200')  # the first example
    log.write_text("\n".join(lines) + "\nhalf a line, no newline yet")
    pattern = r'"GET /api/\S+" tenant=(?P<tenant>\S+)'
    path = write_config(
        f"product_code: {PRODUCT}\nstate_dir: {tmp_path / 'state'}\ndimensions:\n"
        f"  - name: api\n    collector: {{type: log, path: {log}, pattern: '{pattern}'}}\n"
    )
    plain = run_cli("sample", "-c", str(path))
    assert plain.returncode == EX_OK and "pattern test" not in plain.stdout
    result = run_cli("sample", "--from-beginning", "-c", str(path))
    assert result.returncode == EX_OK, result.stderr
    out = result.stdout.splitlines()
    assert out[0].startswith("api 0 ")  # start_at: end reads nothing on the first reading

    regex = re.compile(pattern)
    hits = [line for line in lines if regex.search(line)]
    (summary,) = [line for line in out if "pattern test" in line]
    assert f"{len(lines):,} lines, {len(hits):,} matching (count {len(hits)})" in summary
    assert "1 last line(s) without a newline not counted" in summary
    matches = [line.split("matches:", 1)[1].strip() for line in out if "matches:" in line]
    others = [line.split("does not:", 1)[1].strip() for line in out if "does not:" in line]
    assert len(matches) == 3 and len(others) == 3
    assert matches[0] == f"{lines[0][:120]}... ({len(lines[0].encode()):,} bytes)"
    assert all(regex.search(m) and m in lines for m in matches[1:])
    assert all(not regex.search(o) and o in lines for o in others)

    (labels,) = [line.strip() for line in out if line.strip().startswith("label tenant:")]
    tenants = Counter(regex.search(line)["tenant"] for line in hits)
    ranked = sorted(tenants.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    cut = {huge: "x" * 60 + "... (65,536 characters)"}
    expected = ", ".join(f"{cut.get(t, t)} {n}" for t, n in ranked)
    assert labels == f"label tenant: {expected} (top 5 of {len(tenants)})"
    # nothing printed is long: the 64 KiB value is cut wherever it shows
    assert max(len(line) for line in out) < 300
