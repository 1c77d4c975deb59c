"""End to end: the buyer's registration POST through a real HTTP client, to the fulfillment
handler that a real `run` daemon in SaaS mode serves from its child, ResolveCustomer through a real
boto3 client against the emulator; the customer lands in the ledger, and the token in no log."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.emulator import Emulator
from agent.ledger import Ledger
from tests.conftest import PRODUCT, run_cli
from tests.e2e import Agent, wait_for

pytestmark = pytest.mark.e2e

ACCOUNT = "111122223333"
LICENSE = "arn:aws:license-manager::111122223333:license:l-0123456789abcdef"
AGREEMENT = "agmt-1a2b3c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """The 302 is the answer under test; following it would leave this machine."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def post(url: str, token: str | None) -> tuple[int, dict[str, str], str]:
    form = {} if token is None else {"x-amzn-marketplace-token": token}
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode())
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def listening(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


REDIRECT = (
    "https://app.example.com/welcome?account={customer_aws_account_id}"
    "&license={license_arn}&agreement={agreement_id}&c={customer}"
)


def saas_config(tmp_path: Path, emulator: Emulator, port: int, redirect: str = REDIRECT) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            product_code: {PRODUCT}
            state_dir: {tmp_path / "state"}
            mode: saas
            saas:
              registration:
                listen: 127.0.0.1:{port}
                redirect: '{redirect}'
            metering:
              endpoint_url: "{emulator.url}"
              region: us-east-1
              send_window: 0
              startup_check: false
            dimensions:
              - name: requests
                collector:
                  type: log
                  path: {tmp_path / "app.log"}
                  pattern: 'customer=(?P<customer>\\S+)'
            """
        )
    )
    return config


def test_registration_post_through_the_running_daemon(emulator: Emulator, tmp_path: Path) -> None:
    port = free_port()
    config = saas_config(tmp_path, emulator, port)
    agent = Agent(config, {}, extra=["--log-level", "debug"]).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for("the fulfillment handler", lambda: listening(base + "/register"), 30, agent)
        token = emulator.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
        # the token in the query string as well: the access log must not print it either
        query = urllib.parse.urlencode({"x-amzn-marketplace-token": token})
        status, headers, _ = post(f"{base}/register?{query}", token)
        assert status == 302
        q = urllib.parse.quote
        assert headers["Location"] == (
            f"https://app.example.com/welcome?account={ACCOUNT}&license={q(LICENSE, safe='')}"
            f"&agreement={AGREEMENT}&c={ACCOUNT}"
        )
        ledger = Ledger(tmp_path / "state", readonly=True)
        try:
            stored = ledger.customer(ACCOUNT)
        finally:
            ledger.close()
        assert stored is not None
        assert (stored.account_id, stored.license_arn, stored.agreement_id) == (
            ACCOUNT, LICENSE, AGREEMENT,
        )  # fmt: skip
        expired = emulator.issue_token(account="999988887777", license=LICENSE, expires_in=0)
        bad = "emu-reg-" + "f" * 32  # never issued
        for refused in (expired, bad, None):
            status, headers, text = post(f"{base}/register", refused)
            assert status == 400 and "Location" not in headers and "expired" in text
        # the command writes the ledger while the daemon (and its handler child) write it too
        added = run_cli("customers", "add", "-c", str(config), "--account", "444455556666",
                        "--license", LICENSE.replace("1111", "4444"), "--as", "globex")  # fmt: skip
        assert added.returncode == 0, added.stderr
        assert agent.terminate() == 0
        assert not listening(base + "/register")  # the handler child ended with the daemon
    finally:
        if agent.alive():
            agent.kill9()
    ledger = Ledger(tmp_path / "state", readonly=True)
    try:
        assert [c.label for c in ledger.customers(include_removed=True)] == [ACCOUNT, "globex"]
    finally:
        ledger.close()
    resolved = [c for c in emulator.calls() if c["operation"] == "ResolveCustomer"]
    assert [c.get("code") for c in resolved] == [None, "ExpiredTokenException",
                                                 "InvalidTokenException"]  # fmt: skip
    log = agent.output()
    assert ACCOUNT in log  # the handler's lines are in this output (else the check below is void)
    for secret in (token, expired, bad):
        assert secret not in log


def test_the_handler_child_ends_when_run_is_killed(emulator: Emulator, tmp_path: Path) -> None:
    """kill -9 of the daemon alone (not its process group): the handler child notices and exits,
    so no orphan keeps the port (and an old config) after the daemon is started again."""
    port = free_port()
    agent = Agent(saas_config(tmp_path, emulator, port), {}).start()
    base = f"http://127.0.0.1:{port}/"
    try:
        wait_for("the fulfillment handler", lambda: listening(base), 30, agent)
        assert agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGKILL)
        agent.proc.wait(timeout=10)
        wait_for("the orphaned handler to exit", lambda: not listening(base), 15)
    finally:
        if agent.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.proc.pid, signal.SIGKILL)
