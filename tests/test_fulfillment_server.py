"""The fulfillment handler on its real server (waitress, in this process) against the emulator
through a real boto3 client: what held on wsgiref still holds (431, a huge body refused unread,
405, CR/LF refused), plus the deadlines, the connection cap, no Server header, per-client limits
(X-Forwarded-For only from the trusted proxy), the ResolveCustomer budget shared through the
state directory, the token cache and /healthz. Each is judged by the bytes on the socket and the
calls the emulator received."""

from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.clock import Clock
from agent.config.model import Registration
from agent.emulator import Emulator, Settings
from agent.fulfillment import limits
from agent.fulfillment.handler import Registrar, app_for
from agent.fulfillment.server import access_logged, make_server
from agent.ledger import Ledger
from agent.sending.budget import CallBudget
from tests.conftest import PRODUCT
from tests.test_customers import ACCOUNT, AGREEMENT, LICENSE, REDIRECT, saas_config


@pytest.fixture
def emu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSTUBSTUBSTUB")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stubsecret")
    emulator = Emulator(Settings(product_codes={PRODUCT}))
    emulator.serve(0)
    yield emulator
    emulator.stop()


class Served:
    def __init__(self, server: Any, cfg: Any) -> None:
        self.server, self.cfg = server, cfg
        self.port = server.effective_port

    def request(
        self,
        method: str,
        path: str = "/register",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        source: str = "127.0.0.1",
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                          source_address=(source, 0))  # fmt: skip
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def post(self, token: str, source: str = "127.0.0.1", **kw: Any) -> tuple[int, dict[str, str]]:
        body = urllib.parse.urlencode({"x-amzn-marketplace-token": token}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **kw.get("headers", {})}
        status, got, _ = self.request("POST", body=body, headers=headers, source=source)
        return status, got

    def raw(self, data: bytes, wait: float = 5.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=wait) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def connections(self) -> int:
        return len(self.server.active_channels)


@pytest.fixture
def serve(emu: Emulator, tmp_path: Path) -> Iterator[Any]:
    servers: list[Any] = []

    def start(**registration: Any) -> Served:
        cfg = config.load(saas_config(tmp_path, emu.url))
        (tmp_path / "state").mkdir(exist_ok=True)
        timeouts = {k: registration.pop(k) for k in ("header_timeout", "body_timeout")
                    if k in registration}  # fmt: skip
        reg = Registration("127.0.0.1:0", REDIRECT, **registration)
        app = access_logged(app_for(cfg, REDIRECT, Registrar(cfg, Clock())))
        server = make_server(app, reg, **timeouts)
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        return Served(server, cfg)

    yield start
    for server in servers:
        server.stop()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def resolve_calls(emu: Emulator) -> list[dict[str, Any]]:
    return [c for c in emu.calls() if c["operation"] == "ResolveCustomer"]


def test_registration_is_302_with_no_server_banner(serve: Any, emu: Emulator) -> None:
    s = serve()
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    status, headers = s.post(token)
    assert status == 302
    assert headers["Location"].startswith(f"https://app.example.com/welcome?account={ACCOUNT}")
    assert urllib.parse.quote(LICENSE, safe="") in headers["Location"]
    assert "Server" not in headers and "Via" not in headers
    # waitress's own error pages name no product either
    answer = s.raw(b"GARBAGE\r\n\r\n")
    assert status_of(answer) == 400 and b"waitress" not in answer.lower()
    assert b"\r\nServer:" not in answer


