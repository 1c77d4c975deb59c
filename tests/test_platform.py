"""Platform rules (detection, region, identity, the node-role refusal, the check-failure policy),
the container identity's ledger handling, and the container credentials through a real boto3
client against the emulator's task metadata, credentials endpoint and STS."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from agent.aggregate import Quantity
from agent.config import load
from agent.daemon.sender import SenderProcess
from agent.emulator import ACCESS_KEY, IRSA_KEY, TASK_ROLE_KEY, Emulator, Settings
from agent.errors import EX_CONFIG, EX_NOPERM, EX_OK, EX_UNAVAILABLE, ConfigError
from agent.host import identity, platform
from agent.host.imds import ImdsError, resolve_region
from agent.ledger import Ledger
from agent.ledger.hours import SealedHour
from agent.modes.instance import seal_hours
from agent.sending.client import MeteringClient
from tests.billing import make_config, sealed_hour
from tests.conftest import PRODUCT, ConfigWriter, run_cli
from tests.test_sealing import fill
from tests.test_sender_process import FakePopen, Mono

CLOSED = "http://127.0.0.1:9"


@pytest.fixture
def emu():
    emulator = Emulator(Settings(region="ap-southeast-2", product_codes={PRODUCT}, task_id="t1"))
    emulator.serve(0)
    yield emulator
    emulator.stop()


def task_arn(emu: Emulator) -> str:
    return f"arn:aws:ecs:{emu.settings.region}:111122223333:task/emulator-cluster/t1"


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        ("auto", {}, "ec2"),
        ("auto", {"ECS_CONTAINER_METADATA_URI_V4": "http://x/v4"}, "ecs"),
        ("auto", {"AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token"}, "eks"),
        ("auto", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "eks"),
        # ECS first: an ECS task may carry Kubernetes-looking variables, not the reverse
        ("auto", {"ECS_CONTAINER_METADATA_URI_V4": "u", "KUBERNETES_SERVICE_HOST": "h"}, "ecs"),
        ("auto", {"ECS_CONTAINER_METADATA_URI_V4": ""}, "ec2"),  # set but empty: not set
        ("ec2", {"ECS_CONTAINER_METADATA_URI_V4": "http://x/v4"}, "ec2"),
        ("eks", {}, "eks"),
    ],
)
def test_detection(configured: str, env: dict[str, str], expected: str) -> None:
    found = platform.detect(configured, env)
    assert found.name == expected
    assert found.container == (expected != "ec2")


def test_arn_region() -> None:
    assert platform.arn_region("arn:aws:ecs:eu-central-1:1:task/c/abc") == "eu-central-1"
    assert platform.arn_region("arn:aws:ecs::1:task/c/abc") is None
    assert platform.arn_region("not-an-arn") is None


class TestTaskMetadata:
    def test_task_arn_from_the_emulator(self, emu: Emulator) -> None:
        meta = platform.TaskMetadata({"ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4"})
        assert meta.task_arn() == task_arn(emu)
        assert {"Cluster", "Family", "Revision", "AvailabilityZone"} <= set(meta.task())
        meta.task_arn()
        asked = [c for c in emu.calls("ok") if c["operation"] == "TaskMetadata"]
        assert len(asked) == 1  # fetched once per client
        assert emu.calls("error") == []  # what `trial` reads as refusals

    def test_unreachable_is_one_line_69(self) -> None:
        meta = platform.TaskMetadata({"ECS_CONTAINER_METADATA_URI_V4": CLOSED}, timeout=0.2)
        with pytest.raises(platform.PlatformError) as info:
            meta.task_arn()
        assert info.value.exit_code == EX_UNAVAILABLE
        assert "\n" not in str(info.value) and "ECS_CONTAINER_METADATA_URI_V4" in str(info.value)

    def test_not_set(self) -> None:
        with pytest.raises(platform.PlatformError, match="not set"):
            platform.TaskMetadata({}).task_arn()

    def test_no_task_arn(self, emu: Emulator) -> None:
        meta = platform.TaskMetadata({"ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4/task"})
        with pytest.raises(platform.PlatformError):  # .../task/task: not found
            meta.task_arn()


class TestRegion:
    def test_ecs_from_the_task_arn(self, emu: Emulator) -> None:
        env = {"ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4", "AWS_EC2_METADATA_"
               "SERVICE_ENDPOINT": CLOSED}  # fmt: skip
        assert resolve_region("auto", env, platform="ecs") == (
            "ap-southeast-2",
            "ECS task metadata TaskARN",
        )

    def test_environment_before_task_metadata(self, emu: Emulator) -> None:
        env = {"ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4", "AWS_REGION": "us-west-2"}
        assert resolve_region("auto", env, platform="ecs") == ("us-west-2", "$AWS_REGION")
        assert resolve_region("eu-north-1", env, platform="ecs")[0] == "eu-north-1"
        assert emu.calls() == []

    def test_eks_without_imds_says_what_to_set(self) -> None:
        env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": CLOSED}
        with pytest.raises(ImdsError) as info:
            resolve_region("auto", env, platform="eks")
        assert "AWS_REGION" in str(info.value) and "hop limit" in str(info.value)
        assert info.value.exit_code == EX_UNAVAILABLE

    def test_eks_and_ec2_ask_imds(self, emu: Emulator) -> None:
        env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emu.url}
        for name in ("eks", "ec2"):
            assert resolve_region("auto", env, platform=name) == (
                "ap-southeast-2",
                "IMDS placement/region",
            )


class TestIdentity:
    def test_ecs_task_arn(self, emu: Emulator) -> None:
        env = {"ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4"}
        assert platform.identity("ecs", env) == (task_arn(emu), "ECS task metadata TaskARN")

    def test_eks_pod_uid_then_hostname(self) -> None:
        both = {"POD_UID": "uid-1", "HOSTNAME": "product-7f9c-abcde"}
        assert platform.identity("eks", both) == ("uid-1", "$POD_UID")
        assert platform.identity("eks", {"HOSTNAME": "product-7f9c-abcde"}) == (
            "product-7f9c-abcde",
            "$HOSTNAME",
        )
        with pytest.raises(platform.PlatformError, match="POD_UID"):
            platform.identity("eks", {})


@pytest.mark.parametrize(
    ("name", "method", "refused"),
    [
        ("ecs", "iam-role", "taskRoleArn"),
        ("eks", "iam-role", "eks.amazonaws.com/role-arn"),
        ("ec2", "iam-role", None),
        ("ecs", "container-role", None),
        ("eks", "container-role", "IRSA"),  # EKS Pod Identity: AWS refuses it for metering
        ("eks", "assume-role-with-web-identity", None),
        ("eks", None, None),
    ],
)
def test_node_role_refusal(name: str, method: str | None, refused: str | None) -> None:
    line = platform.node_role_refusal(name, method)
    assert (line is None) == (refused is None)
    if refused:
        assert refused in line and "\n" not in line  # type: ignore[operator]


def test_check_failure_policy() -> None:
    assert platform.check_failure_policy(None, "ecs") == "exit"
    assert platform.check_failure_policy(None, "eks") == "exit"
    assert platform.check_failure_policy(None, "ec2") == "continue"
    assert platform.check_failure_policy("continue", "ecs") == "continue"
    assert platform.check_failure_policy("exit", "ec2") == "exit"


class TestConfig:
    def test_defaults(self, tmp_path: Path) -> None:
        cfg = make_config(tmp_path)
        assert cfg.platform == "auto" and cfg.metering.on_check_failure is None

    def test_set(self, tmp_path: Path) -> None:
        cfg = make_config(tmp_path, "platform: eks\nmetering: {on_check_failure: continue}\n")
        assert cfg.platform == "eks" and cfg.metering.on_check_failure == "continue"

    @pytest.mark.parametrize(
        ("extra", "key"),
        [
            ("platform: fargate\n", "platform"),
            ("metering: {on_check_failure: stop}\n", "metering.on_check_failure"),
        ],
    )
    def test_a_wrong_value_names_its_key(self, tmp_path: Path, extra: str, key: str) -> None:
        with pytest.raises(ConfigError) as info:
            make_config(tmp_path, extra)
        assert info.value.exit_code == EX_CONFIG
        assert str(info.value).splitlines()[-1].strip().startswith(f"{key}:")

    def test_the_example_config_loads(self) -> None:
        cfg = load(Path(__file__).resolve().parent.parent / "config.example.yaml")
        assert cfg.platform == "auto"


class TestCredentials:
    """A real boto3 client, its credentials from the emulator."""

    def test_the_node_role_is_refused_before_a_request_leaves(
        self, emu: Emulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emu.url)
        client = MeteringClient("ap-southeast-2", emu.url, platform="ecs")
        outcome = client.meter_usage(_hour())
        assert (outcome.status, outcome.code) == ("unauthorized", platform.NODE_ROLE_CODE)
        assert [c for c in emu.received() if c["operation"] == "MeterUsage"] == []
        ec2 = MeteringClient("ap-southeast-2", emu.url, platform="ec2")
        assert ec2.credential_source() == "iam-role"
        assert ec2.dry_run(PRODUCT, "vcpus", None, time.time()).status == "dryrun_ok"

    def test_no_credentials_at_all_in_a_container_pauses_naming_the_role(self) -> None:
        """No task role (Fargate: no IMDS either): final until one is set, so a container's
        start-up check fails (77) instead of retrying forever; on EC2 it stays a retry."""
        ecs = MeteringClient("ap-southeast-2", CLOSED, platform="ecs").dry_run(
            PRODUCT, "vcpus", None, time.time()
        )
        assert (ecs.status, ecs.code) == ("unauthorized", "NoCredentials")
        assert "taskRoleArn" in (ecs.message or "")
        ec2 = MeteringClient("ap-southeast-2", CLOSED, platform="ec2")
        assert ec2.dry_run(PRODUCT, "vcpus", None, time.time()).status == "retry"

    def test_the_service_refuses_the_node_role_from_a_container(
        self, emu: Emulator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """`container_only`: what AWS answers a node-role call; the hour is paused, not lost."""
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", emu.url)
        emu.configure(container_only=True)
        client = MeteringClient("ap-southeast-2", emu.url, platform="ec2")  # a misconfigured one
        outcome = client.meter_usage(_hour())
        assert (outcome.status, outcome.code) == ("unauthorized", "PlatformNotSupportedException")
        assert emu.records() == []

    def test_the_task_role(self, emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{emu.url}/ecs/credentials")
        emu.configure(container_only=True)
        client = MeteringClient("ap-southeast-2", emu.url, platform="ecs")
        assert client.credential_source() == "container-role"
        assert client.meter_usage(_hour()).status == "sent"
        assert [r.caller for r in emu.records()] == [TASK_ROLE_KEY]

    def test_irsa(self, emu: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        token = tmp_path / "token"
        token.write_text("eyJ.emulator.token")
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
        monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::111122223333:role/irsa")
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", emu.url)
        emu.configure(container_only=True)
        client = MeteringClient("ap-southeast-2", emu.url, platform="eks")
        assert client.credential_source() == "assume-role-with-web-identity"
        assert client.meter_usage(_hour()).status == "sent"
        assert [r.caller for r in emu.records()] == [IRSA_KEY]
        (sts,) = [c for c in emu.calls() if c["operation"] == "AssumeRoleWithWebIdentity"]
        assert sts["role"] == "arn:aws:iam::111122223333:role/irsa" and sts["token"]
        assert IRSA_KEY != ACCESS_KEY != TASK_ROLE_KEY


def _hour() -> SealedHour:
    """The last hour's vcpus, 3: inside MeterUsage's 6 h window on the emulator's clock."""
    return sealed_hour("vcpus", time.time() // 3600 * 3600 - 3600, Quantity(3), str(uuid.uuid4()))


class TestAdopt:
    def test_a_ledger_from_another_task_is_kept_with_its_pending_hours(
        self, tmp_path: Path
    ) -> None:
        cfg = make_config(tmp_path)
        ledger = Ledger(cfg.state_dir)
        ledger.update_meta(instance_id="arn:old", instance_id_source="ECS task metadata TaskARN")
        ledger.mark_unverified("stale", 1.0)
        fill(ledger, "vcpus", 1_800_000_000 - 1_800_000_000 % 3600, 3)
        seal_hours(ledger, cfg, 1_800_000_000 + 7200, offset=0)
        before = ledger.pending()
        adopted = identity.adopt(ledger, "arn:new", "ECS task metadata TaskARN")
        assert adopted is ledger  # the same file, not moved aside
        assert adopted.pending() == before and before
        assert adopted.get_meta("instance_id") == "arn:new"
        assert adopted.get_meta("previous_instance_id") == "arn:old"
        assert adopted.send_state().identity_unverified is None
        assert list(Path(cfg.state_dir).glob("ledger.db.*")) == []

    def test_container_identity_is_verified_at_once(self, tmp_path: Path) -> None:
        from tests.fakes import FakeClock

        ident = identity.ContainerIdentity("uid-9", "$POD_UID", FakeClock(1.0), tmp_path)
        ledger = ident.start(Ledger(tmp_path))
        assert ident.verified.is_set()
        assert (ledger.get_meta("instance_id"), ledger.get_meta("instance_id_source")) == (
            "uid-9",
            "$POD_UID",
        )


def test_the_sender_process_keeps_the_last_exit_code() -> None:
    popen, mono = FakePopen(), Mono()
    sender = SenderProcess(lambda flush, deadline: ["send"], mono, popen)  # type: ignore[arg-type]
    sender.start()
    assert sender.running() and sender.take_exit() is None
    popen.children[-1].code = EX_NOPERM
    assert not sender.running()
    assert sender.take_exit() == EX_NOPERM
    assert sender.take_exit() is None  # taken once


class TestCli:
    def test_check_on_ecs_names_platform_identity_region_and_credentials(
        self, emu: Emulator, write_config: ConfigWriter
    ) -> None:
        env = {
            "ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{emu.url}/ecs/credentials",
        }
        result = run_cli("check", "-c", str(write_config(endpoint=emu.url)), env=env)
        assert result.returncode == EX_OK, result.stderr
        out = result.stdout
        assert "platform ecs" in out and f"identity {task_arn(emu)}" in out
        assert "region ap-southeast-2 (from ECS task metadata TaskARN)" in out
        assert "credentials found (container-role)" in out

    def test_check_on_ecs_without_task_metadata_is_69(self, write_config: ConfigWriter) -> None:
        env = {"ECS_CONTAINER_METADATA_URI_V4": CLOSED}
        result = run_cli("check", "-c", str(write_config()), env=env)
        assert result.returncode == EX_UNAVAILABLE
        (line,) = result.stderr.strip().splitlines()
        assert "ECS_CONTAINER_METADATA_URI_V4" in line

    def test_status_names_the_platform_before_any_run(
        self, write_config: ConfigWriter, tmp_path: Path
    ) -> None:
        env = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
        result = run_cli("status", "--json", "-c", str(write_config()), env=env)
        assert result.returncode == EX_OK, result.stderr
        report = json.loads(result.stdout)["platform"]
        assert (report["name"], report["on_check_failure"]) == ("eks", "exit")
        assert report["platform_source"] == "detected by status"  # no run recorded one


def test_trial_gives_a_container_config_the_emulator_as_its_platform() -> None:
    from agent.commands.trial import container_env

    ecs = container_env("ecs", "http://127.0.0.1:1")
    assert platform.detect("auto", ecs).name == "ecs"
    assert platform.TaskMetadata(ecs).uri == "http://127.0.0.1:1/ecs/v4"
    assert platform.identity("eks", container_env("eks", "u"))[1] == "$POD_UID"
    assert container_env("ec2", "u") == container_env("auto", "u") == {}


@pytest.mark.parametrize(
    ("name", "method", "warned"),
    [
        ("ecs", "env", True),
        ("eks", "shared-credentials-file", True),
        ("ec2", "env", False),
        ("ecs", "container-role", False),
        ("eks", "assume-role-with-web-identity", False),
    ],
)
def test_static_keys_are_a_warning_in_containers(name: str, method: str, warned: bool) -> None:
    line = platform.static_keys_warning(name, method)
    assert (line is not None) == warned
    if line:
        assert "\n" not in line and method in line
