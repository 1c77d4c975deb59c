"""sd_notify: the real daemon tells systemd it is ready, alive, and stopping."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from agent.emulator import Emulator
from agent.host.sdnotify import Notifier
from tests.conftest import PRODUCT
from tests.e2e import Agent, wait_for


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    yield path, sock
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            return messages


def test_notifier_without_systemd_is_silent() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and n.watchdog_seconds is None


def test_notifier_messages(notify_socket) -> None:
    path, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "20000000"})
    assert n.watchdog_seconds == 20
    assert n.ready("metering 3 dimensions")
    assert drain(sock) == ["READY=1\nSTATUS=metering 3 dimensions"]


def test_watchdog_for_another_pid_is_ignored() -> None:
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None


@pytest.mark.e2e
def test_daemon_speaks_sd_notify(notify_socket, emulator: Emulator, tmp_path: Path) -> None:
    path, sock = notify_socket
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""product_code: {PRODUCT}
state_dir: {tmp_path / "state"}
metering: {{endpoint_url: "{emulator.url}"}}
dimensions:
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
"""
    )
    env = {
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url,
        "NOTIFY_SOCKET": str(path),
        "WATCHDOG_USEC": "2000000",
    }
    agent = Agent(config, env).start()
    messages: list[str] = []
    wait_for(
        "READY and two WATCHDOG pings",
        lambda: (
            messages.extend(drain(sock))
            or (
                any(m.startswith("READY=1") for m in messages) and messages.count("WATCHDOG=1") >= 2
            )
        ),
        20,
        agent,
    )
    assert agent.terminate() == 0
    time.sleep(0.2)
    messages.extend(drain(sock))
    assert any(m.startswith("STOPPING=1") for m in messages)
