"""The container packaging's static facts: the image's contract, the ECS task definition, the
Kubernetes manifests (validated against Kubernetes' own schemas, offline) and the IAM policy.

Why: these files are copied by sellers into their own accounts, where a wrong field shows up only
as a task that never meters. What can be checked without AWS is checked here; the image itself is
built and run by packaging/ci/container-check.sh.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import config as config_mod
from agent.daemon.daemon import CONTAINER_STOP_FLUSH
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
    assert allowed == {
        "agent",
        "pyproject.toml",
        "README.md",
        "packaging/requirements.txt",
        "packaging/container/slim_venv.py",
    }
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

KUBE = PACKAGING / "kubernetes"


def kube_docs() -> dict[str, dict[str, Any]]:
    """What `kubectl apply -f packaging/kubernetes/` applies, by kind."""
    docs = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def workloads() -> dict[str, dict[str, Any]]:
    """Every workload shipped (deployment.yaml and the persistent ledger's StatefulSet), by file."""
    found = {}
    for path in sorted(KUBE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] in ("Deployment", "StatefulSet"):
                found[str(path.relative_to(KUBE))] = doc
    assert set(found) == {"deployment.yaml", "persistent/statefulset.yaml"}
    return found


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    import kubernetes_validate

    paths = sorted(KUBE.rglob("*.yaml"))
    assert {p.name for p in paths} >= {
        "00-namespace.yaml",
        "deployment.yaml",
        "serviceaccount.yaml",
        "configmap.yaml",
        "statefulset.yaml",
    }
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


def test_the_namespace_is_made_first_and_enforces_restricted() -> None:
    names = sorted(p.name for p in KUBE.glob("*.yaml"))  # kubectl apply -f DIR: in name order
    first = yaml.safe_load((KUBE / names[0]).read_text())
    assert first["kind"] == "Namespace"
    labels = first["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    namespaced = [d for d in kube_docs().values() if d["kind"] != "Namespace"]
    namespaced += workloads().values()
    assert {d["metadata"]["namespace"] for d in namespaced} == {first["metadata"]["name"]}


# The Pod Security Standards' "restricted" profile (kubernetes.io/docs/concepts/security/
# pod-security-standards/, policy version v1.30 and later): every control that a pod spec's fields
# decide, including the baseline ones it builds on.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}  # fmt: skip
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in a pod spec the "restricted" profile refuses, one line each ([] when it passes)."""
    out: list[str] = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key}: true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {volume['name']}: {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']}")
    pod_seccomp = pod_sc.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    if pod_sc.get("runAsUser") == 0:
        out.append("pod runAsUser: 0")
    if pod_sc.get("windowsOptions", {}).get("hostProcess"):
        out.append("pod hostProcess")
    containers = pod.get("initContainers", []) + pod["containers"]
    containers += pod.get("ephemeralContainers", [])
    for c in containers:
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            out.append(f"{name}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = sc.get("seccompProfile", {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp} (pod or container)")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities add {caps['add']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc['procMount']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
        selinux = sc.get("seLinuxOptions", {})
        if selinux.get("user") or selinux.get("role"):
            out.append(f"{name}: seLinuxOptions user/role")
        if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
            out.append(f"{name}: appArmorProfile Unconfined")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
    return out


@pytest.mark.parametrize("path", ["deployment.yaml", "persistent/statefulset.yaml"])
def test_the_pods_pass_the_restricted_pod_security_standard(path: str) -> None:
    assert restricted_violations(workloads()[path]["spec"]["template"]["spec"]) == []


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda pod: pod["securityContext"].pop("seccompProfile"), "seccompProfile is None"),
        (lambda pod: pod["securityContext"].pop("runAsNonRoot"), "product: runAsNonRoot"),
        (lambda pod: pod["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
         "product: allowPrivilegeEscalation"),
        (lambda pod: pod["initContainers"][0]["securityContext"]["capabilities"].update(
            drop=["NET_RAW"]), "metering-agent: capabilities do not drop ALL"),
        (lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(
            add=["SYS_ADMIN"]), "product: capabilities add"),
        (lambda pod: pod["volumes"].append({"name": "h", "hostPath": {"path": "/var/log"}}),
         "volume h"),
        (lambda pod: pod.update(hostNetwork=True), "hostNetwork"),
        (lambda pod: pod["containers"][0]["securityContext"].update(runAsUser=0),
         "product: runAsUser 0"),
    ],
)  # fmt: skip
def test_the_restricted_check_can_fail(break_it: Callable[[Any], Any], expected: str) -> None:
    pod = copy.deepcopy(kube_docs()["Deployment"]["spec"]["template"]["spec"])
    break_it(pod)
    assert any(expected in v for v in restricted_violations(pod)), restricted_violations(pod)


def agent_container(pod: dict[str, Any]) -> dict[str, Any]:
    (agent,) = [
        c
        for c in pod.get("initContainers", []) + pod["containers"]
        if c["name"] == "metering-agent"
    ]
    return agent  # type: ignore[no-any-return]


# The agent's stop in a pod (docs/containers.md, daemon.py): a 20 s flush counted from SIGTERM,
# its sender child ended 2 s later, then the exit: at most about 25 s.
AGENT_STOP = CONTAINER_STOP_FLUSH + 5


@pytest.mark.parametrize("path", ["deployment.yaml", "persistent/statefulset.yaml"])
def test_the_grace_period_leaves_the_agent_its_stop_and_says_the_same_as_the_docs(
    path: str,
) -> None:
    pod = workloads()[path]["spec"]["template"]["spec"]
    # the native sidecar stops after the product: the grace is the product's stop plus the agent's
    assert pod["terminationGracePeriodSeconds"] >= AGENT_STOP + 30  # 30: Kubernetes' default
    comment = (KUBE / "deployment.yaml").read_text()
    assert f"about {AGENT_STOP} s" in comment and "30 s" not in comment
    docs = (ROOT / "docs" / "containers.md").read_text()
    assert f"about {AGENT_STOP} s" in docs


def test_deployment_runs_the_agent_beside_the_product() -> None:
    docs = kube_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    agent = agent_container(pod)
    assert agent.get("restartPolicy") == "Always"  # a native sidecar: stops after the product
    assert agent["securityContext"]["runAsUser"] == int(AGENT_UID)
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_UID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    account = docs["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert re.fullmatch(
        r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+",
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
    )
    # no probe (deployment.yaml says why): a liveness probe on metering health would restart the
    # agent through an outage it rides out; a sidecar's readiness is the pod's
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(agent)


def test_the_statefulset_is_the_deployment_with_a_claim_for_the_ledger() -> None:
    found = workloads()
    deployment, stateful = found["deployment.yaml"], found["persistent/statefulset.yaml"]
    pod, spod = deployment["spec"]["template"]["spec"], stateful["spec"]["template"]["spec"]
    state = [v for v in pod["volumes"] if v["name"] == "metering-state"]
    assert state == [{"name": "metering-state", "emptyDir": {}}]
    assert spod["volumes"] == [v for v in pod["volumes"] if v["name"] != "metering-state"]
    assert {k: v for k, v in spod.items() if k != "volumes"} == {
        k: v for k, v in pod.items() if k != "volumes"
    }
    (claim,) = stateful["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "metering-state"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # one pod, one ledger
    mounts = {m["name"]: m["mountPath"] for m in agent_container(spod)["volumeMounts"]}
    assert mounts["metering-state"] == "/var/lib/metering-agent"


def test_deployment_shares_an_empty_dir_for_logs_read_only_with_the_agent() -> None:
    pod = kube_docs()["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    agent = agent_container(pod)
    (product,) = [c for c in pod["containers"] if c["name"] != "metering-agent"]
    (logs,) = [m for m in agent["volumeMounts"] if m["mountPath"] == "/var/log/product"]
    assert logs["readOnly"] is True
    assert "emptyDir" in volumes[logs["name"]]
    assert any(m["name"] == logs["name"] and not m.get("readOnly") for m in product["volumeMounts"])


def test_configmap_is_a_valid_agent_config_mounted_as_a_directory(tmp_path: Path) -> None:
    docs = kube_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    agent = agent_container(pod)
    config_dir = str(Path(config_mod.DEFAULT_PATH).parent)
    (mount,) = [m for m in agent["volumeMounts"] if m["mountPath"] == config_dir]
    # a subPath mount is a copy made at the start: edits to the ConfigMap would never arrive
    assert "subPath" not in mount and mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "items" not in volume["configMap"]  # every key lands in the directory
    for key, content in configmap["data"].items():
        (tmp_path / key).write_text(content)
    cfg = config_mod.load(tmp_path / Path(config_mod.DEFAULT_PATH).name)  # a bad key fails here
    log_mounts = [m["mountPath"] for m in agent["volumeMounts"] if m.get("readOnly")]
    for dim in cfg.dimensions:
        if dim.collector.type == "log":
            assert any(str(dim.collector.options["path"]).startswith(p + "/") for p in log_mounts)
