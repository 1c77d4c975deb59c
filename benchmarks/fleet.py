"""Fleet simulation: N instances in one account and region sending through MeterUsage's
10 requests/s token bucket, in virtual time, with the agent's real schedule and retry code.

What is the agent's own: the per-instance send slot (`sealing.send_offset`, a hash of the instance
id) at which the first send of an hour starts exactly, the send tick (`daemon.SEND_TICK`) on which
later retries start, the pass that waits out short backoffs itself
(`sending.PATIENCE`), capped exponential backoff with full jitter (`sending.backoff`), and oldest
hour first, one dimension after another. What is modelled: a call takes `--latency` seconds, a
sender child takes `--spawn` seconds to start, and the service's bucket holds 10 tokens refilled at
10/s (the emulator's `TokenBucket`, on virtual time). Two consecutive hours are simulated
so the second hour's sends meet any backlog of the first.

Prints, per send_window: p50/p99/max delay from the end of the hour to acceptance, throttled calls,
calls per accepted record, and whether every record was accepted once within 6 hours.

    python benchmarks/fleet.py [--instances 10000] [--dimensions 3] [--windows 0,600,3600]
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import time
from dataclasses import dataclass, field

from agent.daemon import SEND_TICK
from agent.emulator import TokenBucket
from agent.sealing import send_offset
from agent.sending import PATIENCE, backoff

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--dimensions", type=int, default=3)
    parser.add_argument("--windows", default="0,600,1800,3000,3300,3600")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per MeterUsage call")
    parser.add_argument("--spawn", type=float, default=0.8, help="seconds to start a sender")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
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
