"""AWS Signature Version 4 for the promql collector's reads of Amazon Managed Prometheus.

Why not botocore's signer: the daemon never loads boto3 or botocore (it keeps its footprint
small; the sender runs in a child). Signing a GET is a few HMACs, done here with the stdlib;
the credentials come from botocore's default chain (environment, instance role over IMDSv2,
ECS task role, IRSA) in a short-lived child (`python -m agent.collectors.sigv4`), which prints
them once; the daemon keeps them until shortly before they expire. tests/test_promql.py checks
each signature against botocore's own SigV4Auth.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from agent.collectors.base import CollectorError

# Fetched again this long after they were fetched, or this long before they expire: botocore
# refreshes an instance role's credentials 15 minutes before expiry, so the child sees new ones.
REFRESH_EVERY = 900.0
REFRESH_BEFORE_EXPIRY = 600.0
CHILD_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    token: str | None = None
    expires: float | None = None  # seconds since the epoch; None: does not expire


def sign_get(
    url: str, region: str, service: str, creds: Credentials, now: datetime
) -> dict[str, str]:
    """The headers that sign a GET of `url` (whose query string is already in AWS's canonical
    percent-encoding, see `canonical_query`): Host is signed, the body is empty."""
    parts = urllib.parse.urlsplit(url)
    amz_date = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    host = parts.hostname or ""
    if parts.port is not None and parts.port != {"http": 80, "https": 443}.get(parts.scheme):
        host = f"{host}:{parts.port}"
    headers = {"host": host, "x-amz-date": amz_date}
    if creds.token:
        headers["x-amz-security-token"] = creds.token
    signed = ";".join(sorted(headers))
    canonical = "\n".join(
        [
            "GET",
            urllib.parse.quote(parts.path or "/", safe="/~"),
            _sorted_query(parts.query),
            "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers)),
            signed,
            hashlib.sha256(b"").hexdigest(),
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = ("AWS4" + creds.secret_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {
        "X-Amz-Date": amz_date,
        "Authorization": f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}",
    }
    if creds.token:
        out["X-Amz-Security-Token"] = creds.token
    return out


def canonical_query(params: dict[str, str]) -> str:
    """A query string in the encoding SigV4 signs (RFC 3986 unreserved left alone, space as
    %20), so the URL sent is the URL signed."""
    return "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(params.items()))


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def _sorted_query(query: str) -> str:
    pairs = [p.partition("=") for p in query.split("&") if p]
    return "&".join(f"{k}={v}" for k, _, v in sorted(pairs))


class CredentialSource:
    """AWS credentials from botocore's default chain, fetched in a child and kept until they
    are due for a refresh. `fetch` is the child by default; tests pass their own."""

    def __init__(
        self, wall: Callable[[], float], fetch: Callable[[], Credentials] | None = None
    ) -> None:
        self.wall = wall
        self.fetch = fetch or fetch_in_child
        self._creds: Credentials | None = None
        self._due = 0.0

    def get(self) -> Credentials:
        now = self.wall()
        if self._creds is None or now >= self._due:
            creds = self.fetch()
            due = now + REFRESH_EVERY
            if creds.expires is not None:
                due = min(due, creds.expires - REFRESH_BEFORE_EXPIRY)
            self._creds, self._due = creds, due
        return self._creds

    def forget(self) -> None:
        """After an answer that refused the signature: fetch again at the next read."""
        self._creds = None


def fetch_in_child(timeout: float = CHILD_TIMEOUT) -> Credentials:
    """Run this module as a child that prints the default chain's credentials as JSON, within
    `timeout` (the read's own: an abandoned read leaves no child behind for long)."""
    env = {**os.environ, "AWS_EC2_METADATA_V1_DISABLED": "true"}  # IMDSv2 only (SPEC)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.collectors.sigv4"],
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CollectorError(f"could not get AWS credentials for sigv4: {e}") from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise CollectorError(
            f"no AWS credentials for sigv4: {lines[-1] if lines else done.returncode}"
        )
    try:
        data = json.loads(done.stdout)
        return Credentials(
            data["access_key"], data["secret_key"], data.get("token"), data.get("expires")
        )
    except (ValueError, KeyError, TypeError):
        raise CollectorError("could not get AWS credentials for sigv4: unreadable answer") from None


def _child() -> int:
    """Print the default chain's credentials (one JSON line) or one line on stderr."""
    import botocore.session
    from botocore.exceptions import BotoCoreError

    try:
        found = botocore.session.get_session().get_credentials()
        if found is None:
            print("the default chain found none (instance role, task role, environment)",
                  file=sys.stderr)  # fmt: skip
            return 1
        frozen = found.get_frozen_credentials()
    except BotoCoreError as e:
        print(str(e).splitlines()[0], file=sys.stderr)
        return 1
    expiry = getattr(found, "_expiry_time", None)  # RefreshableCredentials only
    json.dump(
        {
            "access_key": frozen.access_key,
            "secret_key": frozen.secret_key,
            "token": frozen.token,
            "expires": expiry.timestamp() if isinstance(expiry, datetime) else None,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child())
