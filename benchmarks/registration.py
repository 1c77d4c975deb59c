"""The fulfillment handler: registration latency and memory, and a daemon free of boto3.

Starts `metering-agent serve-registration` (the child `run` keeps in SaaS mode) against the
in-process emulator, POSTs N registrations (each a new buyer's token, from its own client address
through X-Forwarded-For, paced under the handler's ResolveCustomer rate) through urllib, and prints
the latency per registration (POST -> ResolveCustomer through boto3 -> ledger -> 302), the
child's PSS after them, and whether importing the daemon's modules loads boto3 (it must not: the
handler is a child so that the sampling daemon stays small).

    python benchmarks/registration.py [--count 200]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.emulator import Emulator, Settings  # noqa: E402
from agent.fulfillment.limits import RESOLVE_PER_SECOND  # noqa: E402

PRODUCT = "abcd1234efgh5678ijkl90mn"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(url: str, token: str, client: str) -> int:
    data = urllib.parse.urlencode({"x-amzn-marketplace-token": token}).encode()
    request = urllib.request.Request(url, data=data, headers={"X-Forwarded-For": client})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, agent.daemon.daemon; print('boto3' in sys.modules)"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    print(f"daemon modules import boto3: {probe.stdout.strip()}")
    emulator = Emulator(Settings(product_codes={PRODUCT}, rate=1000, burst=1000))
    url = emulator.serve(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(textwrap.dedent(f"""
            product_code: {PRODUCT}
            state_dir: {tmp}/state
            mode: saas
            saas:
              registration:
                listen: 127.0.0.1:{port}
                redirect: 'https://app.example.com/welcome?account={{customer_aws_account_id}}'
                trusted_proxy: 127.0.0.1     # each POST its own buyer (X-Forwarded-For)
            metering: {{endpoint_url: "{url}", region: us-east-1}}
            dimensions:
              - name: vcpus
                collector: {{type: system, metric: cpu_count}}
            """))  # fmt: skip
        env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIDBENCHBENCH", AWS_SECRET_ACCESS_KEY="x")
        child = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve-registration", "-c", str(config),
             "--log-level", "warning"],
            cwd=ROOT, env=env,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}/"
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(base, timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
            idle = pss_kib(child.pid)
            times = []
            for i in range(args.count):
                token = emulator.issue_token(
                    account=f"{100000000000 + i}",
                    license=f"arn:aws:license-manager::{100000000000 + i}:license:l-{i}",
                )
                # paced under the handler's own ResolveCustomer rate (2/s), as buyers arrive
                time.sleep(1.0 / RESOLVE_PER_SECOND)
                t0 = time.perf_counter()
                status = post(base, token, f"198.18.{i // 250}.{1 + i % 250}")
                times.append(time.perf_counter() - t0)
                assert status == 302, status
            after = pss_kib(child.pid)
        finally:
            child.terminate()
            child.wait(timeout=10)
            emulator.stop()
    first = times[0]  # loads boto3 and makes the client
    times.sort()
    print(f"registrations: {args.count}, all 302")
    print(
        f"latency ms: first {first * 1000:.1f} (loads boto3), fastest {times[0] * 1000:.1f}, "
        "median "
        f"{statistics.median(times) * 1000:.1f}, p99 {times[int(len(times) * 0.99) - 1] * 1000:.1f}"
        f", max {times[-1] * 1000:.1f}"
    )
    print(f"handler child PSS: {idle / 1024:.1f} MiB before the first POST (boto3 not yet "
          f"loaded), {after / 1024:.1f} MiB after {args.count}")  # fmt: skip


if __name__ == "__main__":
    main()
