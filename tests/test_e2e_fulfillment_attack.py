"""End to end: the fulfillment handler that a real `run` daemon serves from its child, under
Debian's `slowhttptest` (slowloris, then slow bodies) and a flood of random-token POSTs from 40
client addresses, while buyers keep registering with real tokens. The oracles: each buyer's
answer (302) and how long it took; the handler process's open connections (the cap); the
ResolveCustomer calls the emulator received (within the handler's budget, never throttled)."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import random
import resource
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agent.config.model import Registration
from agent.emulator import Emulator
from agent.fulfillment import limits
from tests.e2e import Agent, wait_for
from tests.test_e2e_registration import LICENSE, free_port, listening, saas_config

pytestmark = pytest.mark.e2e

CAP = 64  # saas.registration.max_connections here: low, so a few hundred connections exceed it
DEFAULT_CAP = Registration("127.0.0.1:8788", "https://x.example/").max_connections  # 500
BUYER_LIMIT = 5.0  # seconds within which every buyer's registration must be answered 302
_sources = itertools.count(1)


def source() -> str:
    """A loopback address of its own (127.0.5.x ...): one client for the per-client limits."""
    n = next(_sources)
    return f"127.0.{5 + n // 250}.{1 + n % 250}"


def post(
    port: str | int, token: str, src: str, timeout: float = 10
) -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=timeout,
                                      source_address=(src, 0))  # fmt: skip
    try:
        body = urllib.parse.urlencode({"x-amzn-marketplace-token": token})
        conn.request("POST", "/register", body=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


class Handler:
    def __init__(self, agent: Agent, port: int, emulator: Emulator) -> None:
        self.agent, self.port, self.emulator = agent, port, emulator
        assert agent.proc is not None
        children = psutil.Process(agent.proc.pid).children()
        self.process = next(p for p in children if "serve-registration" in p.cmdline())

    def connections(self) -> int:
        return sum(1 for c in self.process.net_connections("tcp")
                   if c.laddr and c.laddr.port == self.port and c.status == "ESTABLISHED")  # fmt: skip


def start_handler(
    emulator: Emulator, tmp_path: Path, cap: int | None, open_files: int | None = None
) -> Agent:
    """`run` with saas.registration (max_connections: `cap`, else the default), its soft limit
    of open files `open_files` (systemd's default is 1,024), inherited by the handler child."""
    port = free_port()
    config = saas_config(tmp_path, emulator, port)
    if cap is not None:
        text = config.read_text().replace(
            f"listen: 127.0.0.1:{port}\n", f"listen: 127.0.0.1:{port}\n    max_connections: {cap}\n"
        )
        assert f"max_connections: {cap}" in text
        config.write_text(text)
    agent = Agent(config, {})
    agent.port = port  # type: ignore[attr-defined]
    if open_files is None:
        return agent.start()
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, before[1]))
    try:
        return agent.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@contextlib.contextmanager
def running(agent: Agent, emulator: Emulator) -> Iterator[Handler]:
    port = agent.port  # type: ignore[attr-defined]
    try:
        wait_for("the fulfillment handler", lambda: listening(f"http://127.0.0.1:{port}/"), 30,
                 agent)  # fmt: skip
        yield Handler(agent, port, emulator)
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()


@pytest.fixture
def handler(emulator: Emulator, tmp_path: Path) -> Iterator[Handler]:
    with running(start_handler(emulator, tmp_path, CAP), emulator) as h:
        yield h


def register_as_a_browser(port: int, token: str) -> tuple[int, float, int]:
    """What the buyer's browser does with the handler's pages: post the token; over a limit, the
    page posts it again after Retry-After. (final status, seconds in all, posts)."""
    start, posts, src = time.monotonic(), 0, source()
    while True:
        posts += 1
        try:
            status, headers, page = post(port, token, src, timeout=15)
        except OSError:
            return 0, time.monotonic() - start, posts
        if status not in (429, 503) or posts == 3:
            return status, time.monotonic() - start, posts
        assert f'value="{token}"' in page  # the page carries the token to post again
        time.sleep(int(headers["Retry-After"]))


@contextlib.contextmanager
def buyers(h: Handler, every: float = 0.7) -> Iterator[list[tuple[int, float, int]]]:
    """Buyers registering with real tokens, one every `every` seconds, each from its own
    address: (status, seconds to the answer, posts) each."""
    answers: list[tuple[int, float, int]] = []
    stop = threading.Event()

    def register() -> None:
        n = 0
        while not stop.wait(every):
            n += 1
            account = f"{700000000000 + n}"
            token = h.emulator.issue_token(account=account,
                                           license=LICENSE.replace("111122223333", account))  # fmt: skip
            answers.append(register_as_a_browser(h.port, token))

    thread = threading.Thread(target=register)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join()


