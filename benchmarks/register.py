"""What RegisterUsage at start costs `run`: start-up time and the daemon's memory, with and without
`register_usage:` (public key verification on), against the in-process emulator.

For each case it starts the real `metering-agent run`, times process start -> first sample in the
ledger, then samples the daemon's PSS (/proc/PID/smaps_rollup) for a few seconds and reads its
/proc/PID/maps: the daemon must not have boto3/botocore or cryptography loaded (the RegisterUsage
child had them, and exited).

    python benchmarks/register.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from agent.emulator import Emulator, Settings

PRODUCT = "abcd1234efgh5678ijkl90mn"
ROOT = Path(__file__).resolve().parent.parent


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def first_sample(ledger: Path) -> bool:
    if not ledger.exists():
        return False
    try:
        with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
            return bool(db.execute("SELECT count(*) FROM samples").fetchone()[0])
    except sqlite3.Error:
        return False


def loaded(pid: int, *names: str) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [n for n in names if f"/{n}/" in maps]


def case(url: str, work: Path, key_pem: bytes | None, seconds: float) -> dict[str, object]:
    work.mkdir()
    section = ""
    if key_pem is not None:
        key = work / "key.pem"
        key.write_bytes(key_pem)
        section = f"register_usage: {{public_key_version: 1, public_key: {key}}}\n"
    config = work / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {work / "state"}
            metering: {{endpoint_url: "{url}", send_window: 0}}
            sampling: {{interval: 1s}}
            dimensions:
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
            """
        )
        + section
    )
    env = dict(os.environ, AWS_EC2_METADATA_SERVICE_ENDPOINT=url)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        env=env,
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not first_sample(work / "state" / "ledger.db"):
            if proc.poll() is not None:
                raise SystemExit(f"run exited {proc.returncode}")
            time.sleep(0.02)
        startup = time.monotonic() - started
        pss = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pss.append(pss_kib(proc.pid))
            time.sleep(0.25)
        modules = loaded(proc.pid, "cryptography", "botocore", "boto3")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {
        "startup_s": round(startup, 2),
        "pss_mib": round(statistics.median(pss) / 1024, 1),
        "daemon_loaded": modules,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    emulator = Emulator(Settings(product_codes={PRODUCT}))
    url = emulator.serve(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        plain = case(url, base / "plain", None, args.seconds)
        registered = case(url, base / "register", emulator.public_key_pem(), args.seconds)
    print(f"without register_usage:            {plain}")
    print(f"with register_usage + public_key:  {registered}")
    emulator.stop()


if __name__ == "__main__":
    main()
