"""Fleet simulation: N instances in one account and region sending through MeterUsage's
10 requests/s token bucket, in virtual time, with the agent's real schedule and retry code.

What is the agent's own: the per-instance send slot (`windows.send_offset`, a hash of the instance
id) at which the first send of an hour starts exactly, the send tick (`daemon.SEND_TICK`) on which
later retries start, the pass that waits out short backoffs itself
(`send_pass.PATIENCE`), capped exponential backoff with full jitter (`policy.backoff`), and oldest
hour first, one dimension after another. What is modelled: a call takes `--latency` seconds, a
sender child takes `--spawn` seconds to start, and the service's bucket holds 10 tokens refilled at
10/s (the emulator's `TokenBucket`, on virtual time). Two consecutive hours are simulated
so the second hour's sends meet any backlog of the first.

Prints, per send_window: p50/p99/max delay from the end of the hour to acceptance, throttled calls,
calls per accepted record, and whether every record was accepted once within 6 hours.

The SaaS case (`--case saas`): one seller's agent bills `--customers` customers x `--dimensions`
an hour through BatchMeterUsage. It runs the agent's own code: the real ledger (in a temporary
directory) holds the sealed records, `modes.saas.BatchSender` plans, paces and settles them, and
the emulator's BatchMeterUsage rules and 10 requests/s token bucket answer in process, all on one
virtual clock. What is modelled: a call takes `--latency` seconds, a send pass ends after
`modes.saas.PASS_TIME` and the next starts on the daemon's send tick plus `--spawn` seconds. Prints
calls, records, the time from the hour's end until its last record was accepted, p50/p99 delay,
throttled calls, and whether every record was accepted once within the 24 h window.

    python benchmarks/fleet.py [--instances 10000] [--dimensions 3] [--windows 0,600,3600]
    python benchmarks/fleet.py --case saas [--customers 100000] [--dimensions 3]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.aggregate import Quantity
from agent.clock import Clock
from agent.config import Config
from agent.config import load as load_config
from agent.daemon.daemon import SEND_TICK
from agent.emulator import Emulator, ServiceError, Settings, TokenBucket
from agent.ledger import Ledger
from agent.modes.saas import BatchSender
from agent.sending.outcomes import BatchOutcome, Outcome, batch_outcome, classify
from agent.sending.policy import backoff
from agent.sending.send_pass import PATIENCE
from agent.windows import SAAS_EXPIRY, send_offset

HOUR = 3600
SIX_HOURS = 6 * HOUR


@dataclass
class Instance:
    id: str
    offset: float
    pending: list[tuple[int, int]] = field(default_factory=list)  # (hour end, dimension)
    failures: int = 0
    backoff_until: float = 0.0
    running: bool = False


@dataclass
class Result:
    window: int
    delays: list[float]
    calls: int
    throttled: int
    accepted: int
    expected: int
    duplicates: int
    wall: float


def next_tick(t: float) -> float:
    return math.ceil(t / SEND_TICK) * SEND_TICK


def simulate(
    instances: int, dims: int, window: int, latency: float, spawn: float, seed: int
) -> Result:
    rng = random.Random(seed)
    fleet = [Instance(f"i-{rng.getrandbits(68):017x}", 0.0) for _ in range(instances)]
    for inst in fleet:
        inst.offset = send_offset(inst.id, window)
    bucket = TokenBucket(rate=10.0, burst=10.0)
    events: list[tuple[float, int, str, int]] = []  # time, seq, kind, instance index
    seq = 0

    def push(t: float, kind: str, i: int) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, i))

    for hour_end in (HOUR, 2 * HOUR):  # the ends of two consecutive hours
        for i in range(len(fleet)):
            push(hour_end, "seal", i)
    accepted: dict[tuple[int, int, int], float] = {}
    duplicates = calls = throttled = 0
    run_deadline: dict[int, float] = {}
    started = time.perf_counter()
    while events:
        now, _, kind, i = heapq.heappop(events)
        inst = fleet[i]
        if kind == "seal":
            inst.pending += [(int(now), d) for d in range(dims)]
            due = max(now + inst.offset, inst.backoff_until)
            if not inst.running:
                push(due, "tick", i)  # the daemon schedules the slot itself (_schedule_send)
            continue
        if kind == "tick":
            if inst.running or not inst.pending:
                continue
            due = min(h + inst.offset for h, _ in inst.pending)
            if now < max(due, inst.backoff_until):
                push(next_tick(max(due, inst.backoff_until)), "tick", i)
                continue
            inst.running = True
            run_deadline[i] = now + spawn + PATIENCE
            push(now + spawn, "call", i)
            continue
        # kind == "call": the oldest pending hour, first dimension
        hour_end, dim = inst.pending[0]
        calls += 1
        if bucket.take(now):
            key = (i, hour_end, dim)
            if key in accepted:
                duplicates += 1
            accepted[key] = now + latency - hour_end
            inst.pending.pop(0)
            inst.failures = 0
            inst.backoff_until = 0.0
            if inst.pending and now + latency < run_deadline[i]:
                push(now + latency, "call", i)
            else:
                inst.running = False
                if inst.pending:
                    push(next_tick(now + latency), "tick", i)
            continue
        throttled += 1
        inst.failures += 1
        delay = backoff(inst.failures, rng)
        inst.backoff_until = now + latency + delay
        if inst.backoff_until < run_deadline[i]:
            push(inst.backoff_until, "call", i)  # the pass waits it out itself
        else:
            inst.running = False
            push(next_tick(inst.backoff_until), "tick", i)
    return Result(
        window=window,
        delays=sorted(accepted.values()),
        calls=calls,
        throttled=throttled,
        accepted=len(accepted),
        expected=instances * dims * 2,
        duplicates=duplicates,
        wall=time.perf_counter() - started,
    )


class VirtualClock(Clock):
    """The simulation's one clock: the agent's time, sleeps and the emulator's monotonic time."""

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t

    def time(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


class InProcessClient:
    """The emulator's BatchMeterUsage called in process with the body botocore would send
    (Timestamps as epoch seconds); each call takes `latency` of virtual time."""

    def __init__(self, emulator: Emulator, clock: VirtualClock, latency: float) -> None:
        self.emulator, self.clock, self.latency = emulator, clock, latency
        self.throttled = 0

    def batch_meter_usage(
        self, records: Sequence[Mapping[str, Any]], product_code: str | None
    ) -> BatchOutcome:
        body: dict[str, Any] = {
            "UsageRecords": [
                {k: int(v.timestamp()) if isinstance(v, datetime) else v for k, v in r.items()}
                for r in records
            ]
        }
        if product_code is not None:
            body["ProductCode"] = product_code
        try:
            resp = self.emulator.call("BatchMeterUsage", body, "AKIDFLEET", None)
        except ServiceError as e:
            self.throttled += e.code == "ThrottlingException"
            self.clock.sleep(self.latency)
            return BatchOutcome(Outcome(classify(e.code, e.status), code=e.code, message=e.message))
        self.clock.sleep(self.latency)
        return batch_outcome(records, resp)

    def probe_batch(self, product_code: str) -> Outcome:
        return Outcome("dryrun_ok")

    def meter_usage(self, h: Any) -> Outcome:
        raise NotImplementedError("SaaS mode sends no MeterUsage")

    def dry_run(
        self, product_code: str, dimension: str, decimals: int | None, now: float
    ) -> Outcome:
        raise NotImplementedError("SaaS mode probes with an empty BatchMeterUsage")


def saas_config(tmp: Path, dims: int) -> Config:
    """A SaaS config of `dims` log dimensions labelled by customer (what the seller writes)."""
    (tmp / "usage.log").touch()
    lines = [
        "product_code: fleetsaasproduct00000000",
        f"state_dir: {tmp}",
        "mode: saas",
        "metering: {region: us-east-1, send_window: 0}",
        "dimensions:",
    ]
    for d in range(dims):
        lines.append(f"  - name: dim{d}")
        lines.append(
            f"    collector: {{type: log, path: {tmp / 'usage.log'}, "
            f"pattern: 'customer=(?P<customer>\\S+) d{d}'}}"
        )
    (tmp / "config.yaml").write_text("\n".join(lines) + "\n")
    return load_config(tmp / "config.yaml")


@dataclass
class SaasResult:
    records: int
    calls: int
    passes: int
    throttled: int
    accepted: int
    billed: int
    delays: list[float]
    wall: float


def simulate_saas(customers: int, dims: int, latency: float, spawn: float, seed: int) -> SaasResult:
    """One hour of `customers` x `dims` sealed records sent by the agent's BatchSender."""
    hour = 1_800_000_000  # an hour boundary
    with tempfile.TemporaryDirectory() as tmp:
        config = saas_config(Path(tmp), dims)
        ledger = Ledger(Path(tmp))
        started = time.perf_counter()
        with ledger.transaction() as db:
            for c in range(customers):
                label = f"customer-{c:06d}"
                db.execute(
                    "INSERT INTO customers (label, account_id, license_arn, added_at) "
                    "VALUES (?, ?, ?, 0)",
                    (label, f"{100_000_000_000 + c}",
                     f"arn:aws:license-manager::294406891311:license:l-{c:012d}"),
                )  # fmt: skip
                for d in range(dims):
                    ledger.insert_sealed(
                        db, dimension=f"dim{d}", hour=hour, product_code=config.product_code,
                        quantity=Quantity(c % 1000 + d), timestamp=hour + 3599,
                        client_token=f"{c}-{d}", samples=60, raw="0", sealed_at=hour + 3600,
                        next_attempt=hour + 3600, customer=label, keep_samples=True,
                    )  # fmt: skip
        clock = VirtualClock(hour + 3600)  # the seal pass at the hour's end
        emulator = Emulator(Settings(), clock)
        client = InProcessClient(emulator, clock, latency)
        rng = random.Random(seed)
        passes = calls = 0
        while ledger.pending_records(limit=1) and clock.t < hour + 3600 + SAAS_EXPIRY:
            clock.sleep(spawn)  # the send child starts (boto3 imported)
            sender = BatchSender(ledger, config, client, clock, rng)
            sender.run()
            passes, calls = passes + 1, calls + sender.calls
            clock.t = next_tick(clock.t)  # the daemon reaps it on a send tick, starts the next
        sent = ledger.hours(states=("sent",))
        delays = sorted(h.done_at - (hour + 3600) for h in sent if h.done_at is not None)
        records = len(ledger.hours())
        billed = len(emulator.records())
        ledger.close()
    return SaasResult(records, calls, passes, client.throttled, len(sent), billed, delays,
                      time.perf_counter() - started)  # fmt: skip


def run_saas(args: argparse.Namespace) -> None:
    r = simulate_saas(args.customers, args.dimensions, args.latency, args.spawn, args.seed)
    p99 = r.delays[int(len(r.delays) * 0.99) - 1]
    ok = r.accepted == r.records == r.billed and r.delays[-1] < SAAS_EXPIRY
    print(
        f"SaaS: {args.customers:,} customers x {args.dimensions} dimensions, 1 hour, "
        f"BatchMeterUsage at 10 requests/s, latency {args.latency}s, sender start {args.spawn}s"
    )
    print(
        f"{'records':>9} {'calls':>7} {'passes':>6} {'last':>7} {'p50':>7} {'p99':>7} "
        f"{'throttled':>9} {'all<24h':>7} {'billed':>9} {'wall':>6}"
    )
    print(
        f"{r.records:>9,} {r.calls:>7,} {r.passes:>6} {r.delays[-1]:>6.0f}s "
        f"{statistics.median(r.delays):>6.0f}s {p99:>6.0f}s {r.throttled:>9,} "
        f"{'yes' if ok else 'NO':>7} {r.billed:>9,} {r.wall:>5.0f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("instance", "saas", "both"), default="instance")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--customers", type=int, default=100_000, help="SaaS case")
    parser.add_argument("--dimensions", type=int, default=3)
    parser.add_argument("--windows", default="0,600,1800,3000,3300,3600")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per MeterUsage call")
    parser.add_argument("--spawn", type=float, default=0.8, help="seconds to start a sender")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.case in ("saas", "both"):
        run_saas(args)
    if args.case == "saas":
        return
    print(
        f"{args.instances:,} instances x {args.dimensions} dimensions, 2 hours, 10 requests/s, "
        f"latency {args.latency}s, sender start {args.spawn}s"
    )
    header = (
        f"{'window':>7} {'p50':>8} {'p99':>8} {'max':>8} {'throttled':>10} "
        f"{'calls/rec':>9} {'all<6h':>7} {'dups':>5}"
    )
    print(header)
    for window in (int(w) for w in args.windows.split(",")):
        r = simulate(args.instances, args.dimensions, window, args.latency, args.spawn, args.seed)
        p50 = statistics.median(r.delays)
        p99 = r.delays[int(len(r.delays) * 0.99) - 1]
        ok = r.accepted == r.expected and r.delays[-1] < SIX_HOURS
        print(
            f"{window:>6}s {p50:>7.0f}s {p99:>7.0f}s {r.delays[-1]:>7.0f}s {r.throttled:>10,} "
            f"{r.calls / r.accepted:>9.2f} {'yes' if ok else 'NO':>7} {r.duplicates:>5}"
        )


if __name__ == "__main__":
    main()
