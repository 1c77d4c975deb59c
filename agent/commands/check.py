"""`check` (the same validation as `run`, every collector once, region, credentials, the
permission probe; writes no state) and `schema` (the config's JSON Schema)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from agent.aggregate import plain
from agent.clock import Clock
from agent.commands.common import first_reading_line, ledger_instance, load_config, make_clock
from agent.daemon import metrics
from agent.errors import EX_CONFIG, EX_OK, EX_UNAVAILABLE, AgentError, Unavailable
from agent.warnings import (
    COLLECTOR_PROBLEM,
    IDENTITY_UNVERIFIED,
    KEY_ROTATION,
    SERVICE_CANNOT_READ,
    SOURCE_MISSING,
    STATIC_CREDENTIALS,
    Warnings,
)

_quiet = threading.Event()  # check --quiet: the "ok" lines are not printed


def _say(status: str, text: str) -> None:
    if status == "ok" and _quiet.is_set():
        return
    print(f"{status:<5} {text}", flush=True)


def cmd_check(args: argparse.Namespace) -> int:
    """Run the same validation as `run`, then every collector once, then region, credentials and
    DryRun; one line per step. Writes no state. With `--strict`, a warning the config does not
    accept fails it (78) once nothing else has."""
    (_quiet.set if args.quiet else _quiet.clear)()
    cfg = load_config(args)
    warns = Warnings(cfg.accepted_warnings)
    code = _check(args, cfg, warns)
    if warns.silenced:  # said once, so an acknowledged warning is never a surprise
        names = ", ".join(dict.fromkeys(warns.silenced))
        _say("ok", f"warnings accepted in the config (warnings.accept): {names}")
    failure = warns.strict_failure() if getattr(args, "strict", False) else None
    if code == EX_OK and failure:
        print(f"metering-agent: {failure} ({cfg.source})", file=sys.stderr)
        return EX_CONFIG
    return code


def _check(args: argparse.Namespace, cfg: Any, warns: Warnings) -> int:
    from agent.collecting.sampling import Sampler, take_within

    metrics.check(cfg)  # as `run` does: its directory writable by this user (78)
    _say("ok", f"config {cfg.source}: product {cfg.product_code}, {len(cfg.dimensions)} dimensions")
    sampler = Sampler(cfg)
    clock = make_clock(args)
    unreachable = []
    for dim in cfg.dimensions:
        if args.offline:
            problem = sampler.probe(dim)
            if problem:
                warns.say(
                    SOURCE_MISSING,
                    f"collector {dim.name}: {problem} (fine at boot if it appears later)",
                )
            else:
                ready = f"{dim.collector.type} ready{_engine(sampler, dim)}"
                _say("ok", f"collector {dim.name}: {ready}")
            continue
        s = take_within(sampler, dim, clock.time(), None, clock.monotonic)
        error = s.error or sampler.probe(dim)  # a log read with no file yet gives 0, not an error
        if error:
            unreachable.append(dim.name)
            _say("fail", f"collector {dim.name}: {error}")
        else:
            _say("ok", f"collector {dim.name}: read {plain(s.raw)}{_engine(sampler, dim)}")
            if s.warning:  # e.g. a counter the answer does not hold yet: a typo shows here
                warns.say(COLLECTOR_PROBLEM, f"collector {dim.name}: {s.warning}")
    if any(d.collector.type == "log" for d in cfg.dimensions):
        line = first_reading_line(cfg.state_dir, ledger_instance(cfg.state_dir))
        _say("ok", f"logs' first reading: {line}")
    warn_service_access(cfg, warns)
    from agent.config.loader import traps

    for kind, trap in traps(cfg):
        warns.say(kind, trap)
    from agent.host import platform

    plat = platform.detect(cfg.platform, os.environ)
    _say("ok", f"platform {plat.name} ({plat.how})")
    if cfg.register_usage is not None and cfg.register_usage.public_key:
        from agent.sending.registration import describe_key

        key = cfg.register_usage.public_key
        _say("ok", f"register_usage.public_key {key}: {describe_key(key)}")
    if args.offline:
        return EX_OK
    from agent.host.imds import resolve_region
    from agent.modes.choose import mode_for
    from agent.sending import client as metering
    from agent.sending.outcomes import ROLE_HINT

    metadata = platform.TaskMetadata(os.environ) if plat.name == "ecs" else None
    check_identity(plat, metadata, warns)
    region, where = resolve_region(cfg.metering.region, platform=plat.name, metadata=metadata)
    _say("ok", f"region {region} (from {where})")
    client = metering.MeteringClient(region, cfg.metering.endpoint_url, platform=plat.name)
    if not client.has_credentials():
        raise Unavailable(f"no AWS credentials found; {ROLE_HINT}")
    method = client.credential_source()
    mode = mode_for(cfg)
    # AWS refuses the node's role for container products' MeterUsage; SaaS is the seller's own
    node_role, static = mode.credentials(plat.name, method)
    if node_role:
        from agent.errors import NotAuthorized

        _say("fail", f"credentials: {method}")
        raise NotAuthorized(node_role)
    _say("ok", f"credentials found ({method})")
    if static:
        warns.say(STATIC_CREDENTIALS, static)
    mode.check_permission(client, cfg, clock, _say)  # DryRun each dimension, or SaaS's probe
    if cfg.register_usage is not None:
        refused = check_register_usage(cfg, client, clock, warns)
        if refused:
            return refused
    if unreachable:
        print(
            f"metering-agent: collector source unreachable for {', '.join(unreachable)}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    return EX_OK


def check_identity(plat: Any, metadata: Any, warns: Warnings) -> None:
    """The id the ledger will carry (and seed the send offset with): ECS TaskARN, EKS pod uid
    or name (a failure is the run's: 69), EC2 the IMDS instance id (a warning: `run` waits)."""
    from agent.host import platform
    from agent.host.imds import Imds, ImdsError

    if plat.container:
        task_id, source = platform.identity(plat.name, os.environ, metadata)
        _say("ok", f"identity {task_id} (from {source})")
        return
    try:
        _say("ok", f"identity {Imds().instance_id()} (from IMDS instance-id)")
    except ImdsError as e:
        warns.say(IDENTITY_UNVERIFIED, f"identity: {e} (`run` keeps asking IMDS)")


def check_register_usage(cfg: Any, client: Any, clock: Clock, warns: Warnings) -> int:
    """RegisterUsage as `run` calls it (it has no DryRun): one `ok` line, or one `fail` line and
    the error's exit code (77 for the final errors and a signature that does not verify)."""
    from agent.sending import registration

    try:
        done = registration.register(client, cfg, clock)
    except AgentError as e:
        _say("fail", str(e))
        return e.exit_code
    how = "signature verified" if done.verified else "signature not verified (no public_key)"
    _say("ok", f"RegisterUsage: registered, public key version {done.public_key_version}, {how}")
    if done.rotation is not None:
        rotation = registration.rotation_warning(done.public_key_version, done.rotation)
        warns.say(KEY_ROTATION, f"RegisterUsage: {rotation}")
    return EX_OK


def warn_service_access(cfg: Any, warns: Warnings) -> None:
    """Run as root, `check` reads every file; the service cannot. Say which logs it would miss."""
    if os.geteuid() != 0:
        return  # the check's own reads already ran with this user's rights
    from agent.host import access

    who = access.service_account()
    for dim in cfg.dimensions:
        if dim.collector.type != "log":
            continue
        opts = dim.collector.options
        if who is None:  # not installed yet: the sandbox's hidden trees are known all the same
            for problem in access.sandbox_problems(opts["path"], opts.get("rotated")):
                warns.say(SERVICE_CANNOT_READ, f"collector {dim.name}: {problem}")
            continue
        for problem in access.log_problems(opts["path"], opts.get("rotated"), who):
            warns.say(
                SERVICE_CANNOT_READ,
                f"collector {dim.name}: {problem} (the service runs as {who.name}, with group "
                "adm, and bills nothing from a log it cannot read)",
            )


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.config.loader import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EX_OK


def _engine(sampler: Any, dim: Any) -> str:
    """For a log dimension's line: which engine matches its pattern (linecount.LineMatcher)."""
    engine = getattr(getattr(sampler.collectors.get(dim.name), "matcher", None), "engine", None)
    return f" (pattern on {engine})" if engine else ""
