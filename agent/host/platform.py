"""Where the agent runs (EC2 instance, ECS task, EKS pod) and the rules that follow from it.

Why one module: the platform decides where the region comes from, what identifies this ledger
(and seeds the send offset), and which credentials may sign MeterUsage. AWS refuses the node's
instance role for container products (the task role on ECS, IRSA on EKS must sign), so on ECS/EKS
credentials from IMDS are refused here, before a request leaves, with the role to set.

The environment is a parameter everywhere; the ECS task metadata v4 client speaks urllib with
short timeouts, so the daemon (which never imports boto3) can use it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import Unavailable

PLATFORMS = ("ec2", "ecs", "eks")
CONTAINERS = ("ecs", "eks")
ECS_METADATA_ENV = "ECS_CONTAINER_METADATA_URI_V4"
WEB_IDENTITY_ENV = "AWS_WEB_IDENTITY_TOKEN_FILE"
KUBERNETES_ENV = "KUBERNETES_SERVICE_HOST"
POD_UID_ENV = "POD_UID"
POD_IDENTITY_METHOD = "container-role"  # on EKS: EKS Pod Identity (on ECS: the task role)
STATIC_KEY_METHODS = ("env", "shared-credentials-file")  # long-lived keys, not the role's
NODE_ROLE_METHOD = "iam-role"  # botocore's credentials.method for the instance role (IMDS)
NODE_ROLE_CODE = "NodeRoleCredentials"  # the Outcome code of a refusal made here
ROLE_TO_SET = {
    "ecs": "set the task definition's taskRoleArn to a role whose policy allows "
    '"aws-marketplace:MeterUsage"',
    "eks": "run the pod under an IRSA service account annotated eks.amazonaws.com/role-arn with "
    'a role whose policy allows "aws-marketplace:MeterUsage"',
}


class PlatformError(Unavailable):
    """Task metadata or a container identity that cannot be had (exit 69, one line)."""


@dataclass(frozen=True)
class Platform:
    """The platform and how it was decided, for `check`, `status` and the start-up line."""

    name: str
    how: str

    @property
    def container(self) -> bool:
        return self.name in CONTAINERS


def detect(configured: str, env: Mapping[str, str]) -> Platform:
    """`platform:` from the config, or for `auto` SPEC's order: ECS metadata, then IRSA or
    Kubernetes, else EC2."""
    if configured != "auto":
        return Platform(configured, "set in config (platform)")
    if env.get(ECS_METADATA_ENV):
        return Platform("ecs", f"auto: ${ECS_METADATA_ENV} is set")
    for var in (WEB_IDENTITY_ENV, KUBERNETES_ENV):
        if env.get(var):
            return Platform("eks", f"auto: ${var} is set")
    return Platform("ec2", "auto: no ECS or Kubernetes variables")


class TaskMetadata:
    """ECS task metadata v4 (`$ECS_CONTAINER_METADATA_URI_V4/task`), fetched once per client.

    The endpoint is the ECS agent on the task's own network: it answers at once or not at all,
    so a few quick tries with short timeouts, then one line naming the variable."""

    def __init__(self, env: Mapping[str, str], timeout: float = 1.0, tries: int = 3) -> None:
        self.uri = (env.get(ECS_METADATA_ENV) or "").rstrip("/")
        self.timeout = timeout
        self.tries = tries
        self._task: dict[str, Any] | None = None

    def task(self) -> dict[str, Any]:
        if self._task is None:
            self._task = self._get("/task")
        return self._task

    def task_arn(self) -> str:
        arn = self.task().get("TaskARN")
        if not isinstance(arn, str) or not arn.startswith("arn:"):
            raise PlatformError(
                f"ECS task metadata at {self.uri}/task has no TaskARN; is "
                f"${ECS_METADATA_ENV} the ECS agent's task metadata v4 endpoint?"
            )
        return arn

    def _get(self, path: str) -> dict[str, Any]:
        if not self.uri:
            raise PlatformError(
                f"platform ecs but ${ECS_METADATA_ENV} is not set: run as an ECS task (the ECS "
                "agent sets it), or set platform to ec2 or eks"
            )
        error = ""
        for attempt in range(self.tries):
            if attempt:
                time.sleep(0.2 * attempt)
            try:
                with urllib.request.urlopen(self.uri + path, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode())
                if isinstance(data, dict):
                    return data
                error = "the answer is not a JSON object"
            except urllib.error.HTTPError as e:
                error = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                error = str(getattr(e, "reason", e))
            except ValueError:
                error = "the answer is not JSON"
        raise PlatformError(
            f"ECS task metadata at {self.uri}{path} failed ({error}); check "
            f"${ECS_METADATA_ENV} (set by the ECS agent)"
        )


def arn_region(arn: str) -> str | None:
    """The region field of an ARN (`arn:aws:ecs:eu-west-1:111122223333:task/...`)."""
    parts = arn.split(":")
    return parts[3] if len(parts) > 5 and parts[3] else None


def task_region(metadata: TaskMetadata) -> str:
    arn = metadata.task_arn()
    region = arn_region(arn)
    if region is None:
        raise PlatformError(f"ECS TaskARN {arn} names no region; set metering.region")
    return region


def identity(
    platform: str, env: Mapping[str, str], metadata: TaskMetadata | None = None
) -> tuple[str, str]:
    """(the ledger's id, where it came from) on a container platform: ECS the TaskARN, EKS
    $POD_UID (the downward API's metadata.uid), else $HOSTNAME (the pod's name). EC2's instance
    id is host/identity.py's, verified through IMDS."""
    if platform == "ecs":
        return (metadata or TaskMetadata(env)).task_arn(), "ECS task metadata TaskARN"
    if platform == "eks":
        for var in (POD_UID_ENV, "HOSTNAME"):
            if env.get(var):
                return env[var], f"${var}"
        raise PlatformError(
            "platform eks: neither $POD_UID nor $HOSTNAME is set; set POD_UID from the downward "
            "API (env: valueFrom: fieldRef: fieldPath: metadata.uid)"
        )
    raise ValueError(f"no container identity on {platform}")


def node_role_refusal(platform: str, method: str | None) -> str | None:
    """The one line refusing credentials from the node's instance role on ECS/EKS, or None.

    On EKS, EKS Pod Identity (botocore's `container-role`, AWS_CONTAINER_CREDENTIALS_FULL_URI)
    is refused too: AWS does not support it for container products' metering, only IRSA."""
    if platform == "eks" and method == POD_IDENTITY_METHOD:
        return (
            "credentials come from EKS Pod Identity, which AWS does not support for metering "
            f"from a container product; use IRSA: {ROLE_TO_SET['eks']}"
        )
    if platform not in CONTAINERS or method != NODE_ROLE_METHOD:
        return None
    where = "ECS task" if platform == "ecs" else "EKS pod"
    return (
        f"credentials come from the node's instance role (IMDS), which AWS refuses for MeterUsage "
        f"from an {where}; {ROLE_TO_SET[platform]}"
    )


def static_keys_warning(platform: str, method: str | None) -> str | None:
    """On ECS/EKS, a warning (not a refusal) for long-lived access keys in place of the role."""
    if platform not in CONTAINERS or method not in STATIC_KEY_METHODS:
        return None
    return (
        f"credentials are static access keys ({method}), not the "
        f"{'task role' if platform == 'ecs' else 'IRSA role'}: they work, but are long-lived "
        f"secrets in the image or task; {ROLE_TO_SET[platform]}"
    )


def check_failure_policy(configured: str | None, platform: str) -> str:
    """metering.on_check_failure: as set, else exit on ECS/EKS (AWS asks container products to
    stop) and continue on EC2 (keep sampling, re-check every 5 minutes)."""
    if configured is not None:
        return configured
    return "exit" if platform in CONTAINERS else "continue"


def expected_credentials(env: Mapping[str, str]) -> str:
    """What the default chain will find, judged from the environment (the daemon never loads
    botocore; the sender records botocore's own `credentials.method` for `status`)."""
    if env.get("AWS_ACCESS_KEY_ID"):
        return "env (AWS_ACCESS_KEY_ID)"
    if env.get(WEB_IDENTITY_ENV) and env.get("AWS_ROLE_ARN"):
        return "assume-role-with-web-identity (IRSA)"
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI"
    ):
        return "container-role (task role)"
    return "default chain (profile or instance role)"
