"""`metering-agent prepare-image`: the state dir made ready to be baked into an AMI.

Why: a ledger baked on the seller's build instance holds the seller's own test hours; the buyer's
agent would move it aside (one instance, one ledger), but it is better never shipped, and neither
are a health file, locks or a running-config copy that describe the build instance. This command
removes exactly those files, refuses while `run` holds the state dir (stop it first: it would
write them again), records each log the config names as it is in the image (`image.json`, so
the buyer's first boot reads only what the buyer's instance wrote), and says what that first boot
will read.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sqlite3
import sys
from pathlib import Path
from typing import IO, Any

from agent.clock import Clock, iso
from agent.collectors import Sources, imagerecord
from agent.collectors.imagerecord import ImageRecord
from agent.commands.common import load_config, make_clock
from agent.config.loader import loopback_endpoint, traps
from agent.config.model import Config
from agent.errors import AgentError, ConfigError, LockHeld
from agent.host.ownership import adopt
from agent.ledger import Ledger
from agent.modes.choose import mode_for
from agent.warnings import LOOPBACK_ENDPOINT, UNSENT_HOURS, Warnings

LEDGER = "ledger.db"
LOCKS = ("lock", "send.lock")
OTHERS = ("health.json", "config.running.yaml", "config.running.yaml.new")


def agent_files(state_dir: Path) -> list[Path]:
    """The files `run` and `send` leave in the state dir: the ledger with its WAL files, ledgers
    moved aside, the health file, the running-config copy and the locks."""
    found = [state_dir / name for name in (LEDGER, f"{LEDGER}-wal", f"{LEDGER}-shm")]
    found += sorted(state_dir.glob(f"{LEDGER}.*"))  # moved aside: ledger.db.instance-i-0abc.17...
    found += sorted(state_dir.glob(".health.*"))  # a write a kill interrupted
    found += [state_dir / name for name in (*OTHERS, *LOCKS)]
    return [p for p in found if p.is_file() and not p.is_symlink()]


def hold(path: Path) -> IO[str] | None:
    """Take the flock on `path` (without creating it) so no `run` starts while files go; raises
    LockHeld when a process holds it."""
    try:
        f: IO[str] = open(path)  # noqa: SIM115 - held until the caller closes it
    except FileNotFoundError:
        return None
    except OSError as e:  # the unit's UMask makes the lock 0600, the service user's
        raise AgentError(f"cannot open {path}: {e.strerror}; run prepare-image as root") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise LockHeld(
            f"a metering-agent process holds {path}; stop it first "
            "(systemctl stop metering-agent), then run prepare-image again"
        ) from None
    return f


def image_logs(cfg: Config) -> dict[str, list[str]]:
    """Per log dimension, the files its first reading would find: the live files its `path`
    names and the copies beside them (and in `rotated`), as the collector lists them."""
    from agent.collectors.logfiles import Files

    found: dict[str, list[str]] = {}
    for dim in cfg.dimensions:
        if dim.collector.type != "log":
            continue
        opts = dim.collector.options
        entries = Files(opts["path"], opts.get("rotated")).entries([], [])
        found[dim.name] = sorted(e.path for e in entries.values())
    return found


def record_image(cfg: Config, clock: Clock, build_instance: str | None) -> ImageRecord:
    """Write `<state_dir>/image.json`: each log file in the image with its identity and length,
    so the first boot of an instance made from it reads only what is new (imagerecord.py)."""
    state_dir = Path(cfg.state_dir)
    paths = [p for files in image_logs(cfg).values() for p in files]
    made = iso(clock.time()) or ""
    record = imagerecord.build(paths, made, Sources().boot_id(), build_instance)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = imagerecord.write(state_dir, record)
        adopt(state_dir, path)
    except OSError as e:
        raise AgentError(f"cannot write {state_dir / imagerecord.FILE}: {e.strerror}") from None
    return record


def first_boot(cfg: Config, record: ImageRecord | None = None) -> list[str]:
    """What the buyer's first boot will read, per log dimension, and when its first record goes."""
    lines = []
    files = image_logs(cfg) if record is not None else {}
    lengths = {r.path: r.length for r in record.logs} if record is not None else {}
    for dim in cfg.dimensions:
        if dim.collector.type != "log":
            continue
        opts = dim.collector.options
        path = opts["path"]
        if record is not None:
            held = [f"{p} ({lengths[p]:,} bytes)" for p in files.get(dim.name, []) if p in lengths]
            lines.append(
                f"{dim.name}: reads {path} from the length each file has now, so only lines "
                "written on the buyer's instance are billed, including those written before "
                "the agent's first reading; a file not in the image is read from its beginning"
                + (f" (recorded: {', '.join(held)})" if held else " (no file in the image yet)")
            )
        elif opts.get("start_at") == "beginning":
            lines.append(
                f"{dim.name}: reads {path} from the beginning: lines in it when the image is "
                "made are billed in the buyer's first hour (empty the log before baking if "
                "they are yours)"
            )
        else:
            lines.append(
                f"{dim.name}: reads only lines written to {path} after its first sample "
                "(start_at: end); a file that appears later is read from its beginning"
            )
    window = cfg.metering.send_window
    lines.append(
        "the first record: the buyer's first hour is sent at its end"
        + (f" plus up to {window} s (send_window)" if window else "")
    )
    return lines


