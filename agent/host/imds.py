"""IMDSv2 (token first, never v1; botocore's endpoint variable honoured) and the region the agent
sends to, by platform: config, $AWS_REGION, $AWS_DEFAULT_REGION, then the ECS TaskARN or IMDS."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping

from agent.errors import Unavailable
from agent.host.platform import (
    TaskMetadata,
    task_region,
)

IMDS_DEFAULT = "http://169.254.169.254"
IMDS_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"


class ImdsError(Unavailable):
    pass


class Imds:
    """A minimal IMDSv2 client (token first, never v1), honouring botocore's endpoint variable."""

    def __init__(
        self,
        endpoint: str | None = None,
        timeout: float = 1.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.endpoint = (endpoint or env.get(IMDS_ENV) or IMDS_DEFAULT).rstrip("/")
        self.timeout = timeout
        self._token: str | None = None

    def _open(self, req: urllib.request.Request) -> str:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return str(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise ImdsError(
                f"IMDS at {self.endpoint} answered HTTP {e.code} for {req.full_url}"
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ImdsError(
                f"IMDS at {self.endpoint} is unreachable ({reason}); not on EC2? set "
                f"metering.region, or {IMDS_ENV} for a test IMDS"
            ) from None

    def token(self) -> str:
        if self._token is None:
            req = urllib.request.Request(
                f"{self.endpoint}/latest/api/token",
                method="PUT",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
            )
            self._token = self._open(req)
        return self._token

    def get(self, path: str) -> str:
        req = urllib.request.Request(
            f"{self.endpoint}/latest/meta-data/{path}",
            headers={"X-aws-ec2-metadata-token": self.token()},
        )
        return self._open(req).strip()

    def region(self) -> str:
        return self.get("placement/region")

    def instance_id(self) -> str:
        return self.get("instance-id")


def resolve_region(
    configured: str,
    env: Mapping[str, str] | None = None,
    imds: Imds | None = None,
    platform: str = "ec2",
    metadata: TaskMetadata | None = None,
) -> tuple[str, str]:
    """(region, where it came from): config, then $AWS_REGION, $AWS_DEFAULT_REGION, then on ECS
    the task metadata's TaskARN, on EC2/EKS IMDS (on EKS a pod often cannot reach it: hop limit)."""
    env = os.environ if env is None else env
    if configured and configured != "auto":
        return configured, "config metering.region"
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        if env.get(var):
            return env[var], f"${var}"
    if platform == "ecs":
        return task_region(metadata or TaskMetadata(env)), "ECS task metadata TaskARN"
    imds = imds or Imds(env=env)
    if platform == "eks":
        try:
            return imds.region(), "IMDS placement/region"
        except ImdsError as e:
            raise ImdsError(
                f"{e}; in an EKS pod set AWS_REGION (or metering.region), or raise the node's "
                "IMDSv2 hop limit to 2"
            ) from None
    return imds.region(), "IMDS placement/region"
