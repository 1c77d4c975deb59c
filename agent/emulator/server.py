"""The emulator on HTTP: the AWS JSON 1.1 protocol (`X-Amz-Target`), IMDSv2, ECS task metadata
and credentials, STS AssumeRoleWithWebIdentity, and the `/_emulator/` control endpoints."""

from __future__ import annotations

import contextlib
import email.utils
import json
import threading
import time
import urllib.parse
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.clock import Clock, iso
from agent.emulator.rules import (
    ACCESS_KEY,
    ACCOUNT,
    CREDENTIAL,
    IRSA_KEY,
    TARGET_PREFIX,
    TASK_ROLE_ARN,
    TASK_ROLE_KEY,
    ServiceError,
    Settings,
    _Drop,
    _expiration,
    _record_json,
)
from agent.emulator.service import Service


class _Handler(BaseHTTPRequestHandler):
    emulator: Service
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read records
        pass

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        self.end_headers()
        self.wfile.write(data)

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The `Date` header on the emulator's clock, as the service's own clock would say."""
        return email.utils.formatdate(
            self.emulator.clock.time() if timestamp is None else timestamp, usegmt=True
        )

    def _imds_silent(self) -> bool:
        """A slow first boot: IMDS holds the request, then closes it without an answer."""
        hang = self.emulator.settings.imds_hang
        if hang <= 0:
            return False
        time.sleep(hang)
        self._drop()
        return True

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/plain")

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(2)

    # IMDSv2 ---------------------------------------------------------------------------------

    def do_PUT(self) -> None:
        self._body()
        if self._imds_silent():
            return None
        if self.path != "/latest/api/token" or not self.emulator.settings.imds:
            return self._text(404, "Not Found")
        if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._text(400, "Missing TTL header")
        self._text(200, "emulator-imds-token-" + uuid.uuid4().hex)

    def do_GET(self) -> None:
        e = self.emulator
        if self.path.startswith("/_emulator/"):
            return self._control_get()
        if self.path.startswith("/ecs/"):
            return self._ecs()
        if self._imds_silent():
            return None
        if not e.settings.imds or not self.path.startswith("/latest/meta-data/"):
            return self._text(404, "Not Found")
        if not (self.headers.get("X-aws-ec2-metadata-token") or "").startswith(
            "emulator-imds-token-"
        ):
            return self._text(401, "Unauthorized")  # IMDSv2 only: no token, no answer
        path = self.path[len("/latest/meta-data/") :]
        s = e.settings
        creds_path = "iam/security-credentials/"
        answers = {
            "placement/region": s.region,
            "placement/availability-zone": s.region + "a",
            "instance-id": s.instance_id,
            creds_path: s.role,
            creds_path.rstrip("/"): s.role,
        }
        if path in answers:
            return self._text(200, answers[path])
        if path == creds_path + s.role:
            now = Clock().time()  # botocore checks the expiry on the client's own wall clock
            return self._send(
                200,
                {
                    "Code": "Success",
                    "LastUpdated": iso(now),
                    "Type": "AWS-HMAC",
                    "AccessKeyId": ACCESS_KEY,
                    "SecretAccessKey": "emulatorsecretkeyemulatorsecretkey000000",
                    "Token": "emulator-session-token",
                    "Expiration": _expiration(),
                },
            )
        self._text(404, "Not Found")

    # ECS task metadata v4, container credentials, STS (IRSA) -------------------------------

    def _ecs(self) -> None:
        s = self.emulator.settings
        arn = f"arn:aws:ecs:{s.region}:{ACCOUNT}:task/emulator-cluster/{s.task_id}"
        container = {
            "DockerId": "emulator-container-" + s.task_id[:12],
            "Name": "metering-agent",
            "Image": "localhost/metering-agent",
            "Labels": {"com.amazonaws.ecs.task-arn": arn},
            "ContainerARN": f"arn:aws:ecs:{s.region}:{ACCOUNT}:container/emulator-cluster/"
            f"{s.task_id}/metering-agent",
        }
        if self.path.rstrip("/") == "/ecs/v4/task":
            self._record(
                {"operation": "TaskMetadata", "time": self.emulator.clock.time(), "outcome": "ok"}
            )
            return self._send(
                200,
                {
                    "Cluster": f"arn:aws:ecs:{s.region}:{ACCOUNT}:cluster/emulator-cluster",
                    "TaskARN": arn,
                    "Family": "emulator-product",
                    "Revision": "1",
                    "DesiredStatus": "RUNNING",
                    "KnownStatus": "RUNNING",
                    "AvailabilityZone": s.region + "a",
                    "LaunchType": "FARGATE",
                    "Containers": [container],
                },
            )
        if self.path.rstrip("/") == "/ecs/v4":
            return self._send(200, container)
        if self.path.rstrip("/") == "/ecs/credentials":
            self._record(
                {
                    "operation": "ContainerCredentials",
                    "time": self.emulator.clock.time(),
                    "outcome": "ok",
                }
            )
            return self._send(
                200,
                {
                    "AccessKeyId": TASK_ROLE_KEY,
                    "SecretAccessKey": "emulatortaskrolesecretemulatortaskrole00",
                    "Token": "emulator-task-role-session-token",
                    "Expiration": _expiration(),
                    "RoleArn": TASK_ROLE_ARN,
                },
            )
        self._text(404, "Not Found")

    def _sts(self, raw: bytes) -> bool:
        """STS AssumeRoleWithWebIdentity (unsigned, a form POST): the IRSA role's credentials."""
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
        if form.get("Action") != ["AssumeRoleWithWebIdentity"]:
            return False
        role = (form.get("RoleArn") or [f"arn:aws:iam::{ACCOUNT}:role/emulator-irsa-role"])[0]
        session = (form.get("RoleSessionName") or ["metering-agent"])[0]
        self._record(
            {"operation": "AssumeRoleWithWebIdentity", "time": self.emulator.clock.time(),
             "outcome": "ok", "role": role, "token": bool(form.get("WebIdentityToken"))}
        )  # fmt: skip
        xml = f"""<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>system:serviceaccount:default:metering-agent</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>{role.replace(":role/", ":assumed-role/").replace("arn:aws:iam:", "arn:aws:sts:")}/{session}</Arn>
      <AssumedRoleId>AROAEMULATORIRSAROLE:{session}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>{IRSA_KEY}</AccessKeyId>
      <SecretAccessKey>emulatorirsarolesecretemulatorirsarole00</SecretAccessKey>
      <SessionToken>emulator-irsa-session-token</SessionToken>
      <Expiration>{_expiration()}</Expiration>
    </Credentials>
    <Audience>sts.amazonaws.com</Audience>
    <Provider>arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.eks.emulator.amazonaws.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
"""  # noqa: E501
        self._send(200, xml.encode(), "text/xml")
        return True

    # MeterUsage and control ----------------------------------------------------------------

    def do_POST(self) -> None:
        raw = self._body()
        if self.path.startswith("/_emulator/"):
            return self._control_post(raw)
        if "x-www-form-urlencoded" in self.headers.get("Content-Type", "") and self._sts(raw):
            return None
        target = self.headers.get("X-Amz-Target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else target
        auth = self.headers.get("Authorization", "")
        m = CREDENTIAL.search(auth)
        call: dict[str, Any] = {"operation": operation, "time": self.emulator.clock.time()}
        try:
            if not m:
                raise ServiceError("MissingAuthenticationTokenException", "request is not signed")
            caller, signed_region = m.group(1), m.group(2)
            self._check_signature_date()
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise ServiceError("SerializationException", "body is not JSON") from None
            call["request"] = body
            call["size"] = len(raw)
            with self.emulator.lock:
                self.emulator.state.received.append(dict(call))
            answer = self.emulator.call(operation, body, caller, signed_region)
        except _Drop:
            call["outcome"] = "dropped"
            self._record(call)
            return self._drop()
        except ServiceError as err:
            call.update(outcome="error", code=err.code)
            self._record(call)
            return self._send(
                err.status,
                {"__type": err.code, "message": err.message},
                "application/x-amz-json-1.1",
            )
        call.update(outcome="ok", answer=answer)
        self._record(call)
        self._send(200, answer, "application/x-amz-json-1.1")

    def _check_signature_date(self) -> None:
        """SigV4: a request signed more than the window away from the service's clock."""
        window = self.emulator.settings.signature_window
        stamp = self.headers.get("X-Amz-Date", "")
        if window is None or not stamp:
            return
        try:
            signed = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
        except ValueError:
            raise ServiceError("IncompleteSignatureException", "X-Amz-Date is malformed") from None
        now = self.emulator.clock.time()
        if abs(signed.timestamp() - now) > window:
            earliest = datetime.fromtimestamp(now - window, tz=timezone.utc)
            raise ServiceError(
                "InvalidSignatureException",
                f"Signature expired: {stamp} is now earlier than "
                f"{earliest.strftime('%Y%m%dT%H%M%SZ')} ({iso(now)} - 5 min.)",
                403,
            )

    def _record(self, call: dict[str, Any]) -> None:
        with self.emulator.lock:
            self.emulator.state.calls.append(call)

    def _control_get(self) -> None:
        e = self.emulator
        if self.path == "/_emulator/records":
            return self._send(200, [_record_json(r) for r in e.records()])
        if self.path == "/_emulator/calls":
            return self._send(200, e.calls())
        if self.path == "/_emulator/public_key":
            return self._send(200, e.public_key_pem(), "text/plain")
        self._text(404, "Not Found")

    def _control_post(self, raw: bytes) -> None:
        e = self.emulator
        try:
            data = json.loads(raw or b"{}")
            if self.path == "/_emulator/faults":
                for fault in data if isinstance(data, list) else [data]:
                    e.inject(**fault)
            elif self.path == "/_emulator/settings":
                e.configure(**data)
            elif self.path == "/_emulator/tokens":
                return self._send(200, {"token": e.issue_token(**data)})
            else:
                return self._text(404, "Not Found")
        except (TypeError, ValueError) as err:
            return self._send(400, {"error": str(err)})
        self._send(200, {"ok": True})


class Emulator(Service):
    """The service's state and rules (Service), served on 127.0.0.1 by `serve()`."""

    def __init__(self, settings: Settings | None = None, clock: Clock | None = None) -> None:
        super().__init__(settings, clock)
        self.server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Start serving in a background thread; returns the base URL (tests may listen on
        another of this machine's addresses, to be a non-loopback endpoint)."""
        handler = type("Handler", (_Handler,), {"emulator": self})
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
