"""End to end: the running daemon reloads its config when a Kubernetes ConfigMap volume is
updated (the kubelet swaps the `..data` symlink; no signal reaches the agent). A config that does
not load is refused and the running one kept, as with SIGHUP. Oracle: what the daemon stores in
its ledger (which dimensions it samples)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from agent.emulator import Emulator
from tests.conftest import PRODUCT
from tests.e2e import Agent, wait_for
from tests.kubelet import ConfigMapVolume
from tests.test_e2e_reload import last_sampled

pytestmark = pytest.mark.e2e


def config(url: str, state: Path, names: list[str]) -> str:
    dims = "".join(
        f"  - name: {n}\n    collector: {{type: system, metric: cpu_count}}\n" for n in names
    )
    return (
        textwrap.dedent(
            f"""\
            product_code: {PRODUCT}
            state_dir: {state}
            metering: {{endpoint_url: "{url}", send_window: 0}}
            sampling: {{interval: 1s}}
            dimensions:
            """
        )
        + dims
    )


def test_a_configmap_update_reloads_the_running_daemon(emulator: Emulator, tmp_path: Path) -> None:
    state = tmp_path / "state"
    volume = ConfigMapVolume(tmp_path / "etc-metering-agent")
    first = volume.write({"config.yaml": config(emulator.url, state, ["vcpus"])})
    path = volume.root / "config.yaml"
    assert path.resolve() == first / "config.yaml"
    agent = Agent(path, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": emulator.url})
    agent.log = tmp_path / "agent.log"  # not in the volume, which only the kubelet writes
    agent.start()
    try:
        wait_for("vcpus sampled", lambda: "vcpus" in last_sampled(state), 20, agent)
        second = volume.write({"config.yaml": config(emulator.url, state, ["vcpus", "users_now"])})
        assert path.resolve() == second / "config.yaml" and not first.exists()
        wait_for("the new dimension sampled", lambda: "users_now" in last_sampled(state), 20, agent)

        volume.write({"config.yaml": "dimensions: [\n"})  # refused; the running config kept
        before = last_sampled(state)
        wait_for(
            "both dimensions still sampled after the bad update",
            lambda: all(last_sampled(state).get(d, 0) > before[d] + 3 for d in before),
            20,
            agent,
        )
        # the watch goes on after a refused update: the next good one is applied
        volume.write({"config.yaml": config(emulator.url, state, ["vcpus", "users_now", "cpus"])})
        wait_for("the third config applied", lambda: "cpus" in last_sampled(state), 20, agent)
        assert agent.terminate() == 0
    finally:
        if agent.alive():
            agent.kill9()
