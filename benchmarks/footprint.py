"""Footprint of the real daemon: memory, CPU per sampling round, start-up time to the first sample.

Runs `metering-agent run` with three dimensions (system, log, http) at a 1 s interval, its wall
clock shifted by libfaketime to shortly before an hour boundary, so the run crosses the boundary
and sends the sealed hour to the in-process emulator. Meanwhile it samples, every 0.25 s:
- memory as PSS summed over the agent's processes (/proc/PID/smaps_rollup; pages a forked child
  shares are not counted twice), split into "between sends" (the daemon alone) and "during a send"
  (daemon + sender child);
- the daemon's CPU time (user + system), over a window with no send, divided by the rounds in it.
Start-up time is from process start to the first sample committed to the ledger.
A third run (real clock) has one labelled log dimension, `(?P<tenant>...)`, fed lines of 1,000
tenants: its steady memory with every tenant's breakdown stored with each sample.

    python benchmarks/footprint.py [--seconds 50] [--lead 25]

Targets (issue "Operator experience and footprint"): steady memory <= 40 MiB, CPU <= 5 ms per
round of three dimensions, first sample within 1 s; issue 14: steady memory < 30 MiB with one
labelled log dimension of 1,000 tenants.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import libfaketime
import psutil

from agent.clock import iso_hour
from agent.emulator import Emulator, Settings

PRODUCT = "abcd1234efgh5678ijkl90mn"
ROOT = Path(__file__).resolve().parent.parent


class Stats(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = json.dumps({"users": {"active": 7}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def first_sample_time(ledger: Path) -> float | None:
    if not ledger.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=0.05)
        try:
            row = db.execute("SELECT MIN(last_t) FROM dimension_status").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return row[0] if row and row[0] else None


def measure(url: str, config: Path, work: Path, seconds: float, offset: int | None) -> dict:
    """Run the agent for `seconds`; with `offset`, under libfaketime shifted by that much."""
    env = dict(os.environ)
    env.update(
        AWS_EC2_METADATA_SERVICE_ENDPOINT=url,
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_CONFIG_FILE="/dev/null",
    )
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(var, None)
    if offset is not None:
        lib = Path(libfaketime.__file__).parent / "vendor/libfaketime/src/libfaketime.so.1"
        env.update(LD_PRELOAD=str(lib), FAKETIME=f"{offset:+d}", FAKETIME_DONT_FAKE_MONOTONIC="1")
    state = work / "state"
    subprocess.run(["rm", "-rf", str(state)], check=True)
    started = time.time()
    with open(work / "agent.log", "a") as agent_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(config), "--log-level", "warning"],
            env=env, stdout=agent_log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    first = None
    while first is None and time.time() - started < 10:
        if first_sample_time(state / "ledger.db"):
            first = time.time() - started
        time.sleep(0.005)
    daemon = psutil.Process(proc.pid)
    between: list[int] = []
    during: list[int] = []
    marks: list[tuple[float, float, bool]] = []  # wall, daemon cpu seconds, child present
    while time.time() < started + seconds and proc.poll() is None:
        try:
            children = daemon.children(recursive=True)
            times = daemon.cpu_times()
        except psutil.NoSuchProcess:
            break
        total = pss_kib(proc.pid) + sum(pss_kib(c.pid) for c in children)
        (during if children else between).append(total)
        marks.append((time.time(), times.user + times.system, bool(children)))
        time.sleep(0.25)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return {"first": first, "between": between, "during": during, "cpu": quiet_cpu(marks, started)}


def quiet_cpu(marks: list[tuple[float, float, bool]], started: float) -> tuple[float, float]:
    """(seconds, cpu seconds) of the longest stretch with no sender child, after start-up."""
    best = (0.0, 0.0)
    run: list[tuple[float, float, bool]] = []
    for mark in [*marks, (float("inf"), 0.0, True)]:
        if mark[0] < started + 3:
            continue
        if run and (mark[2] or mark[0] - run[-1][0] > 1.0):
            if run[-1][0] - run[0][0] > best[0]:
                best = (run[-1][0] - run[0][0], run[-1][1] - run[0][1])
            run = []
        if not mark[2]:
            run.append(mark)
    return best


def measure_labelled(url: str, work: Path, seconds: float) -> dict:
    """One log dimension with a `tenant` label, fed 4,000 lines/s cycling through 1,000 tenants
    (every tenant in every reading), real clock."""
    log = work / "tenants.log"
    log.write_text("")
    stop = threading.Event()

    def writer() -> None:
        n = 0
        with open(log, "a") as f:
            while not stop.wait(0.05):
                lines = []
                for _ in range(200):
                    n += 1
                    lines.append(f'10.0.0.1 "GET /api/v1/orders tenant=t{n % 1000:04d}" 200\n')
                f.write("".join(lines))
                f.flush()

    threading.Thread(target=writer, daemon=True).start()
    config = work / "labelled.yaml"
    config.write_text(
        f"""product_code: {PRODUCT}
