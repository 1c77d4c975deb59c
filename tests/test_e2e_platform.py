"""End to end on the container platforms: the real `run` daemon (under libfaketime across an hour
boundary), a real boto3 client in its sender, and the emulator as ECS task metadata, the task
role's credentials endpoint, STS for IRSA, and MeterUsage. IMDS is a closed port unless a test
gives the node's role."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from agent.clock import hour_start
from agent.emulator import IRSA_KEY, TASK_ROLE_KEY, Emulator, Settings
from agent.errors import EX_NOPERM, EX_OK
from agent.ledger import Ledger
from agent.modes.instance import seal_hours
from tests.billing import make_config
from tests.conftest import PRODUCT, run_cli
from tests.e2e import Agent, faketime_env, newest_instant, offset_to_before_boundary, wait_for
from tests.test_e2e import assert_no_duplicates
from tests.test_e2e_sending import config_text, health, hours
from tests.test_sealing import fill

pytestmark = pytest.mark.e2e
REGION = "eu-west-1"  # the emulator's: a request signed for any other region is refused
TASK = "5e1ec7ab1e5e1ec7ab1e5e1ec7ab1e00"
TASK_ARN = f"arn:aws:ecs:{REGION}:111122223333:task/emulator-cluster/{TASK}"
CLOSED = "http://127.0.0.1:9"  # nothing listens: IMDS is out of reach, as on Fargate


@pytest.fixture
def emu():
    emulator = Emulator(Settings(region=REGION, product_codes={PRODUCT}, task_id=TASK))
    emulator.serve(0)
    yield emulator
    emulator.stop()


@pytest.fixture
def agents():
    started: list[Agent] = []
    yield started
    for agent in started:
        if agent.alive():
            agent.kill9()


def ecs_env(emu: Emulator, credentials: bool = True) -> dict[str, str]:
    env = {"ECS_CONTAINER_METADATA_URI_V4": f"{emu.url}/ecs/v4"}
    if credentials:
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = f"{emu.url}/ecs/credentials"
    return env


def start(agents: list[Agent], cfg: Path, env: dict[str, str]) -> Agent:
    agent = Agent(cfg, env).start()
    agents.append(agent)
    return agent


def live_children(agent: Agent) -> list[psutil.Process]:
    """The daemon's child processes still running (an exited one not yet reaped is not)."""
    assert agent.proc is not None
    try:
        children = psutil.Process(agent.proc.pid).children()
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


def meta(state: Path, key: str) -> object:
    ledger = Ledger(state, readonly=True)
    try:
        return ledger.get_meta(key)
    finally:
        ledger.close()


def test_an_ecs_task_meters_with_its_task_role_and_the_region_of_its_task_arn(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emu.url))
    offset = offset_to_before_boundary(8)
    hour = hour_start(time.time() + offset)
    env = {**faketime_env(offset, CLOSED), **ecs_env(emu)}  # no AWS_REGION: the TaskARN's
    agent = start(agents, cfg, env)
    wait_for("both records of the hour", lambda: len(emu.records()) == 2, 60, agent)
    records = emu.records()
    assert {(r.dimension, r.hour) for r in records} == {("vcpus", hour), ("vcpu_hours", hour)}
    assert {r.caller for r in records} == {TASK_ROLE_KEY}  # signed by the task role
    assert meta(state, "instance_id") == TASK_ARN  # the ledger's identity
    status = run_cli("status", "--json", "-c", str(cfg), env=ecs_env(emu))
    platform = json.loads(status.stdout)["platform"]
    assert (platform["name"], platform["identity"]) == ("ecs", TASK_ARN)
    assert (platform["region"], platform["credential_source"]) == (REGION, "container-role")
    assert agent.terminate() == 0
    assert_no_duplicates(emu)
    assert {h.state for h in hours(state)} == {"sent"}  # the stop's partial hour too


