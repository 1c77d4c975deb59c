"""The container packaging's static facts: the image's contract, the ECS task definition, the
Kubernetes manifests (validated against Kubernetes' own schemas, offline) and the IAM policy.

Why: these files are copied by sellers into their own accounts, where a wrong field shows up only
as a task that never meters. What can be checked without AWS is checked here; the image itself is
built and run by packaging/ci/container-check.sh.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config as config_mod
from agent.daemon.sender import STOP_FLUSH
from tests.conftest import ROOT

PACKAGING = ROOT / "packaging"
AGENT_UID = "10001"
METERING_ACTIONS = {"aws-marketplace:MeterUsage", "aws-marketplace:RegisterUsage"}


def containerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, for the final stage (after the last FROM)."""
    text = (PACKAGING / "container" / "Containerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: list[dict[str, list[str]]] = [{}]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append({})
        stages[-1].setdefault(word.upper(), []).append(rest.strip())
    final = stages[-1]
    final["ARG(global)"] = stages[0].get("ARG", [])
    return final


def test_containerfile_contract() -> None:
    final = containerfile()
    assert "BASE=debian:12-slim" in final["ARG(global)"]
    assert final["FROM"] == ["${BASE}"]
    assert final["USER"] == [f"{AGENT_UID}:{AGENT_UID}"]
    assert json.loads(final["ENTRYPOINT"][0]) == ["metering-agent"]
    assert json.loads(final["CMD"][0]) == ["run"]
    assert final["VOLUME"] == ["/var/lib/metering-agent"]
    assert final["STOPSIGNAL"] == ["SIGTERM"]
    assert final["HEALTHCHECK"][0].endswith('CMD ["metering-agent", "status", "--check"]')
    # the final stage gets python3 only, without recommends, and leaves no apt lists behind
    (install,) = [r for r in final["RUN"] if "apt-get install" in r]
    assert "--no-install-recommends python3 " in install
    assert "python3-venv" not in install and "pip" not in install.replace("pipefail", "")
    assert "rm -rf /var/lib/apt/lists/*" in install


def test_build_context_holds_only_what_the_image_needs() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".containerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # everything excluded, then the few inputs let back in
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    assert allowed == {"agent", "pyproject.toml", "README.md", "packaging/requirements.txt"}
    # docker build reads <Containerfile>.dockerignore beside the file: the same list
    beside = PACKAGING / "container" / "Containerfile.dockerignore"
    assert beside.read_text() == (ROOT / ".containerignore").read_text()
    copied = " ".join(containerfile_copies())
    for path in allowed:
        assert path.split("/")[-1] in copied, path


def containerfile_copies() -> list[str]:
    text = (PACKAGING / "container" / "Containerfile").read_text()
    return [line for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line]


def test_requirements_pin_cryptography_for_register_usage() -> None:
    pins = dict(
        line.split("==")
        for line in (PACKAGING / "requirements.txt").read_text().splitlines()
        if "==" in line
    )
    assert {"cryptography", "cffi", "pycparser"} <= {k.lower() for k in pins}


# -- IAM ----------------------------------------------------------------------------------------


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_iam_policy_allows_exactly_metering() -> None:
    policy = load_json(PACKAGING / "iam" / "metering-policy.json")
    assert policy["Version"] == "2012-10-17"
    (statement,) = policy["Statement"]
    assert statement["Effect"] == "Allow"
    assert set(statement["Action"]) == METERING_ACTIONS
    assert statement["Resource"] == "*"  # MeterUsage and RegisterUsage take no resource ARN


def test_trust_policies_name_the_task_service_and_the_service_account() -> None:
    ecs = load_json(PACKAGING / "iam" / "ecs-task-trust-policy.json")["Statement"][0]
    assert ecs["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert ecs["Action"] == "sts:AssumeRole"
    irsa = load_json(PACKAGING / "iam" / "irsa-trust-policy.json")["Statement"][0]
    assert irsa["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert ":oidc-provider/" in irsa["Principal"]["Federated"]
    subjects = [v for k, v in irsa["Condition"]["StringEquals"].items() if k.endswith(":sub")]
    account = kube_docs()["ServiceAccount"]["metadata"]
    assert subjects == [f"system:serviceaccount:{account['namespace']}:{account['name']}"]


# -- ECS ----------------------------------------------------------------------------------------


def task_definition() -> dict[str, Any]:
    return load_json(PACKAGING / "ecs" / "task-definition.json")  # type: ignore[no-any-return]


def test_task_definition_runs_the_agent_as_an_essential_sidecar() -> None:
    task = task_definition()
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", task["taskRoleArn"])
    containers = {c["name"]: c for c in task["containerDefinitions"]}
    agent = containers.pop("metering-agent")
    (product,) = containers.values()
    # essential: the agent's exit 77 (a failed DryRun or RegisterUsage) stops the task
    assert agent["essential"] is True and product["essential"] is True
    # the product starts after the agent and so is stopped before it
    assert product["dependsOn"] == [{"containerName": "metering-agent", "condition": "START"}]
    assert "healthCheck" not in agent  # an unhealthy essential container gets the task replaced
    assert STOP_FLUSH <= agent["stopTimeout"] <= 120  # Fargate's maximum
    assert agent.get("user", f"{AGENT_UID}:{AGENT_UID}") == f"{AGENT_UID}:{AGENT_UID}"


def test_task_definition_shares_the_log_volume_read_only_with_the_agent() -> None:
    task = task_definition()
    volumes = {v["name"] for v in task["volumes"]}
    containers = {c["name"]: c for c in task["containerDefinitions"]}
    agent_mounts = containers.pop("metering-agent")["mountPoints"]
    (product,) = containers.values()
    (logs,) = [m for m in agent_mounts if m["containerPath"] == "/var/log/product"]
    assert logs["readOnly"] is True and logs["sourceVolume"] in volumes
    writers = [m for m in product["mountPoints"] if m["sourceVolume"] == logs["sourceVolume"]]
    assert writers and writers[0]["readOnly"] is False


# -- Kubernetes ---------------------------------------------------------------------------------


def kube_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted((PACKAGING / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    import kubernetes_validate

    paths = sorted((PACKAGING / "kubernetes").glob("*.yaml"))
    assert {p.name for p in paths} >= {"deployment.yaml", "serviceaccount.yaml", "configmap.yaml"}
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_can_fail() -> None:
    import kubernetes_validate

    pod = kube_docs()["Deployment"]["spec"]["template"]["spec"]
    broken = {**kube_docs()["Deployment"]}
    broken["spec"] = {**broken["spec"], "template": {"spec": {**pod, "grace": 30}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def agent_container(pod: dict[str, Any]) -> dict[str, Any]:
    (agent,) = [
        c
        for c in pod.get("initContainers", []) + pod["containers"]
        if c["name"] == "metering-agent"
    ]
    return agent  # type: ignore[no-any-return]


def test_deployment_runs_the_agent_beside_the_product() -> None:
    docs = kube_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    agent = agent_container(pod)
    assert agent.get("restartPolicy") == "Always"  # a native sidecar: stops after the product
    assert pod["terminationGracePeriodSeconds"] >= STOP_FLUSH
    assert agent["securityContext"]["runAsUser"] == int(AGENT_UID)
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_UID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    account = docs["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
    )


def test_deployment_shares_an_empty_dir_for_logs_read_only_with_the_agent() -> None:
    pod = kube_docs()["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent = agent_container(pod)
    (product,) = [c for c in pod["containers"] if c["name"] != "metering-agent"]
    (logs,) = [m for m in agent["volumeMounts"] if m["mountPath"] == "/var/log/product"]
    assert logs["readOnly"] is True
    assert "emptyDir" in volumes[logs["name"]]
    assert any(m["name"] == logs["name"] and not m.get("readOnly") for m in product["volumeMounts"])


def test_configmap_is_a_valid_agent_config_mounted_where_the_agent_reads(tmp_path: Path) -> None:
    docs = kube_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    agent = agent_container(pod)
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == config_mod.DEFAULT_PATH]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    path = tmp_path / mount["subPath"]
    path.write_text(configmap["data"][mount["subPath"]])
    cfg = config_mod.load(path)  # the agent's own loader: a bad key fails here
    log_mounts = [m["mountPath"] for m in agent["volumeMounts"] if m.get("readOnly")]
    for dim in cfg.dimensions:
        if dim.collector.type == "log":
            assert any(str(dim.collector.options["path"]).startswith(p + "/") for p in log_mounts)