def prepare(
    cfg: Config, yes: bool, out: Any = None, stdin: Any = None, clock: Clock | None = None
) -> int:
    """Refuse an endpoint on this machine (78) and while `run` holds the state dir; otherwise
    remove the agent's files, after asking, and record the logs in the image."""
    out = out or sys.stdout
    stdin = stdin or sys.stdin
    warns = Warnings(cfg.accepted_warnings, out)
    refusal = mode_for(cfg).image_refusal()  # a SaaS ledger is never removed for an image
    if refusal is not None:
        print(f"metering-agent: {refusal}", file=sys.stderr)
        return 1
    baked_endpoint = loopback_endpoint(cfg)
    if baked_endpoint is not None:  # refused even when accepted: nothing would ever be billed
        raise ConfigError(
            f"{cfg.source}",
            f"{baked_endpoint} (or set it to a VPC endpoint), then run prepare-image again; "
            "nothing was removed",
        )
    state_dir = Path(cfg.state_dir)
    guards = [hold(state_dir / name) for name in LOCKS]
    try:
        build_instance = _instance(state_dir)  # before the ledger that names it goes
        code = _remove(state_dir, yes, out, stdin, warns)
        record = record_image(cfg, clock or Clock(), build_instance) if code == 0 else None
    finally:
        for guard in guards:
            if guard is not None:
                guard.close()
    if record is not None:
        print(
            f"recorded {len(record.logs)} log file(s) in {state_dir / imagerecord.FILE}",
            file=out,
        )
        print("the buyer's first boot:", file=out)
        for line in first_boot(cfg, record):
            print(f"  {line}", file=out)
        for kind, trap in traps(cfg):
            if kind is not LOOPBACK_ENDPOINT:  # (refused above)
                warns.say(kind, trap)
    return code


def _instance(state_dir: Path) -> str | None:
    """The instance id the ledger was verified with (IMDS), if any: the build machine, on which
    the image record must not apply."""
    if not (state_dir / LEDGER).is_file():
        return None
    try:
        ledger = Ledger(state_dir, readonly=True)
    except (AgentError, OSError, sqlite3.Error):
        return None
    try:
        if ledger.get_meta("instance_id_source") != "imds":
            return None
        found = ledger.get_meta("instance_id")
        return str(found) if found else None
    except sqlite3.Error:
        return None
    finally:
        ledger.close()


def _unsent(state_dir: Path) -> str | None:
    """The ledger's hours sealed and never sent, which go with it: on a build machine that was
    subscribed (and billed), that is usage nobody will be billed for."""
    if not (state_dir / LEDGER).is_file():
        return None
    try:
        ledger = Ledger(state_dir, readonly=True)
    except (AgentError, OSError, sqlite3.Error) as e:
        return f"cannot read {state_dir / LEDGER} to count its unsent hours ({e})"
    try:  # a count any schema version answers (a read-only open does not migrate)
        count = ledger.pending_hour_count()
    except sqlite3.Error as e:
        return f"cannot read {state_dir / LEDGER} to count its unsent hours ({e})"
    finally:
        ledger.close()
    if not count:
        return None
    return (
        f"the ledger holds {count} hour(s) sealed and never sent; removing it means they are "
        "never billed"
    )


def _remove(state_dir: Path, yes: bool, out: Any, stdin: Any, warns: Warnings) -> int:
    unsent = _unsent(state_dir)  # first: reading the ledger may make its -wal and -shm files
    files = agent_files(state_dir) if state_dir.is_dir() else []
    if not files:
        print(f"{state_dir}: nothing to remove (no ledger, health file or locks)", file=out)
        return 0
    if unsent:
        warns.say(UNSENT_HOURS, unsent)
    if not yes:
        if not stdin.isatty():
            raise AgentError(
                f"prepare-image would remove {len(files)} file(s) from {state_dir}, and stdin "
                "is not a terminal to ask: pass --yes"
            )
        print(f"will remove from {state_dir}:", file=out)
        for p in files:
            print(f"  {p.name}", file=out)
        print("remove them? [y/N] ", end="", file=out, flush=True)
        if stdin.readline().strip().lower() not in ("y", "yes"):
            print("nothing removed", file=out)
            return 1
    for p in files:
        try:
            os.unlink(p)
        except OSError as e:
            raise AgentError(f"cannot remove {p}: {e.strerror}; run as root") from None
        print(f"removed {p}", file=out)
    return 0


def cmd_prepare_image(args: argparse.Namespace) -> int:
    from agent.collecting.sampling import Sampler

    cfg = load_config(args)
    Sampler(cfg)  # the collectors build, as `check --offline` has them (plugins among them)
    return prepare(cfg, args.yes, clock=make_clock(args))