def test_an_eks_pod_meters_through_irsa(emu: Emulator, tmp_path: Path, agents: list[Agent]) -> None:
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emu.url, dims=("vcpus",)))
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.emulator.token")
    offset = offset_to_before_boundary(8)
    pod = "0c5b9a4e-1b7d-4c8e-9a31-5b0e8c1d2f34"
    env = {
        **faketime_env(offset, CLOSED),  # the hop limit: no IMDS from the pod
        "AWS_WEB_IDENTITY_TOKEN_FILE": str(token),
        "AWS_ROLE_ARN": "arn:aws:iam::111122223333:role/metering-agent-irsa",
        "AWS_ENDPOINT_URL_STS": emu.url,
        "AWS_REGION": REGION,
        "POD_UID": pod,
    }
    agent = start(agents, cfg, env)
    wait_for("the hour's record", lambda: len(emu.records()) == 1, 60, agent)
    (record,) = emu.records()
    assert record.caller == IRSA_KEY
    assert [c for c in emu.calls() if c["operation"] == "AssumeRoleWithWebIdentity"]
    assert meta(state, "instance_id") == pod
    assert agent.terminate() == 0


def test_the_node_role_is_refused_on_ecs(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """Only IMDS (the node's instance role) has credentials: `check` exits 77, `run` exits 77 by
    default, and with on_check_failure: continue keeps sampling with health saying why; no
    MeterUsage request leaves in any case."""
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emu.url, dims=("vcpus",)))
    env = {**ecs_env(emu, credentials=False), "AWS_EC2_METADATA_SERVICE_ENDPOINT": emu.url}

    check = run_cli("check", "-c", str(cfg), env=env)
    assert check.returncode == EX_NOPERM
    (line,) = check.stderr.strip().splitlines()
    assert "taskRoleArn" in line

    agent = start(agents, cfg, env)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=45) == EX_NOPERM
    assert health(state)["authorized"] is False
    told = agent.output()
    assert "stopping with exit 77" in told  # the line the second run must not log

    cfg.write_text(
        config_text(state, emu.url, dims=("vcpus",)).replace(
            "startup_check: true", "startup_check: true, on_check_failure: continue"
        )
    )
    (state / "health.json").unlink()
    agent = start(agents, cfg, env)
    wait_for("the DryRun refused", lambda: health(state).get("authorized") is False, 30, agent)
    # A negative check: under `exit` the daemon's loop, once a second, finds the sender ended
    # with 77 and logs its stop (the first part above). So: the sender gone, then two passes.
    wait_for("the refused sender to end", lambda: not live_children(agent), 30, agent)
    time.sleep(2)
    assert agent.alive()
    assert "stopping with exit 77" not in agent.output()[len(told) :]  # the log is appended to
    data = health(state)
    assert data["ok"] is False and data["authorized"] is False
    assert "taskRoleArn" in data["reason"]
    assert agent.terminate() == 0
    assert [c for c in emu.received() if c["operation"] == "MeterUsage"] == []


def test_a_ledger_from_another_task_is_sent_not_moved_aside(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """A persistent volume carries the ledger of an earlier task with a pending hour: the new
    task sends that hour (the same buyer's usage), keeps the file, and records its own id."""
    old_arn = TASK_ARN.replace(TASK, "0ld0ld0ld0ld0ld0ld0ld0ld0ld0ld00")
    build = make_config(tmp_path)
    state = Path(build.state_dir)
    ledger = Ledger(state)
    ledger.update_meta(instance_id=old_arn, instance_id_source="ECS task metadata TaskARN")
    now = time.time()
    last_hour = hour_start(now) - 3600
    fill(ledger, "vcpus", last_hour, 3)
    seal_hours(ledger, build, now, offset=0)
    (left,) = ledger.pending()
    ledger.close()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emu.url, dims=("vcpus",)))
    agent = start(agents, cfg, {**ecs_env(emu), "AWS_EC2_METADATA_SERVICE_ENDPOINT": CLOSED})
    wait_for("the earlier task's hour", lambda: len(emu.records()) == 1, 45, agent)
    (record,) = emu.records()
    assert (record.hour, record.client_token) == (last_hour, left.client_token)
    assert str(record.quantity) == left.quantity.text
    assert list(state.glob("ledger.db.*")) == []  # nothing moved aside
    assert meta(state, "instance_id") == TASK_ARN
    assert meta(state, "previous_instance_id") == old_arn
    assert agent.terminate() == EX_OK


