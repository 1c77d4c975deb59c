from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.collectors import linecount
from agent.emulator import Emulator, Settings

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = "abcd1234efgh5678ijkl90mn"

_AWS_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "METERING_AGENT_CONFIG",
    # A container's: platform detection must find EC2 unless a test says otherwise.
    "ECS_CONTAINER_METADATA_URI_V4",
    "KUBERNETES_SERVICE_HOST",
    "AWS_ENDPOINT_URL_STS",
    "POD_UID",
)


@pytest.fixture(autouse=True)
def isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test may find real credentials or reach real AWS: everything goes to the emulator."""
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_V1_DISABLED", "true")
    # Nothing listens here: a test that forgets to point IMDS at the emulator fails fast.
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:9")
    # The product lock's directory (the unit's RuntimeDirectory=), never the real /run.
    monkeypatch.setenv("METERING_AGENT_RUN_DIR", str(tmp_path / "run"))
    # `run` in-process switches hyperscan compiling to a child for good (the daemon's choice):
    # restored after each test, or every later pattern in this worker costs a process start.
    monkeypatch.setattr(linecount, "_compiler", linecount._compiler)


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    emu = Emulator(Settings(product_codes={PRODUCT}))
    url = emu.serve(0)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
    yield emu
    emu.stop()


ConfigWriter = Callable[..., Path]


@pytest.fixture
def write_config(tmp_path: Path) -> ConfigWriter:
    def write(text: str | None = None, *, endpoint: str | None = None, **extra: str) -> Path:
        if text is None:
            text = f"""
                product_code: {PRODUCT}
                state_dir: {tmp_path / "state"}
                metering:
                  endpoint_url: {endpoint or "null"}
                  send_window: 0
                dimensions:
                  - name: vcpus
                    collector: {{type: system, metric: cpu_count}}
            """
        path = tmp_path / "config.yaml"
        path.write_text(textwrap.dedent(text))
        return path

    return write


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the real command in a child process, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )
