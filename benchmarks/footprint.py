"""Footprint of the real daemon beside a baseline revision's: memory, CPU per sampling round,
wake-ups, start-up time to the first sample.

The baseline revision (`--baseline`, default cbe4420) is checked out into a temporary `git
worktree` (removed at the end); both agents run with this interpreter (one venv has every
dependency of both) and `PYTHONPATH` pointing at their own checkout, alternately (A B A B ...), with
the same config: three dimensions (system, log, http) at a 1 s interval. The machine is shared, so
each figure is the median over `--runs` (with the range), and the ratio is this / baseline.

Each run of an agent is two runs of `metering-agent run`:
- real clock: start-up to the first sample committed, memory, CPU per round, wake-ups per round;
- wall clock shifted by libfaketime to `--lead` s before an hour boundary, so the run crosses it and
  sends the sealed hour to an emulator (one per run): memory during a send, and CPU per round again.
  Every clock read costs more under libfaketime (the library is called for each), so the gap between
  the two CPU figures shows how many clock reads a round makes.
Meanwhile the benchmark samples, every 0.25 s:
- memory as PSS summed over the agent's processes (/proc/PID/smaps_rollup; pages a forked child
  shares are not counted twice), split into "between sends" (the daemon alone; median of both runs)
  and "during a send" (daemon + sender child);
- the daemon's CPU time (user + system) and its context switches summed over its threads
  (/proc/PID/task/*/status: each is a thread waking up), over the longest window with no child,
  divided by its seconds (one round per second).
`--labelled` adds a real-clock run of each with one labelled log dimension, `(?P<tenant>...)`, fed
lines of 1,000 tenants and billed by allocations (a revision without labels shows "-").

    python benchmarks/footprint.py [--baseline cbe4420] [--runs 3] [--seconds 40] [--lead 15]
                                   [--labelled]

Targets: issue "Operator experience and footprint": steady memory <= 40 MiB, CPU <= 5 ms per round
of three dimensions, first sample within 1 s; issue 14: < 30 MiB with the labelled dimension;
issue 22: no heavier than cbe4420 (<= 25 MiB, <= 2.0 ms per round, <= 10 ms under libfaketime).
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
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import libfaketime
import psutil

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


def alive(child: psutil.Process) -> bool:
    """A child that still runs: an exited sender the daemon has not reaped yet (it reaps at its
    next send tick) is a zombie, with no memory and no CPU."""
    try:
        return child.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def switches(pid: int) -> tuple[int, int]:
    """(context switches summed over the process's threads, its threads): each voluntary switch
    is a thread going to sleep, so their count per second is the process's wake-ups."""
    total = threads = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for task in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except OSError:
            continue
        threads += 1
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total, threads


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


def measure(checkout: Path, config: Path, work: Path, seconds: float, offset: int | None) -> dict:
    """Run `checkout`'s agent for `seconds` against its own emulator; with `offset`, under
    libfaketime shifted by that much."""
    emulator = Emulator(Settings(product_codes={PRODUCT}))
    url = emulator.serve(0)
    config.write_text(config.read_text().replace("EMULATOR_URL", url))
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(checkout),
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
        agent_log.write(f"--- {checkout} offset {offset}\n")
        agent_log.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "-c", str(config), "--log-level", "warning"],
            env=env, stdout=agent_log, stderr=subprocess.STDOUT, cwd=checkout,
        )  # fmt: skip
    first = None
    while first is None and time.time() - started < 10 and proc.poll() is None:
        if first_sample_time(state / "ledger.db"):
            first = time.time() - started
        time.sleep(0.005)
    between: list[int] = []
    during: list[int] = []
    marks: list[tuple[float, float, float, bool]] = []  # wall, cpu s, switches, child present
    threads = 0
    try:
        daemon = psutil.Process(proc.pid)
        while time.time() < started + seconds and proc.poll() is None:
            children = [c for c in daemon.children(recursive=True) if alive(c)]
            times = daemon.cpu_times()
            count, threads = switches(proc.pid)
            total = pss_kib(proc.pid) + sum(pss_kib(c.pid) for c in children)
            (during if children else between).append(total)
            marks.append((time.time(), times.user + times.system, count, bool(children)))
            time.sleep(0.25)
    except psutil.NoSuchProcess:
        pass
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    records = emulator.records()
    emulator.stop()
    window, cpu, woke = quiet(marks, started)
    return {
        "first": first,
        "between": between,
        "during": during,
        "window": window,
        "cpu_ms": cpu / window * 1000 if window else None,  # one round per second
        "wakeups": woke / window if window else None,
        "threads": threads,
        "records": len(records),
    }


def quiet(
    marks: list[tuple[float, float, float, bool]], started: float
) -> tuple[float, float, float]:
    """(seconds, cpu seconds, context switches) of the longest stretch with no child process,
    after start-up."""
    best = (0.0, 0.0, 0.0)
    run: list[tuple[float, float, float, bool]] = []
    for mark in [*marks, (float("inf"), 0.0, 0.0, True)]:
        if mark[0] < started + 3:
            continue
        if run and (mark[3] or mark[0] - run[-1][0] > 1.0):
            if run[-1][0] - run[0][0] > best[0]:
                best = (run[-1][0] - run[0][0], run[-1][1] - run[0][1], run[-1][2] - run[0][2])
            run = []
        if not mark[3]:
            run.append(mark)
    return best


def writer(log: Path, stop: threading.Event, lines: Callable[[int], str]) -> None:
    """Append a batch of lines every 50 ms until `stop`."""
    n = 0
    with open(log, "a") as f:
        while not stop.wait(0.05):
            n += 1
            f.write(lines(n))
            f.flush()


def tenants(n: int) -> str:
    """200 lines cycling through 1,000 tenants: every tenant in every 1 s reading."""
    return "".join(
        f'10.0.0.1 "GET /api/v1/orders tenant=t{(n * 200 + i) % 1000:04d}" 200\n'
        for i in range(200)
    )


def config_text(work: Path, log: Path, stats_url: str) -> str:
    return f"""product_code: {PRODUCT}
state_dir: {work / "state"}
metering: {{endpoint_url: "EMULATOR_URL", send_window: 0}}
sampling: {{interval: 1}}
dimensions:
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
  - name: api_requests
    collector: {{type: log, path: {log}, pattern: '"GET /api/'}}
  - name: active_users
    collector: {{type: http, url: "{stats_url}", query: users.active}}
"""


def labelled_text(work: Path, log: Path) -> str:
    return f"""product_code: {PRODUCT}
state_dir: {work / "state"}
metering: {{endpoint_url: "EMULATOR_URL", send_window: 0}}
sampling: {{interval: 1}}
dimensions:
  - name: api_requests
    collector: {{type: log, path: {log}, pattern: '"GET /api/\\S* tenant=(?P<tenant>\\w+)'}}
    allocations: {{tags: {{Tenant: tenant}}}}   # labels are kept only where allocations bill them
"""


def median_of(values: list[float | None], scale: float = 1.0, digits: int = 1) -> tuple[str, float]:
    """'median (min-max)' of the values present, and the median (nan: none)."""
    present = [v * scale for v in values if v is not None]
    if not present:
        return "-", float("nan")
    mid = statistics.median(present)
    text = f"{mid:.{digits}f}"
    if len(present) > 1:
        text += f" ({min(present):.{digits}f}-{max(present):.{digits}f})"
    return text, mid


def worktree(rev: str, where: Path) -> Path:
    path = where / f"baseline-{rev}"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return path


def describe(checkout: Path) -> str:
    rev = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    dirty = subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return rev + ("+changes" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="cbe4420", help="revision to compare with")
    parser.add_argument("--runs", type=int, default=3, help="runs of each agent, alternating")
    parser.add_argument("--seconds", type=float, default=40.0, help="length of each run")
    parser.add_argument("--lead", type=float, default=15.0, help="seconds before the boundary")
    parser.add_argument("--labelled", action="store_true", help="add the 1,000-tenant run")
    args = parser.parse_args()

    stats = ThreadingHTTPServer(("127.0.0.1", 0), Stats)
    threading.Thread(target=stats.serve_forever, daemon=True).start()
    stats_url = f"http://127.0.0.1:{stats.server_address[1]}/"
    work = Path(tempfile.mkdtemp(prefix="footprint."))
    log, tenants_log = work / "access.log", work / "tenants.log"
    log.write_text("")
    tenants_log.write_text("")
    stop = threading.Event()
    line = '10.0.0.1 - - "GET /api/v1/orders HTTP/1.1" 200 512\n'
    threading.Thread(target=writer, args=(log, stop, lambda n: line), daemon=True).start()
    if args.labelled:
        threading.Thread(target=writer, args=(tenants_log, stop, tenants), daemon=True).start()

    base = worktree(args.baseline, work)
    agents = [(f"{args.baseline} (A)", base), (f"{describe(ROOT)} (B)", ROOT)]
    results: dict[str, list[dict]] = {name: [] for name, _ in agents}
    try:
        for run in range(args.runs):
            for kind in ("real", "faketime", *(("labelled",) if args.labelled else ())):
                for name, checkout in agents:  # A B, A B, ...
                    config = work / f"{kind}.yaml"
                    if kind == "labelled":
                        tenants_log.write_text("")  # each run reads the same 1,000 tenants
                        config.write_text(labelled_text(work, tenants_log))
                    else:
                        config.write_text(config_text(work, log, stats_url))
                    offset = None
                    if kind == "faketime":
                        now = time.time()
                        offset = int(now - now % 3600 - args.lead - now)
                    result = measure(checkout, config, work, args.seconds, offset)
                    result.update(kind=kind, run=run)
                    results[name].append(result)
                    print(
                        f"run {run + 1}/{args.runs} {kind:<8} {name:<22} "
                        f"PSS {statistics.median(result['between'] or [0]) / 1024:5.1f} MiB, "
                        f"CPU {result['cpu_ms'] or float('nan'):5.2f} ms/round, "
                        f"{result['wakeups'] or float('nan'):5.1f} switches/s, "
                        f"{result['threads']} threads, {result['records']} records",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        stop.set()
        stats.shutdown()
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False
        )

    def per_run(name: str, kind: str, key: str) -> list[Any]:
        return [r[key] for r in results[name] if r["kind"] == kind]

    def pss(name: str, kinds: tuple[str, ...], pick: Callable[[list[int]], float]) -> list[Any]:
        out = []
        for run in range(args.runs):
            samples = [
                s for r in results[name] if r["run"] == run and r["kind"] in kinds
                for s in r["between"]
            ]  # fmt: skip
            out.append(pick(samples) if samples else None)
        return out

    def peak(name: str) -> list[Any]:
        return [max(r["during"]) if r["during"] else None for r in results[name]]

    mib = 1 / 1024
    rows: list[tuple[str, Callable[[str], list[Any]], float, int, str]] = [
        ("start-up to first sample committed (s)", lambda n: per_run(n, "real", "first"),
         1, 2, "<= 1 s"),
        ("memory between sends, PSS median (MiB)",
         lambda n: pss(n, ("real", "faketime"), statistics.median), mib, 1, "<= 25 MiB"),
        ("memory between sends, PSS max (MiB)",
         lambda n: pss(n, ("real", "faketime"), max), mib, 1, ""),
        ("memory during a send, peak (MiB)", peak, mib, 1, ""),
        ("CPU per round, real clock (ms)", lambda n: per_run(n, "real", "cpu_ms"),
         1, 2, "<= 2.0 ms"),
        ("CPU per round, libfaketime (ms)", lambda n: per_run(n, "faketime", "cpu_ms"),
         1, 2, "<= 10 ms"),
        ("context switches per round, real clock", lambda n: per_run(n, "real", "wakeups"),
         1, 1, ""),
        ("threads of the daemon", lambda n: per_run(n, "real", "threads"), 1, 0, ""),
        ("records accepted per faketime run", lambda n: per_run(n, "faketime", "records"),
         1, 0, ""),
    ]  # fmt: skip
    if args.labelled:
        rows += [
            ("labelled, 1,000 tenants: PSS median (MiB)",
             lambda n: pss(n, ("labelled",), statistics.median), mib, 1, "< 30 MiB"),
            ("labelled, 1,000 tenants: CPU per round (ms)",
             lambda n: per_run(n, "labelled", "cpu_ms"), 1, 2, ""),
        ]  # fmt: skip
    (a, _), (b, _) = agents
    print(f"state and logs in {work}; {args.runs} runs of {args.seconds:.0f} s each, alternating")
    print(f"{'':<42} {a:>22} {b:>22} {'B/A':>6}   target")
    for title, values, scale, digits, target in rows:
        text_a, mid_a = median_of(values(a), scale, digits)
        text_b, mid_b = median_of(values(b), scale, digits)
        ratio = f"{mid_b / mid_a:.2f}" if mid_a and mid_a == mid_a and mid_b == mid_b else "-"
        print(f"{title:<42} {text_a:>22} {text_b:>22} {ratio:>6}   {target}")


if __name__ == "__main__":
    main()
