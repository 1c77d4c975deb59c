"""packaging/container/build.sh, the sellers' image build, as far as it goes without building:
its usage, the one-line errors a seller can cause, and that CI builds with it (no recipe of its
own). The build itself runs in packaging/ci/container-check.sh (CI), never in pytest."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import ROOT

BUILD = ROOT / "packaging" / "container" / "build.sh"


def build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BUILD), *args], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


def test_help_names_every_option() -> None:
    done = build("--help")
    assert done.returncode == 0
    for option in ("--base", "--debootstrap", "--ca-bundle", "--tag", "--engine", "--no-cache"):
        assert option in done.stdout
    assert "#" not in done.stdout  # the header's comment marks are stripped


def test_a_seller_error_is_one_line_and_nothing_is_built(tmp_path: Path) -> None:
    not_pem = tmp_path / "bundle.crt"
    not_pem.write_text("just text\n")
    for args, exit_code, says in (
        (["--bogus"], 2, "unknown option --bogus"),
        (["--base", "debian:12-slim", "--debootstrap"], 1, "choose one"),
        (["--engine", "rkt"], 1, "--engine rkt: expected podman or docker"),
        (["--ca-bundle", str(tmp_path / "missing.crt")], 1, "not a readable file"),
        (["--ca-bundle", str(not_pem)], 1, "no PEM certificate in it"),
    ):
        done = build(*args)
        assert done.returncode == exit_code, (args, done.stderr)
        first = done.stderr.splitlines()[0]
        assert first.startswith("build.sh: ") and says in first, done.stderr
        assert "building" not in done.stdout


def test_ci_builds_the_image_with_the_sellers_script() -> None:
    check = (ROOT / "packaging" / "ci" / "container-check.sh").read_text()
    code = [line for line in check.splitlines() if not line.lstrip().startswith("#")]
    assert any("packaging/container/build.sh" in line for line in code)
    for recipe in ("buildah bud", "podman build", "debootstrap --variant", "podman import"):
        assert not any(recipe in line for line in code), recipe
    assert "packaging/ci/container-check.sh" in (ROOT / ".ci" / "run").read_text()
