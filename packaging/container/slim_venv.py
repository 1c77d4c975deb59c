"""Run in the image's build stage by the venv's Python: drive the agent's real commands with the
venv as it will ship, then keep bytecode caches only for the modules they imported.

    slim_venv.py VENV STAGE

Why: a `.pyc` is a cache. Python compiles a module that has none in memory when it is imported
(the image is read-only and sets PYTHONDONTWRITEBYTECODE), so pruning the caches of modules the
agent never imports loses nothing; the stdlib's and the venv's caches of modules it does import
are kept, so `run`, each `send` child and the HEALTHCHECK start as fast as before.

The commands (`trial` against the built-in emulator, which runs the daemon and its `send` child
for real; `check --offline`, `sample`, `status --check`, `schema`; every agent module imported;
RegisterUsage's PS256 verification) run with a `.pth` hook that records, at each process's exit,
what it imported. They also prove the venv works after its shared libraries were stripped: any
failure fails the build. Writes the stdlib caches to keep under STAGE (their own paths), for the
final stage to copy in; deletes the other caches in VENV.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

RECORDER = '''\
import atexit, os, sys

def _record(out=os.environ.get("METERING_AGENT_RECORD_IMPORTS")):
    with open(out, "a") as f:
        for m in list(sys.modules.values()):
            cached = getattr(m, "__cached__", None)
            if cached:
                f.write(os.path.realpath(cached) + "\\n")

if os.environ.get("METERING_AGENT_RECORD_IMPORTS"):
    atexit.register(_record)
'''

CONFIG = """\
product_code: abcd1234efgh5678ijkl90mn
state_dir: {state}
dimensions:
  - name: vcpus
    collector: {{type: system, metric: cpu_count}}
    aggregate: integral
  - name: requests
    collector:
      type: log
      path: {log}
      pattern: 'GET /api/\\S+ (?P<tenant>\\w+)'
      start_at: beginning
    allocations: {{tags: {{Tenant: tenant}}}}
  - name: upload_bytes
    collector: {{type: log, path: {log}, pattern: 'bytes=(?P<value>[0-9]+)', mode: sum}}
"""

IMPORT_ALL = """\
import importlib, pkgutil, agent
for m in pkgutil.walk_packages(agent.__path__, "agent."):
    if m.name != "agent.__main__":
        importlib.import_module(m.name)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
key.public_key().verify(key.sign(b"jwt", pss, hashes.SHA256()), b"jwt", pss, hashes.SHA256())
"""


def drive(venv: Path, work: Path, record: Path) -> None:
    """The agent's commands, each as its own process (as the image runs them)."""
    log = work / "access.log"
    log.write_text("GET /api/items acme bytes=10\nGET /health x\nGET /api/users globex bytes=5\n")
    config = work / "config.yaml"
    config.write_text(CONFIG.format(state=work / "state", log=log))
    agent = str(venv / "bin" / "metering-agent")
    python = str(venv / "bin" / "python")
    env = {**os.environ, "METERING_AGENT_RECORD_IMPORTS": str(record), "PYTHONDONTWRITEBYTECODE": "1"}
    for command, codes in (
        ([python, "-c", IMPORT_ALL], {0}),
        ([agent, "--version"], {0}),
        ([agent, "schema"], {0}),
        ([agent, "check", "--offline", "-c", str(config)], {0}),
        ([agent, "sample", "-c", str(config)], {0}),
        ([agent, "trial", "-c", str(config), "--hours", "1", "--speed", "300"], {0}),
        ([agent, "status", "--check", "-c", str(config)], {0, 1}),  # no ledger yet: 1
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode not in codes:
            sys.exit(f"{' '.join(command[1:])}: exit {done.returncode}\n{done.stdout}{done.stderr}")


def main() -> None:
    venv, stage = Path(sys.argv[1]), Path(sys.argv[2])
    site = Path(sysconfig.get_paths()["purelib"])
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    hook = site / "_metering_agent_record_imports.py"
    pth = site / "_metering_agent_record_imports.pth"
    hook.write_text(RECORDER)
    pth.write_text("import _metering_agent_record_imports\n")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(tmp) / "imported"
            drive(venv, Path(tmp), record)
            used = set(record.read_text().split())
    finally:
        hook.unlink()
        pth.unlink()
    kept = dropped = 0
    for root in (venv.resolve(), stdlib):
        for pyc in root.rglob("*.pyc"):
            path = str(pyc.resolve())
            if path in used:
                kept += pyc.stat().st_size
                if root == stdlib:
                    target = stage / path.lstrip("/")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(pyc, target)
            else:
                dropped += pyc.stat().st_size
                if root != stdlib:
                    pyc.unlink()
    for cache in list(venv.rglob("__pycache__")):
        if not any(cache.iterdir()):
            cache.rmdir()
    print(f"bytecode: kept {kept / 1e6:.1f} MB imported by the agent, dropped {dropped / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