def slowhttptest(
    tmp_path: Path, mode: str, port: int, seconds: int, connections: int = 300
) -> subprocess.Popen[str]:
    exe = shutil.which("slowhttptest")
    if exe is None:
        pytest.skip("slowhttptest is not installed (Debian package slowhttptest)")
    rate = str(connections // 2)
    cmd = [exe, mode, "-c", str(connections), "-r", rate, "-i", "2", "-l", str(seconds), "-p", "3",
           "-u", f"http://127.0.0.1:{port}/register", "-g", "-o", str(tmp_path / mode[1:])]  # fmt: skip
    if mode == "-B":
        cmd += ["-s", "8192", "-t", "POST"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def attack(h: Handler, tmp_path: Path, mode: str, connections: int) -> tuple[int, list[Any]]:
    """slowhttptest for 6 s while buyers register: the handler's peak of open connections, and
    the buyers' answers."""
    with buyers(h) as answers:
        tool = slowhttptest(tmp_path, mode, h.port, 6, connections)
        peak = 0
        while tool.poll() is None:
            peak = max(peak, h.connections())
            time.sleep(0.1)
        out = tool.communicate()[0]
    assert tool.returncode == 0, out
    # slowhttptest's own count at its end: every connection made, the excess closed on it
    last = (tmp_path / f"{mode[1:]}.csv").read_text().splitlines()[-1].split(",")
    closed, connected = int(last[1]), int(last[3])
    assert closed + connected >= 0.95 * connections, last
    assert closed >= connections - peak - 8, last
    assert len(answers) >= 6, answers
    assert all(status == 302 and took < BUYER_LIMIT for status, took, _ in answers), answers
    return peak, answers


def test_slowloris_past_systemds_default_open_files(emulator: Emulator, tmp_path: Path) -> None:
    """1,100 idle connections against the default cap (500), with the 1,024 open files that
    stopped the wsgiref server at about 1,020: the cap holds, buyers are answered."""
    agent = start_handler(emulator, tmp_path, None, open_files=1024)
    with running(agent, emulator) as h:
        assert psutil.Process(h.process.pid).rlimit(psutil.RLIMIT_NOFILE)[0] == 1024
        peak, _ = attack(h, tmp_path, "-H", 1100)
    assert DEFAULT_CAP - 4 <= peak <= DEFAULT_CAP


def test_slow_bodies_past_a_lowered_cap(handler: Handler, tmp_path: Path) -> None:
    peak, _ = attack(handler, tmp_path, "-B", 300)
    assert CAP - 4 <= peak <= CAP  # the attack reached the cap, and the cap held


def test_token_flood_stays_within_the_resolve_budget(handler: Handler) -> None:
    emu = handler.emulator
    stop = threading.Event()
    flood: Counter[int] = Counter()
    retry_after: list[str] = []

    def attacker() -> None:
        src = source()
        while not stop.is_set():
            token = f"emu-reg-{random.getrandbits(128):032x}"
            try:
                status, headers, _ = post(handler.port, token, src)
            except OSError:
                status, headers = 0, {}
            flood[status] += 1
            if status in (429, 503):
                retry_after.append(headers.get("Retry-After", ""))
            time.sleep(0.02)

    start = time.time()
    with buyers(handler, every=1.0) as answers:
        threads = [threading.Thread(target=attacker) for _ in range(40)]
        for t in threads:
            t.start()
        time.sleep(6)  # the flood's length (its effect is read from the counters below)
        stop.set()
        for t in threads:
            t.join()
    end = time.time()
    calls = [c for c in emu.calls() if c["operation"] == "ResolveCustomer" and c["time"] >= start]
    budget = limits.RESOLVE_BURST + limits.RESOLVE_PER_SECOND * (end - start)
    assert sum(flood.values()) > 10 * len(calls)  # a real flood: most of it made no call
    assert len(calls) <= budget, (len(calls), budget, flood)
    per_second = Counter(int(c["time"] - start) for c in calls)
    assert max(per_second.values()) <= limits.RESOLVE_BURST + limits.RESOLVE_PER_SECOND
    assert not [c for c in calls if c.get("code") == "ThrottlingException"]
    assert flood[429] and flood[503] and set(flood) <= {400, 429, 503}, flood
    assert all(v.isdigit() and int(v) >= 1 for v in retry_after)
    assert len(answers) >= 3 and all(s == 302 and t < BUYER_LIMIT for s, t, _ in answers), answers
