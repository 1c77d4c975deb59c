"""End to end: the reverse proxy config that docs/saas.md shows (packaging/nginx/), run by
Debian's nginx with TLS (a self-signed certificate made here) in front of the fulfillment handler
on its real server, ResolveCustomer through boto3 against the emulator. The oracles: what the
buyer's HTTPS client receives, which requests reached the handler, and the calls the emulator
received."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import os
import shutil
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config
from agent.clock import Clock
from agent.config.model import Registration
from agent.emulator import Emulator
from agent.fulfillment import limits
from agent.fulfillment.handler import Registrar, app_for
from agent.fulfillment.server import make_server
from tests.conftest import ROOT
from tests.test_customers import ACCOUNT, AGREEMENT, LICENSE, REDIRECT, saas_config
from tests.test_e2e_registration import free_port
from tests.test_fulfillment_server import emu  # noqa: F401  (the fixture)

pytestmark = pytest.mark.e2e

SITE = ROOT / "packaging" / "nginx" / "metering-agent-fulfillment.conf"


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return pem, key_file


def site_for_test(tmp_path: Path, https_port: int, handler_port: int, cert: Path, key: Path) -> str:
    """The shipped file with only its machine-specific values replaced (each must be there)."""
    text = SITE.read_text()
    for old, new in [
        ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("/etc/ssl/certs/register.example.com.pem", str(cert)),
        ("/etc/ssl/private/register.example.com.key", str(key)),
        ("/var/log/nginx/fulfillment.log", str(tmp_path / "access.log")),
        ("http://127.0.0.1:8788", f"http://127.0.0.1:{handler_port}"),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    return text


class Proxied:
    def __init__(self, port: int, cert: Path, seen: list[tuple[str, str]]) -> None:
        self.port, self.seen = port, seen
        self.tls = ssl.create_default_context(cafile=str(cert))

    def request(
        self,
        method: str,
        path: str = "/register",
        body: str | None = None,
        source: str = "127.0.0.1",
    ) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPSConnection("localhost", self.port, context=self.tls, timeout=10,
                                           source_address=(source, 0))  # fmt: skip
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read().decode()
        finally:
            conn.close()

    def post(self, token: str, source: str) -> tuple[int, dict[str, str], str]:
        body = urllib.parse.urlencode({"x-amzn-marketplace-token": token})
        return self.request("POST", body=body, source=source)


@pytest.fixture
def proxied(emu: Emulator, tmp_path: Path) -> Iterator[Proxied]:  # noqa: F811
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx-light)")
    cfg = config.load(saas_config(tmp_path, emu.url))
    (tmp_path / "state").mkdir()
    seen: list[tuple[str, str]] = []  # (method, client) of each request the handler received
    inner = app_for(cfg, REDIRECT, Registrar(cfg, Clock()))

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        seen.append((environ["REQUEST_METHOD"], environ["REMOTE_ADDR"]))
        return inner(environ, start_response)

    server = make_server(app, Registration("127.0.0.1:0", REDIRECT, trusted_proxy="127.0.0.1"))
    threading.Thread(target=server.run, daemon=True).start()
    cert, key = self_signed(tmp_path)
    https_port = free_port()
    (tmp_path / "site.conf").write_text(
        site_for_test(tmp_path, https_port, server.effective_port, cert, key)
    )
    (tmp_path / "nginx.conf").write_text(
        f"""
        worker_processes 1;
        {"user root;" if os.geteuid() == 0 else ""}  # workers must reach tmp_path (0700)
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        events {{ worker_connections 128; }}
        http {{
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            include {tmp_path}/site.conf;
        }}
        """
    )
    test = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-t"]
    checked = subprocess.run(test, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    with open(tmp_path / "nginx.out", "w") as out:
        proc = subprocess.Popen([*test[:-1], "-g", "daemon off;"], stdout=out, stderr=out)
    try:
        proxy = Proxied(https_port, cert, seen)
        from tests.e2e import wait_for

        def up() -> bool:
            try:
                return proxy.request("GET", "/healthz")[0] == 200
            except OSError:
                return False

        wait_for("nginx", up, 15)
        seen.clear()
        yield proxy
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.stop()


def test_registration_through_nginx_with_tls(proxied: Proxied, emu: Emulator) -> None:  # noqa: F811
    token = emu.issue_token(account=ACCOUNT, license=LICENSE, agreement=AGREEMENT)
    status, headers, _ = proxied.post(token, "127.0.0.2")
    assert status == 302
    assert headers["Location"].startswith(f"https://app.example.com/welcome?account={ACCOUNT}")
    assert "/" not in headers.get("Server", "")  # server_tokens off: no version
    assert proxied.seen == [("POST", "127.0.0.2")]  # the buyer's address, forwarded


def test_per_client_limits_see_the_forwarded_address(proxied: Proxied, emu: Emulator) -> None:  # noqa: F811
    bad = [f"emu-reg-{i:032x}" for i in range(10)]
    answers = [proxied.post(bad[i], "127.0.0.3")[0] for i in range(limits.CLIENT_BURST + 1)]
    assert answers == [400] * limits.CLIENT_BURST + [429]  # the agent's limit for this buyer
    assert proxied.post(bad[8], "127.0.0.4")[0] == 400  # another buyer behind the same proxy
    resolved = [c for c in emu.calls() if c["operation"] == "ResolveCustomer"]
    assert len(resolved) == limits.CLIENT_BURST + 1


def test_nginx_limit_req_answers_before_the_agent(proxied: Proxied) -> None:
    statuses = [proxied.request("GET", source="127.0.0.5")[0] for _ in range(12)]
    passed = statuses.count(200)
    assert 6 <= passed <= 7 and statuses[-1] == 429  # 1 + burst=5 (and what 20/min refilled)
    assert proxied.seen == [("GET", "127.0.0.5")] * passed  # the rest never reached the agent