def test_what_held_on_wsgiref_still_holds(serve: Any, emu: Emulator) -> None:
    s = serve()
    assert s.request("PUT")[0] == 405
    assert s.request("GET", headers={"X-Big": "a" * 20_000})[0] == 431
    # a 100 MB body is refused from its Content-Length, before a byte of it is sent
    head = (b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")  # fmt: skip
    assert status_of(s.raw(head)) == 413
    # CR/LF: a header line broken by a bare CR is refused; a token holding CR LF makes no
    # header of its own (the field is quoted into Location, and this token is not valid)
    assert status_of(s.raw(b"GET / HTTP/1.1\r\nHost: x\rX-Injected: 1\r\n\r\n")) == 400
    status, headers = s.post("emu-reg-x\r\nSet-Cookie: a=b")
    assert status == 400 and "Set-Cookie" not in headers
    assert [c.get("code") for c in resolve_calls(emu)] == ["InvalidTokenException"]


def test_the_same_token_is_answered_from_the_cache(serve: Any, emu: Emulator) -> None:
    s = serve()
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    first = s.post(token)
    again = [s.post(token, source=f"127.0.0.{i}") for i in range(2, 5)]  # reloads, other tabs
    assert first[0] == 302
    assert [(st, h["Location"]) for st, h in again] == [(302, first[1]["Location"])] * 3
    bad = "emu-reg-" + "0" * 32
    assert s.post(bad)[0] == 400 and s.post(bad, source="127.0.0.9")[0] == 400
    assert [c.get("code") for c in resolve_calls(emu)] == [None, "InvalidTokenException"]


def test_double_submit_makes_one_call(serve: Any, emu: Emulator) -> None:
    s = serve()
    token = emu.issue_token(account=ACCOUNT, license=LICENSE)
    emu.inject("slow", operation="ResolveCustomer", delay=0.5)
    answers: list[int] = []
    threads = [threading.Thread(target=lambda i=i: answers.append(s.post(token, f"127.0.1.{i}")[0]))
               for i in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [302, 302, 302]
    assert len(resolve_calls(emu)) == 1


def test_per_client_limit_by_address_and_forwarded_only_from_the_trusted_proxy(
    serve: Any, emu: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "RESOLVE_BURST", 100)  # only the per-client limit here
    s = serve()
    bad = [f"emu-reg-{i:032x}" for i in range(40)]
    # one client: its burst, then 429 with Retry-After (no call made for those)
    statuses = [
        s.post(bad[i], headers={"X-Forwarded-For": f"10.0.0.{i}"})
        for i in range(limits.CLIENT_BURST + 3)
    ]
    assert [st for st, _ in statuses] == [400] * limits.CLIENT_BURST + [429] * 3
    assert int(statuses[-1][1]["Retry-After"]) >= 1
    assert len(resolve_calls(emu)) == limits.CLIENT_BURST  # X-Forwarded-For was not believed
    assert s.post(bad[9], source="127.0.0.2")[0] == 400  # another address has its own

    proxied = serve(trusted_proxy="127.0.0.1")
    for i in range(limits.CLIENT_BURST + 1):  # through the proxy: each forwarded client
        status, _ = proxied.post(bad[10 + i], headers={"X-Forwarded-For": f"203.0.113.{i}"})
        assert status == 400  # each forwarded client has its own limit
    over = [proxied.post(bad[20 + i], headers={"X-Forwarded-For": "203.0.113.77"})[0]
            for i in range(limits.CLIENT_BURST + 1)]  # fmt: skip
    assert over[-1] == 429
    # from an address that is not the proxy, the header is not believed
    other = serve(trusted_proxy="127.0.0.9")
    for i in range(limits.CLIENT_BURST):
        other.post(bad[30 + i], headers={"X-Forwarded-For": f"198.51.100.{i}"})
    assert other.post(bad[35], headers={"X-Forwarded-For": "198.51.100.99"})[0] == 429


def test_resolve_calls_stay_within_the_handlers_rate(serve: Any, emu: Emulator) -> None:
    s = serve()
    start = time.monotonic()
    answers = [s.post(f"emu-reg-{i:032x}", source=f"127.0.2.{i}") for i in range(12)]
    elapsed = time.monotonic() - start
    busy = [h for st, h in answers if st == 503]
    assert busy and all(int(h["Retry-After"]) >= 1 for h in busy)
    allowed = limits.RESOLVE_BURST + limits.RESOLVE_PER_SECOND * elapsed
    assert len(resolve_calls(emu)) == 12 - len(busy) <= allowed


def test_the_budget_shared_with_the_sender_is_honoured(
    serve: Any, emu: Emulator, tmp_path: Path
) -> None:
    """The sender has reserved the account's next 3 seconds of calls (a long BatchMeterUsage
    run): a registration now is answered 503 with Retry-After and calls nothing."""
    s = serve()
    budget = CallBudget.in_state_dir(tmp_path / "state", Clock())
    for _ in range(30):
        budget.reserve()
    token = emu.issue_token(account=ACCOUNT, license=LICENSE)
    status, headers = s.post(token)
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert resolve_calls(emu) == []
    time.sleep(max(0.0, 30 * budget.interval - 1.0))  # the sender's reservations run out
    assert s.post(token, source="127.0.0.3")[0] == 302  # 503 was not cached


def test_slow_headers_and_bodies_are_cut_at_their_deadlines(serve: Any) -> None:
    s = serve(header_timeout=1.0, body_timeout=1.0)
    slow_head = socket.create_connection(("127.0.0.1", s.port))
    slow_head.sendall(b"POST /register HTTP/1.1\r\nHost: x\r\n")
    slow_body = socket.create_connection(("127.0.0.1", s.port))
    slow_body.sendall(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx=")
    start = time.monotonic()
    for sock in (slow_head, slow_body):
        sock.settimeout(10)
        for _ in range(3):  # a byte every 0.4 s: waitress's idle timeout alone would not cut it
            time.sleep(0.4)
            try:
                sock.sendall(b"X")
            except OSError:
                break
        assert sock.recv(100) == b""  # closed by the server
        sock.close()
    assert time.monotonic() - start < 6


def test_at_the_cap_the_longest_reader_makes_room(serve: Any, emu: Emulator) -> None:
    s = serve(max_connections=8)
    idle = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"POST /register HTTP/1.1\r\n")
        idle.append(sock)
    deadline = time.monotonic() + 5
    while s.connections() != 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.connections() == 8  # the cap holds
    token = emu.issue_token(account=ACCOUNT, license=LICENSE)
    start = time.monotonic()
    assert s.post(token, source="127.0.0.5")[0] == 302
    assert time.monotonic() - start < 2
    for sock in idle[:12]:  # the oldest were closed to make room
        sock.settimeout(5)
        assert sock.recv(10) == b""
    for sock in idle:
        sock.close()


def test_healthz(serve: Any, tmp_path: Path) -> None:
    s = serve()
    assert s.request("GET", "/healthz")[0] == 200
    (tmp_path / "state").rename(tmp_path / "away")  # nowhere to store a registration
    try:
        status, _, text = s.request("GET", "/healthz")
    finally:
        (tmp_path / "away").rename(tmp_path / "state")
    assert status == 503 and b"state directory" in text
    assert s.request("HEAD", "/healthz")[0] == 200


def test_a_registration_is_stored(serve: Any, emu: Emulator, tmp_path: Path) -> None:
    s = serve()
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    assert s.post(token)[0] == 302
    ledger = Ledger(tmp_path / "state", readonly=True)
    try:
        assert [c.label for c in ledger.customers()] == [ACCOUNT]
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("max_connections: 3", "saas.registration.max_connections"),
        ("trusted_proxy: 'my proxy'", "saas.registration.trusted_proxy"),
    ],
)
def test_the_keys_errors_name_them(tmp_path: Path, line: str, key: str) -> None:
    from agent.errors import ConfigError

    path = saas_config(tmp_path, "http://127.0.0.1:9")
    text = path.read_text().replace(
        "    listen: 127.0.0.1:8788\n", f"    listen: 127.0.0.1:8788\n    {line}\n"
    )
    assert line in text
    path.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(path)
    path.write_text(text.replace(line, "max_connections: 64\n    trusted_proxy: 127.0.0.1"))
    reg = config.load(path).saas.registration  # type: ignore[union-attr]
    assert (reg.max_connections, reg.trusted_proxy) == (64, "127.0.0.1")


def test_the_unit_allows_the_default_cap_its_open_files() -> None:
    from agent.fulfillment.server import FILES_BESIDES
    from tests.conftest import ROOT

    unit = (ROOT / "packaging" / "metering-agent.service").read_text()
    limit = [
        int(line.split("=")[1]) for line in unit.splitlines() if line.startswith("LimitNOFILE=")
    ]
    assert len(limit) == 1
    assert limit[0] >= Registration("127.0.0.1:1", REDIRECT).max_connections + FILES_BESIDES
