"""Network byte counters against real interfaces: a veth pair into a network namespace this test
creates (and deletes, so the interface disappears), plus loopback traffic.

The oracle is the kernel's own per-interface counters (/sys/class/net/NAME/statistics/tx_bytes),
read next to each reading. Root only (network namespaces); skipped with the reason elsewhere. All
traffic goes to loopback or to the addresses inside the namespace made here, in bounded amounts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from agent import config
from agent.collecting.sampling import Sampler
from agent.collectors import Registry, Sources
from tests.conftest import PRODUCT

SYS_NET = Path("/sys/class/net")
MB = 1 << 20
# Other processes on this machine may use loopback and the NIC while we measure; the veth is ours.
NOISE = 256 * 1024


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"ma-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


pytestmark = [
    pytest.mark.e2e,  # real network namespaces and veth links (ip netns), the kernel's counters
    pytest.mark.skipif((reason := _can_make_namespaces()) is not None, reason=reason or ""),
]

SINK = textwrap.dedent(
    """
    import socket, sys
    srv = socket.socket()
    srv.bind((sys.argv[1], 0))
    srv.listen(4)
    srv.settimeout(60)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        conn.settimeout(30)
        while conn.recv(1 << 16):
            pass
        conn.close()
    """
)


@dataclass
class Veth:
    namespace: str
    host_side: str
    peer_address: str
    sink_port: int
    sink: subprocess.Popen[str]

    def delete_namespace(self) -> None:
        """The namespace and the veth pair with it (its last process goes first)."""
        if self.sink.poll() is None:
            self.sink.kill()
            self.sink.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", self.namespace], check=True, timeout=10)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def veth(tmp_path: Path) -> Iterator[Veth]:
    pid = os.getpid()
    ns, host_side, peer = f"ma-test-{pid}", f"vma{pid % 100000}a", "vmapeer"
    # A /30 of 10.200.0.0/16 of our own, distinct for concurrent test runs (by pid).
    third, fourth = pid % 256, (pid // 256) % 64 * 4
    net = f"10.200.{third}"
    sink: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_side, "type", "veth", "peer", "name", peer, "netns", ns)
        for side, where in ((host_side, []), (peer, ["-n", ns])):
            # No IPv6 chatter (router solicitations) on the pair: only our bytes cross it.
            subprocess.run(
                ["ip", *where, "link", "set", side, "up"], check=True, capture_output=True
            )
        subprocess.run(
            ["sysctl", "-q", "-w", f"net.ipv6.conf.{host_side}.disable_ipv6=1"], check=False
        )
        _ip("addr", "add", f"{net}.{fourth + 1}/30", "dev", host_side)
        _ip("-n", ns, "addr", "add", f"{net}.{fourth + 2}/30", "dev", peer)
        _ip("-n", ns, "link", "set", "lo", "up")
        script = tmp_path / "sink.py"
        script.write_text(SINK)
        sink = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(script), f"{net}.{fourth + 2}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        yield Veth(ns, host_side, f"{net}.{fourth + 2}", port, sink)
    finally:
        if sink is not None and sink.poll() is None:
            sink.kill()
            sink.wait(timeout=10)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", host_side], check=False, capture_output=True)


@pytest.fixture
def loopback_sink() -> Iterator[int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(30)

    def drain() -> None:
        try:
            while True:
                conn, _ = srv.accept()
                conn.settimeout(30)
                while conn.recv(1 << 16):
                    pass
                conn.close()
        except OSError:
            return

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    srv.close()


def send(address: str, port: int, nbytes: int) -> None:
    """Send exactly `nbytes` of payload and close; bounded in size and time."""
    chunk = b"x" * (64 * 1024)
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.settimeout(10)
        left = nbytes
        while left > 0:
            conn.sendall(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
        conn.shutdown(socket.SHUT_WR)
        # The sink closes once it has read everything: then every byte has crossed the wire.
        while conn.recv(1 << 16):
            pass


def settle(name: str) -> None:
    """Wait (bounded) until the interface's counter stops moving: the last ACKs are out."""
    last = -1
    for _ in range(30):
        now = tx_bytes([name]).get(name, -1)
        if now == last:
            return
        last = now
        threading.Event().wait(0.2)


def tx_bytes(names: list[str]) -> dict[str, int]:
    out = {}
    for name in names:
        try:
            out[name] = int((SYS_NET / name / "statistics/tx_bytes").read_text())
        except OSError:
            continue
    return out


def device_interfaces() -> list[str]:
    return sorted(p.name for p in SYS_NET.iterdir() if (p / "device").exists())


def test_veth_and_loopback_against_the_kernels_counters(
    tmp_path: Path, veth: Veth, loopback_sink: int
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            dimensions:
              - name: default
                collector: {{type: system, metric: net_sent_bytes}}
              - name: veth
                collector: {{type: system, metric: net_sent_bytes, interfaces: [{veth.host_side}]}}
              - name: veth_lo
                collector: {{type: system, metric: net_sent_bytes,
                             interfaces: ['{veth.host_side[:-1]}?', lo]}}
            """
        )
    )
    cfg = config.load(path)
    sampler = Sampler(cfg, Registry(), Sources())
    assert veth.host_side not in device_interfaces()  # a veth is not backed by a device
    watched = [*device_interfaces(), "lo", veth.host_side]
    saved: dict[str, dict | None] = {d.name: None for d in cfg.dimensions}
    billed = {d.name: Decimal(0) for d in cfg.dimensions}

    def reading() -> dict[str, int]:
        before = tx_bytes(watched)
        for dim in cfg.dimensions:
            sample = sampler.take(dim, 0.0, saved[dim.name])
            assert sample.error is None and sample.value is not None, sample.error
            billed[dim.name] += sample.value
            saved[dim.name] = sample.state
        return before

    start = reading()
    assert billed == {"default": 0, "veth": 0, "veth_lo": 0}  # no baseline yet

    send("127.0.0.1", loopback_sink, 20 * MB)  # loopback: never egress by default
    send(veth.peer_address, veth.sink_port, 5 * MB)
    settle(veth.host_side)
    middle = reading()
    veth_sent = middle[veth.host_side] - start[veth.host_side]
    assert veth_sent >= 5 * MB
    assert billed["veth"] == veth_sent  # exactly the kernel's count for our interface
    lo_sent = middle["lo"] - start["lo"]
    assert lo_sent >= 20 * MB
    assert abs(billed["veth_lo"] - (veth_sent + lo_sent)) < NOISE
    device_sent = sum(middle[n] - start[n] for n in device_interfaces())
    assert abs(billed["default"] - device_sent) < NOISE  # loopback and veth left out

    # The namespace goes, and the veth with it: it stops contributing; the others go on from
    # their own baselines instead of billing their totals since boot again.
    veth.delete_namespace()
    for _ in range(50):
        if not (SYS_NET / veth.host_side).exists():
            break
        threading.Event().wait(0.1)
    assert not (SYS_NET / veth.host_side).exists()
    send("127.0.0.1", loopback_sink, 2 * MB)
    veth_before = billed["veth"]
    lo_and_veth_before = billed["veth_lo"]
    end = reading()
    assert billed["veth"] == veth_before  # the interface is gone: nothing more
    lo_after = end["lo"] - middle["lo"]
    assert lo_after >= 2 * MB
    assert abs((billed["veth_lo"] - lo_and_veth_before) - lo_after) < NOISE
    assert billed["veth_lo"] < lo_sent + veth_sent + lo_after + NOISE  # no since-boot total
