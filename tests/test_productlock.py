"""One sender per product per machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import LockHeld
from agent.host.locks import ProductLock, is_loopback, run_dir


def test_a_second_agent_for_the_product_is_refused_naming_the_first_config(
    tmp_path: Path,
) -> None:
    first = ProductLock("prod1", Path("/etc/metering-agent/config.yaml"), tmp_path)
    assert first.acquire()
    with pytest.raises(LockHeld) as info:
        ProductLock("prod1", tmp_path / "trial.yaml", tmp_path).acquire()
    assert "/etc/metering-agent/config.yaml" in str(info.value)
    assert info.value.exit_code == 1
    assert ProductLock("prod2", tmp_path / "other.yaml", tmp_path).acquire()  # other product


def test_an_uncreatable_directory_skips_the_lock(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert ProductLock("prod1", tmp_path / "c.yaml", blocker / "run").acquire() is False


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8787", True),
        ("http://127.9.9.9", True),
        ("http://[::1]:80", True),
        ("http://localhost:8787", True),
        ("https://metering.marketplace.us-east-1.amazonaws.com", False),
        ("http://192.0.2.2:8787", False),
        (None, False),
    ],
)
def test_loopback(url: str | None, loopback: bool) -> None:
    assert is_loopback(url) is loopback


def test_run_dir_is_overridable() -> None:
    assert run_dir({}) == Path("/run/metering-agent")
    assert run_dir({"METERING_AGENT_RUN_DIR": "/tmp/x"}) == Path("/tmp/x")