state_dir: {work / "state"}
metering: {{endpoint_url: "{url}", send_window: 0}}
sampling: {{interval: 1}}
dimensions:
  - name: api_requests
    collector: {{type: log, path: {log}, pattern: '"GET /api/\\S* tenant=(?P<tenant>\\w+)'}}
    allocations: {{tags: {{Tenant: tenant}}}}   # labels are kept only where allocations bill them
"""
    )
    try:
        return measure(url, config, work, seconds, None)
    finally:
        stop.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each run")
    parser.add_argument("--lead", type=float, default=15.0, help="seconds before the boundary")
    args = parser.parse_args()

    emulator = Emulator(Settings(product_codes={PRODUCT}))
    url = emulator.serve(0)
    stats = ThreadingHTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=stats.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="footprint."))
    log = work / "access.log"
    log.write_text("")
    stop_writer = threading.Event()

    def writer() -> None:
        with open(log, "a") as f:
            while not stop_writer.wait(0.05):
                f.write('10.0.0.1 - - "GET /api/v1/orders HTTP/1.1" 200 512\n')
                f.flush()

    threading.Thread(target=writer, daemon=True).start()
    stats_url = f"http://127.0.0.1:{stats.server_address[1]}/"
    config = work / "config.yaml"
    config.write_text(
        f"""product_code: {PRODUCT}
state_dir: {work / "state"}
metering: {{endpoint_url: "{url}", send_window: 0}}
sampling: {{interval: 1}}
dimensions:
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
  - name: api_requests
    collector: {{type: log, path: {log}, pattern: '"GET /api/'}}
  - name: active_users
    collector: {{type: http, url: "{stats_url}", query: users.active}}
"""
    )
    labelled = measure_labelled(url, work, args.seconds)
    # Run 1, real clock: start-up, steady memory and CPU (libfaketime itself costs ~4 ms/round).
    real = measure(url, config, work, args.seconds, None)
    # Run 2, wall clock shifted to `lead` s before an hour: the boundary, the seal, the send.
    now = time.time()
    shifted = measure(url, config, work, args.seconds, int(now - now % 3600 - args.lead - now))
    stop_writer.set()
    records = emulator.records()
    emulator.stop()
    stats.shutdown()

    seconds, cpu = real["cpu"]
    per_round_ms = cpu / seconds * 1000 if seconds else float("nan")  # one round per second
    between = real["between"] + shifted["between"]
    during = real["during"] + shifted["during"]
    rows = [
        ("start-up to first sample committed", f"{real['first']:.2f} s", "<= 1 s"),
        ("memory between sends (PSS, median)", f"{statistics.median(between) / 1024:.1f} MiB",
         "<= 40 MiB"),
        ("memory between sends (PSS, max)", f"{max(between) / 1024:.1f} MiB", ""),
        ("memory during a send (daemon + child, peak)",
         f"{max(during) / 1024:.1f} MiB" if during else "-", ""),
        ("CPU per round of 3 dimensions", f"{per_round_ms:.2f} ms",
         f"<= 5 ms ({seconds:.0f} s window, real clock)"),
        ("labelled log, 1,000 tenants: PSS median",
         f"{statistics.median(labelled['between']) / 1024:.1f} MiB", "< 30 MiB"),
        ("labelled log, 1,000 tenants: PSS max",
         f"{max(labelled['between']) / 1024:.1f} MiB", ""),
    ]  # fmt: skip
    print(f"state and logs in {work}")
    for name, value, target in rows:
        print(f"{name:<46} {value:>10}   {target}")
    hours = sorted({iso_hour(r.hour) for r in records})
    print(f"records accepted: {len(records)}, hours {', '.join(hours)}")


if __name__ == "__main__":
    main()