def test_a_throttled_startup_check_is_retried_and_a_refused_one_ends_run_with_77(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """on_check_failure: exit (the ECS default) stops only for a final answer: a throttled
    DryRun is tried again and `run` goes on; AccessDenied from the service ends it with 77."""
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emu.url, dims=("vcpus",)))
    env = {**ecs_env(emu), "AWS_EC2_METADATA_SERVICE_ENDPOINT": CLOSED}
    emu.inject("error", count=1, code="ThrottlingException", status=400, message="Rate exceeded")
    agent = start(agents, cfg, env)
    wait_for("the DryRun permitted", lambda: health(state).get("authorized") is True, 45, agent)
    throttled = [c for c in emu.calls() if c.get("code") == "ThrottlingException"]
    assert len(throttled) == 1 and agent.alive()
    assert agent.terminate() == 0

    emu.configure(authorized=False)
    agent = start(agents, cfg, env)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=45) == EX_NOPERM
    assert health(state)["authorized"] is False


def test_a_startup_check_refused_for_its_credentials_ends_run_with_77(
    emu: Emulator, tmp_path: Path, agents: list[Agent]
) -> None:
    """SPEC: on ECS a start-up DryRun failing with anything but throttling, a 5xx or the network
    ends `run` with 77: a key the service does not recognize (retried once `run` has passed its
    check, as a credential refresh may fix it) is such a failure."""
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, emu.url, dims=("vcpus",)))
    env = {**ecs_env(emu), "AWS_EC2_METADATA_SERVICE_ENDPOINT": CLOSED}
    emu.inject("error", count=100, code="UnrecognizedClientException", status=403,
               message="The security token included in the request is invalid.")  # fmt: skip
    agent = start(agents, cfg, env)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=45) == EX_NOPERM
    assert health(state)["authorized"] is False
    assert "UnrecognizedClientException" in (health(state)["reason"] or "")


class Hanging:
    """A MeterUsage endpoint that accepts each connection and never answers."""

    def __init__(self, url: str, held: list[socket.socket]) -> None:
        self.url = url
        self.held = held  # the connections it accepted


@pytest.fixture
def hanging_endpoint():
    """A MeterUsage endpoint that accepts each connection and never answers."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield Hanging(f"http://127.0.0.1:{server.getsockname()[1]}", held)
    server.close()
    for conn in held:
        conn.close()


def test_an_ecs_stop_fits_the_task_grace_against_an_endpoint_that_never_answers(
    emu: Emulator, hanging_endpoint: Hanging, tmp_path: Path, agents: list[Agent]
) -> None:
    """ECS kills the container 30 s after SIGTERM (stopTimeout): the agent is out well before,
    and the partial hour it sealed and could not send stays pending for the next start."""
    state = tmp_path / "state"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(config_text(state, hanging_endpoint.url))
    offset = offset_to_before_boundary(1800)  # mid-hour: the stop seals a partial hour
    hour = hour_start(time.time() + offset)
    agent = start(agents, cfg, {**faketime_env(offset, CLOSED), **ecs_env(emu)})
    wait_for("samples taken", lambda: newest_instant(state) is not None, 30, agent)
    wait_for("the sender's DryRun hanging", lambda: hanging_endpoint.held, 30, agent)
    assert agent.proc is not None
    begun = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(timeout=40)
    took = time.monotonic() - begun
    print(f"stop took {took:.1f} s (exit {code})")
    assert took < 27, took
    pending = {(h.dimension, h.hour) for h in hours(state) if h.state == "pending"}
    assert pending == {("vcpus", hour), ("vcpu_hours", hour)}
    # `status` from a shell without the task's environment shows the platform `run` recorded
    report = json.loads(run_cli("status", "--json", "-c", str(cfg)).stdout)["platform"]
    assert (report["name"], report["platform_source"]) == ("ecs", "recorded by run")
