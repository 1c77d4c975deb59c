"""Subcommands, and the mapping of AgentError subclasses to sysexits exit codes.

Every error a user can cause ends here as one line on stderr and a documented exit code; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import __version__
from agent.clock import Clock
from agent.errors import EX_NOPERM, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, AgentError, Unavailable
from agent.host import ownership

log = logging.getLogger("agent")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        code = int(args.func(args) or EX_OK)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except BrokenPipeError:
        return closed_pipe()
    except AgentError as e:
        print(f"metering-agent: {e}", file=sys.stderr)
        return EX_SOFTWARE if getattr(args, "check", False) else e.exit_code
    except sqlite3.Error as e:
        # Permissions (the ledger is the agent user's, mode 0600), a full disk, a damaged file.
        print(
            f"metering-agent: ledger error: {e}; run as root or the metering-agent user, and "
            "check the state_dir's disk",
            file=sys.stderr,
        )
        return EX_SOFTWARE
    except KeyboardInterrupt:
        return 130


EX_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a writer whose reader went away


def closed_pipe() -> int:
    """`status | head`: the reader left. End quietly, as `cat` would, without a traceback or
    Python's own complaint when it flushes stdout again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EX_PIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metering-agent",
        description="Reports hourly usage to AWS Marketplace with MeterUsage.",
    )
    parser.add_argument("--version", action="version", version=f"metering-agent {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-c",
        "--config",
        help="config file (default: $METERING_AGENT_CONFIG, else /etc/metering-agent/config.yaml)",
    )
    common.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    common.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="json: one JSON object per line, for log shippers",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser(
        "check",
        parents=[common],
        help="validate config, run collectors once, resolve region and credentials, DryRun",
    )
    p.add_argument(
        "--offline", action="store_true", help="config and collector construction only, no network"
    )
    p.add_argument(
        "-q", "--quiet", action="store_true", help="print only warnings and failures (ExecStartPre)"
    )
    add_clock_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "sample", parents=[common], help="run every collector once and print what it would add"
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "run",
        parents=[common],
        help="the daemon: sample, seal hours, send",
    )
    add_clock_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "send",
        parents=[common],
        help="send the pending hours that are due now, then exit (what `run` does each hour)",
    )
    p.add_argument(
        "--flush", action="store_true", help="send every pending hour now, ignoring send slots"
    )
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    add_clock_options(p)
    p.set_defaults(func=cmd_send)

    # Internal: `run`'s RegisterUsage child (registration.at_start); not listed in --help.
    p = sub.add_parser("register-usage", parents=[common])
    add_clock_options(p)
    p.set_defaults(func=cmd_register_usage)

    p = sub.add_parser("status", parents=[common], help="hours in the ledger and metering health")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hours", type=int, default=24, help="how many hours back to list (default 24)")
    p.add_argument(
        "--check", action="store_true", help="print nothing; exit 0 when health is ok, else 1"
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "report", parents=[common], help="what was billed, hour by hour, with record ids"
    )
    p.add_argument("--since", required=True, help="a duration ago (24h, 7d) or a date (2026-11-01)")
    p.add_argument("--until", default=None, help="same forms as --since (default: now)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--customer", default=None, help="SaaS mode: only this customer label's records")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("schema", help="print the config's JSON Schema (draft 2020-12)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "emulator", parents=[common], help="local MeterUsage + IMDSv2 emulator on 127.0.0.1"
    )
    p.add_argument("--port", type=int, default=8787)
    p.add_argument("--region", default="us-east-1", help="the region the emulated instance is in")
    p.add_argument(
        "--dryrun-style",
        choices=("error", "200"),
        default="error",
        help="answer DryRun with a DryRunOperation error (default) or HTTP 200",
    )
    p.add_argument(
        "--any-product",
        action="store_true",
        help="accept any product code and dimension (default: those in -c's config, if given)",
    )
    p.add_argument(
        "--dimensions",
        default=None,
        help="the listing's dimension names, comma-separated: others are refused as AWS would",
    )
    add_clock_options(p)
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser(
        "trial",
        parents=[common],
        help="your config end to end against the built-in emulator, on a fast clock",
    )
    p.add_argument("--hours", type=int, default=2, help="billing hours to run (default 2)")
    p.add_argument(
        "--speed", type=float, default=60.0, help="clock speed-up (default 60: an hour a minute)"
    )
    p.add_argument(
        "--dimensions",
        default=None,
        help="the listing's dimension names, comma-separated: MeterUsage refuses others",
    )
    p.set_defaults(func=cmd_trial)

    p = sub.add_parser(
        "prepare-image",
        parents=[common],
        help="the last step before creating an AMI: remove the ledger, health file and locks",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_prepare_image)
    add_customer_commands(sub, common)
    return parser


def add_customer_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """SaaS mode: `customers add|list|remove`, `resolve-customer`, `serve-registration`."""
    p = sub.add_parser("customers", help="SaaS mode: the customers usage is billed to")
    csub = p.add_subparsers(title="customers commands", metavar="ACTION")
    p.set_defaults(func=functools.partial(_usage, p))
    c = csub.add_parser(
        "add",
        parents=[common],
        help="add a customer: --token TOKEN (ResolveCustomer), or --account ID --license ARN "
        "--as LABEL, or --customer-identifier ID --as LABEL (legacy)",
    )
    c.add_argument("--token", help="a registration token (x-amzn-marketplace-token); - reads stdin")
    c.add_argument("--account", help="CustomerAWSAccountId (12 digits)")
    c.add_argument("--license", dest="license_arn", help="the customer's LicenseArn")
    c.add_argument("--agreement", help="the AgreementId (optional, kept for reference)")
    c.add_argument("--customer-identifier", help="a legacy integration's CustomerIdentifier")
    c.add_argument(
        "--as", dest="label", help="the customer label's value in the usage (default: account id)"
    )
    c.set_defaults(func=cmd_customers_add)
    c = csub.add_parser("list", parents=[common], help="the customers, removed ones marked")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(func=cmd_customers_list)
    c = csub.add_parser(
        "remove", parents=[common], help="no more idle zeros for LABEL (its usage is still billed)"
    )
    c.add_argument("label", metavar="LABEL")
    c.set_defaults(func=cmd_customers_remove)
    p = sub.add_parser(
        "resolve-customer",
        parents=[common],
        help="ResolveCustomer for a registration token; prints the answer as JSON, stores nothing",
    )
    p.add_argument("token", metavar="TOKEN", help="the registration token; - reads stdin")
    p.set_defaults(func=cmd_resolve_customer)
    p = sub.add_parser(
        "serve-registration",
        parents=[common],
        help="serve the fulfillment URL handler (what `run` starts when saas.registration is set)",
    )
    add_clock_options(p)
    p.set_defaults(func=cmd_serve_registration)


def add_clock_options(p: argparse.ArgumentParser) -> None:
    # For the demo and tests: the same engine on a faster clock (RATE[:ORIGIN[:WALL0]]).
    # Production never passes it.
    p.add_argument("--clock", default=None, help=argparse.SUPPRESS)


def make_clock(args: argparse.Namespace) -> Clock:
    try:
        return Clock.from_spec(getattr(args, "clock", None))
    except (TypeError, ValueError):
        raise AgentError(f"--clock {args.clock!r}: expected RATE[:ORIGIN[:WALL0]]") from None


def setup_logging(level: str, fmt: str = "text") -> None:
    from agent.host.logs import JsonFormatter, Redact, text_formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redact())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(text_formatter(sys.stderr))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # botocore and urllib3 at debug level print request headers, session tokens among them: they
    # speak only of problems, whatever --log-level says.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # APScheduler logs every job run at INFO: one line per sample round is noise in a journal.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


def load_config(args: argparse.Namespace) -> Any:
    from agent.config import loader as config

    return config.load(config.resolve_path(args.config))


# -- check ------------------------------------------------------------------------------------


_quiet = threading.Event()  # check --quiet: the "ok" lines are not printed


def _say(status: str, text: str) -> None:
    if status == "ok" and _quiet.is_set():
        return
    print(f"{status:<5} {text}", flush=True)


def cmd_check(args: argparse.Namespace) -> int:
    """Run the same validation as `run`, then every collector once, then region, credentials and
    DryRun; one line per step. Writes no state."""
    from agent.collecting.sampling import Sampler, take_within

    (_quiet.set if args.quiet else _quiet.clear)()
    cfg = load_config(args)
    _say("ok", f"config {cfg.source}: product {cfg.product_code}, {len(cfg.dimensions)} dimensions")
    sampler = Sampler(cfg)
    clock = make_clock(args)
    unreachable = []
    for dim in cfg.dimensions:
        if args.offline:
            problem = sampler.probe(dim)
            if problem:
                _say("warn", f"collector {dim.name}: {problem} (fine at boot if it appears later)")
            else:
                _say("ok", f"collector {dim.name}: {dim.collector.type} ready")
            continue
        s = take_within(sampler, dim, clock.time(), None, clock.monotonic)
        error = s.error or sampler.probe(dim)  # a log read with no file yet gives 0, not an error
        if error:
            unreachable.append(dim.name)
            _say("fail", f"collector {dim.name}: {error}")
        else:
            _say("ok", f"collector {dim.name}: read {_num(s.raw)}")
    warn_service_access(cfg)
    from agent.config.loader import traps

    for trap in traps(cfg):
        print(f"warning: {trap}", flush=True)
    from agent.host import platform

    plat = platform.detect(cfg.platform, os.environ)
    _say("ok", f"platform {plat.name} ({plat.how})")
    if cfg.register_usage is not None and cfg.register_usage.public_key:
        from agent.sending.registration import describe_key

        key = cfg.register_usage.public_key
        _say("ok", f"register_usage.public_key {key}: {describe_key(key)}")
    if args.offline:
        return EX_OK
    from agent.sending import client as metering

    metadata = platform.TaskMetadata(os.environ) if plat.name == "ecs" else None
    check_identity(plat, metadata)
    region, where = metering.resolve_region(
        cfg.metering.region, platform=plat.name, metadata=metadata
    )
    _say("ok", f"region {region} (from {where})")
    client = metering.MeteringClient(region, cfg.metering.endpoint_url, platform=plat.name)
    if not client.has_credentials():
        raise Unavailable(f"no AWS credentials found; {metering.ROLE_HINT}")
    method = client.credential_source()
    # AWS refuses the node's role for container products' MeterUsage; SaaS is the seller's own
    node_role = platform.node_role_refusal(plat.name, method) if cfg.mode != "saas" else None
    if node_role:
        from agent.errors import NotAuthorized

        _say("fail", f"credentials: {method}")
        raise NotAuthorized(node_role)
    _say("ok", f"credentials found ({method})")
    static = platform.static_keys_warning(plat.name, method) if cfg.mode != "saas" else None
    if static:
        _say("warn", static)
    if cfg.mode == "saas":  # no DryRun: an empty BatchMeterUsage is the permission probe
        outcome = client.probe_batch(cfg.product_code)
        verdict = metering.dry_run_verdict(
            outcome,
            "BatchMeterUsage (0 records)",
            metering.SAAS_ROLE_HINT,
            metering.SAAS_PRODUCT_HINT,
        )
        _say("ok", verdict)
    else:
        dry_run_every_dimension(cfg, client, clock)
    if cfg.register_usage is not None:
        refused = check_register_usage(cfg, client, clock)
        if refused:
            return refused
    if unreachable:
        print(
            f"metering-agent: collector source unreachable for {', '.join(unreachable)}",
            file=sys.stderr,
        )
        return EX_UNAVAILABLE
    return EX_OK


def check_identity(plat: Any, metadata: Any) -> None:
    """The id the ledger will carry (and seed the send offset with): ECS TaskARN, EKS pod uid
    or name (a failure is the run's: 69), EC2 the IMDS instance id (a warning: `run` waits)."""
    from agent.host import platform
    from agent.sending import client as metering

    if plat.container:
        task_id, source = platform.identity(plat.name, os.environ, metadata)
        _say("ok", f"identity {task_id} (from {source})")
        return
    try:
        _say("ok", f"identity {metering.Imds().instance_id()} (from IMDS instance-id)")
    except metering.ImdsError as e:
        _say("warn", f"identity: {e} (`run` keeps asking IMDS)")


def check_register_usage(cfg: Any, client: Any, clock: Clock) -> int:
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
        print(f"warning: RegisterUsage: {rotation}", flush=True)
    return EX_OK


def warn_service_access(cfg: Any) -> None:
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
                _say("warn", f"collector {dim.name}: {problem}")
            continue
        for problem in access.log_problems(opts["path"], opts.get("rotated"), who):
            _say(
                "warn",
                f"collector {dim.name}: {problem} (the service runs as {who.name}, with group "
                "adm, and bills nothing from a log it cannot read)",
            )


def dry_run_every_dimension(cfg: Any, client: Any, clock: Clock) -> None:
    """DryRun each dimension, so a name the listing lacks fails `check` (77) and is named.

    A refusal that is not about the dimension (role, entitlement, network) ends it at once."""
    from agent.errors import NotAuthorized
    from agent.sending import client as metering

    unknown = []
    for dim in cfg.dimensions:
        outcome = client.dry_run(cfg.product_code, dim.name, dim.decimals, clock.time())
        if outcome.code == "InvalidUsageDimensionException":
            unknown.append(dim.name)
            _say("fail", f"MeterUsage DryRun {dim.name}: {outcome.error}")
            continue
        _say("ok", f"{metering.dry_run_verdict(outcome)} for {dim.name}")
    if unknown:
        raise NotAuthorized(
            f"MeterUsage DryRun: dimension {', '.join(unknown)} is not a dimension of product "
            f"{cfg.product_code}'s listing; fix dimensions[].name in {cfg.source} (or add it to "
            "the listing)"
        )


def _num(value: Any) -> str:
    """A reading for people: plain notation, at most 6 decimals (what MeterUsage can carry)."""
    if value is None:
        return "-"
    if value.as_tuple().exponent < -6:
        value = value.quantize(Decimal("0.000001"))
    return format(value.normalize(), "f")


# -- sample -----------------------------------------------------------------------------------


def cmd_sample(args: argparse.Namespace) -> int:
    """Run every collector once; print each dimension's raw reading and what it adds to the hour."""
    from agent.collecting.sampling import Sampler, take_within
    from agent.collectors.log import LogCollector

    cfg = load_config(args)
    sampler = Sampler(cfg, all_labels=True)  # shows each reading's breakdown
    clock = Clock()
    ledger = open_ledger_readonly(cfg.state_dir)
    for dim in cfg.dimensions:
        collector = sampler.collectors.get(dim.name)
        if isinstance(collector, LogCollector):
            collector.count_lines = True
        saved = ledger.position(dim.name) if ledger else None
        t = clock.time()
        s = take_within(sampler, dim, t, saved, clock.monotonic)
        if s.error or s.value is None:
            print(f"warning: {dim.name}: {s.error}", file=sys.stderr)
            continue
        text = f"{dim.name} {_num(s.value)}  (raw {_num(s.raw)}, {dim.aggregate}); "
        text += _billed(dim, t, s.value)
        if isinstance(collector, LogCollector):
            last = collector.last
            text += f"; log: {last.lines} lines read, {_num(last.matched)} matched"
        print(text)
        for lost in s.unread:  # what `run` would log, count in status and name in health
            print(f"warning: {dim.name}: usage went unread: {lost.what}; fix: {lost.fix}",
                  file=sys.stderr)  # fmt: skip
        if cfg.saas is not None:
            for line in customer_lines(cfg.saas.customer_label, s.breakdown or {}, ledger):
                print(line)
            continue
        for line in breakdown_lines(s.breakdown or {}):
            print(line)
    return EX_OK


def customer_lines(label: str, breakdown: Mapping[Any, Decimal], ledger: Any) -> list[str]:
    """SaaS mode's `sample`: the reading per customer (the value of `label`), each marked
    unknown when no customer has it yet (its usage would be held)."""
    by: dict[str, Decimal] = {}
    for labels, value in breakdown.items():
        who = dict(labels).get(label, "")
        by[who] = by.get(who, Decimal(0)) + value
    lines = []
    for who, value in sorted(by.items()):
        if not value:
            continue
        known = bool(who) and ledger is not None and ledger.customer(who) is not None
        note = "" if known else "  (unknown customer: held until `customers add`)"
        lines.append(f"  customer {who or '(no label)'}  {_num(value)}{note}")
    return lines


def breakdown_lines(breakdown: Mapping[Any, Decimal], top: int = 5) -> list[str]:
    """A reading's breakdown for `sample`: the `top` largest label sets, then what the rest add."""
    ranked = sorted(breakdown.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [
        f"  {' '.join(f'{k}={v}' for k, v in labels) or '(no labels)'}  {_num(value)}"
        for labels, value in ranked[:top]
    ]
    rest = ranked[top:]
    if rest:
        total = sum((v for _, v in rest), Decimal(0))
        lines.append(f"  ... {len(rest)} more label sets  {_num(total)}")
    return lines


def _billed(dim: Any, t: float, value: Decimal) -> str:
    """What the reading is worth in the dimension's billed units: after `scale`, and what an hour
    holding only this reading would send after rounding (the sealed hour rounds its total)."""
    from agent.aggregate import Point, combine_exact, to_decimal, to_quantity
    from agent.billing.sealing import span_for

    exact = combine_exact(dim.aggregate, [Point(t, value, span_for(t, dim.interval))])
    alone = to_quantity(exact, dim.scale, dim.rounding, dim.decimals)
    hour_value = to_decimal(exact)
    return (
        f"billed units {_num(hour_value * dim.scale)} (scale {_num(dim.scale)}); an hour of only "
        f"this reading sends {alone.text} (rounding {dim.rounding})"
    )


def open_ledger_readonly(state_dir: Path, command: str = "status") -> Any:
    """The ledger for reading, or None when there is none yet; never creates or writes one.

    A read-only open never migrates: a ledger an older agent wrote (a lower schema version) is
    named as such, with how to migrate it, instead of failing on the first missing column.
    """
    from agent.ledger import Ledger
    from agent.ledger.database import LEDGER_FILE
    from agent.ledger.migrations import SCHEMA_VERSION

    path = Path(state_dir) / LEDGER_FILE
    try:
        if not path.exists():
            return None
    except PermissionError:
        raise ownership.unreadable(Path(state_dir), command) from None
    if not os.access(path, os.R_OK):
        raise ownership.unreadable(Path(state_dir), command)
    try:
        ledger = Ledger(state_dir, readonly=True)
        version = ledger.schema_version()
    except sqlite3.Error as e:
        if not os.access(state_dir, os.W_OK) and "unable to open" in str(e):
            raise ownership.unreadable(Path(state_dir), command) from None
        raise AgentError(f"{state_dir}/{LEDGER_FILE}: cannot read the ledger: {e}") from None
    if version < SCHEMA_VERSION:
        ledger.close()
        raise AgentError(
            f"{state_dir}/{LEDGER_FILE}: the ledger is schema {version}, this agent is schema "
            f"{SCHEMA_VERSION}; start the agent once (systemctl start metering-agent) to migrate it"
        )
    return ledger


# -- run / send -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from agent.daemon.daemon import start

    cfg = load_config(args)
    ownership.check_writer(Path(cfg.state_dir), "run")
    return start(cfg, make_clock(args), log_format=args.log_format).run()


def cmd_send(args: argparse.Namespace) -> int:
    """Send what is due (all pending with --flush), in this process; used by `run` as a child."""
    from agent.host.locks import StateLock
    from agent.ledger import Ledger
    from agent.sending import client as metering
    from agent.sending.policy import Sender, note_unreachable

    cfg = load_config(args)
    clock = make_clock(args)
    ownership.check_writer(Path(cfg.state_dir), "send --flush" if args.flush else "send")
    send_lock = StateLock(Path(cfg.state_dir), name="send.lock")
    send_lock.acquire(wait=True)  # one sender at a time, even an orphan of a killed daemon
    ledger = Ledger(cfg.state_dir)
    from agent.host import platform

    plat = platform.detect(cfg.platform, os.environ)
    try:
        region, where = metering.resolve_region(cfg.metering.region, platform=plat.name)
    except Unavailable as e:
        note_unreachable(ledger, cfg, clock.time(), str(e))
        return EX_UNAVAILABLE
    connect, read = call_timeouts(clock, args.deadline)
    client = metering.MeteringClient(
        region, cfg.metering.endpoint_url, connect, read, platform=plat.name
    )
    note_sender_context(ledger, plat, region, where, client)
    if cfg.mode == "saas":  # BatchMeterUsage per customer, on the same send state
        from agent.sending.batches import BatchSender

        sender: Sender = BatchSender(ledger, cfg, client, clock)
    else:
        sender = Sender(ledger, cfg, client, clock)
    report = sender.run(flush=args.flush, deadline=args.deadline)
    ledger.close()
    if report.paused:
        return EX_NOPERM
    return EX_UNAVAILABLE if report.retry else EX_OK


def call_timeouts(clock: Any, deadline: float | None) -> tuple[float, float]:
    """With a deadline (the stop flush), no call may block past it: the connect and read
    timeouts are capped at the seconds left (at least 1 s); none: botocore's own (5 s, 15 s)."""
    if deadline is None:
        return 5.0, 15.0
    left = max(1.0, (deadline - clock.time()) / clock.rate)
    return min(5.0, left), min(15.0, left)


def note_sender_context(ledger: Any, plat: Any, region: str, where: str, client: Any) -> None:
    """Keep in the ledger's meta what only the sender knows (botocore's credential source) with
    the region it signs for, for `status`; logged when it changes."""
    try:
        method = client.credential_source()
    except Exception as e:  # botocore raises many kinds while fetching from IMDS/ECS/STS
        method = f"lookup failed: {e}"
    context = {
        "platform": plat.name,
        "region": region,
        "region_source": where,
        "credential_source": method,
    }
    if ledger.get_meta("sender_context") != context:
        log.info(
            "sending as platform %s, region %s (from %s), credentials %s",
            plat.name,
            region,
            where,
            method,
        )
        ledger.update_meta(sender_context=context)


def cmd_register_usage(args: argparse.Namespace) -> int:
    """RegisterUsage once (with retries), for `run`: one JSON line on stdout (registration)."""
    from agent.sending import registration

    return registration.child_main(load_config(args), make_clock(args))


# -- status -----------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from agent.commands import status

    cfg = load_config(args)
    if args.check:  # a product's own probe: exit 0 or 1 only (SPEC); no ledger yet is not ok
        return EX_OK if status.check(cfg.state_dir, Clock()) else EX_SOFTWARE
    ledger = open_ledger_readonly(cfg.state_dir)
    report = status.collect(ledger, cfg, Clock(), hours=args.hours)
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return EX_OK


# -- report -----------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from agent.commands import report

    cfg = load_config(args)
    now = Clock().time()
    since = report.parse_when(args.since, now, "--since")
    until = report.parse_when(args.until, now, "--until") if args.until else None
    if until is not None and until <= since:
        raise report.UsageError("--until must be later than --since")
    if args.customer is not None and cfg.mode != "saas":
        raise report.UsageError(f"--customer is for SaaS mode; {cfg.source} has mode: instance")
    ledger = open_ledger_readonly(cfg.state_dir, "report")
    data = report.rows(ledger, since, until, cfg.mode == "saas", args.customer)
    if args.customer is not None and not data and (ledger is None or not _known(ledger, args)):
        raise report.UsageError(
            f"--customer {args.customer}: no such customer in {cfg.state_dir}; "
            "see `metering-agent customers list`"
        )
    print(report.render(data, args.format))
    return EX_OK


def _known(ledger: Any, args: argparse.Namespace) -> bool:
    return ledger.customer(args.customer) is not None


# -- schema -----------------------------------------------------------------------------------


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.config.loader import json_schema

    print(json.dumps(json_schema(), indent=2))
    return EX_OK


# -- emulator ---------------------------------------------------------------------------------


def cmd_emulator(args: argparse.Namespace) -> int:
    from agent.emulator import Emulator, Settings
    from agent.sending.client import IMDS_ENV

    settings = Settings(region=args.region, dryrun_style=args.dryrun_style)
    if not args.any_product and (args.config or os.environ.get("METERING_AGENT_CONFIG")):
        cfg = load_config(args)
        settings.product_codes = {cfg.product_code}
        settings.dimensions = {d.name for d in cfg.dimensions}
    if args.dimensions:
        settings.dimensions = {d.strip() for d in args.dimensions.split(",") if d.strip()}
    emulator = Emulator(settings, make_clock(args))
    try:
        url = emulator.serve(args.port)
    except OSError as e:
        raise Unavailable(f"emulator: cannot listen on 127.0.0.1:{args.port}: {e.strerror}") from e
    print(
        f"emulator listening on {url} (region {settings.region}); point the agent at it with\n"
        f"  export {IMDS_ENV}={url}\n"
        f"  metering: {{endpoint_url: {url}}}\n"
        f"as an ECS task: export ECS_CONTAINER_METADATA_URI_V4={url}/ecs/v4 "
        f"AWS_CONTAINER_CREDENTIALS_FULL_URI={url}/ecs/credentials\n"
        f"as an EKS pod (IRSA): export AWS_ENDPOINT_URL_STS={url} AWS_ROLE_ARN=<any role arn> "
        f"AWS_WEB_IDENTITY_TOKEN_FILE=<any file> AWS_REGION={settings.region} POD_UID=<any id>\n"
        f"RegisterUsage answers are signed with the key at {url}/_emulator/public_key",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    emulator.stop()
    return EX_OK


# -- trial ------------------------------------------------------------------------------------


def cmd_trial(args: argparse.Namespace) -> int:
    from agent.commands import trial
    from agent.config import loader as config
    from agent.errors import ConfigError

    cfg = config.load(config.resolve_path(args.config))
    if cfg.mode == "saas":
        raise ConfigError(
            "mode", f"trial runs instance mode (MeterUsage) only; {cfg.source} has mode: saas; "
            "try it with `metering-agent sample` and `status` against a test state_dir",
        )  # fmt: skip

    return trial.main(config.resolve_path(args.config), args.hours, args.speed, args.dimensions)


# -- prepare-image ----------------------------------------------------------------------------


def cmd_prepare_image(args: argparse.Namespace) -> int:
    from agent.collecting.sampling import Sampler
    from agent.commands import image

    cfg = load_config(args)
    Sampler(cfg)  # the collectors build, as `check --offline` has them (plugins among them)
    return image.prepare(cfg, args.yes)


# -- customers (SaaS mode) --------------------------------------------------------------------


def _usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`customers` without an action: its usage, exit 2 (as argparse's own usage errors)."""
    parser.print_help(sys.stderr)
    return 2


def _token_argument(token: str) -> str:
    """A token from the command line, or from stdin with `-` (out of `ps` and shell history)."""
    from agent.fulfillment.customers import BadArgument

    if token == "-":
        token = sys.stdin.readline()
    token = token.strip()
    if not token:
        raise BadArgument("the registration token is empty")
    return token


def _resolver(cfg: Any) -> Any:
    from agent.sending import client as metering

    region, _ = metering.resolve_region(cfg.metering.region)
    return metering.MeteringClient(region, cfg.metering.endpoint_url)


def cmd_customers_add(args: argparse.Namespace) -> int:
    from agent.fulfillment import customers
    from agent.ledger import Ledger

    cfg = load_config(args)
    customers.require_saas(cfg, "customers add")
    now = Clock().time()
    if args.token is not None:
        if args.account or args.license_arn or args.customer_identifier or args.agreement:
            raise customers.BadArgument(
                "--token takes the customer from ResolveCustomer: without --account, --license, "
                "--agreement or --customer-identifier"
            )
        if args.label is not None:
            customers.check_label(args.label)
        token = _token_argument(args.token)
        ownership.check_writer(Path(cfg.state_dir), "customers add")  # before the token is used
        resolved = _resolver(cfg).resolve_customer(token)
        customer = customers.from_resolved(resolved, args.label, now, cfg.product_code)
    else:
        if args.label is None:
            raise customers.BadArgument(
                "--as LABEL is required with --account/--license or --customer-identifier"
            )
        customer = customers.by_hand(args.label, now, args.account, args.license_arn,
                                     args.agreement, args.customer_identifier)  # fmt: skip
    ownership.check_writer(Path(cfg.state_dir), "customers add")
    ledger = Ledger(cfg.state_dir)
    try:
        stored = customers.store(ledger, customer)
    finally:
        ledger.close()
    print(stored.line())
    return EX_OK


def cmd_customers_list(args: argparse.Namespace) -> int:
    from agent.fulfillment import customers

    cfg = load_config(args)
    customers.require_saas(cfg, "customers list")
    ledger = open_ledger_readonly(cfg.state_dir, "customers list")
    found = [] if ledger is None else ledger.customers(include_removed=True)
    if ledger is not None:
        ledger.close()
    if args.json:
        print(json.dumps([customers.as_json(c) for c in found], indent=2))
    else:
        print(customers.table(found))
    return EX_OK


def cmd_customers_remove(args: argparse.Namespace) -> int:
    from agent.fulfillment import customers
    from agent.ledger import Ledger

    cfg = load_config(args)
    customers.require_saas(cfg, "customers remove")
    ownership.check_writer(Path(cfg.state_dir), "customers remove")
    ledger = Ledger(cfg.state_dir)
    try:
        known = ledger.customer(args.label)
        if known is None:
            raise AgentError(
                f"no customer labelled {args.label!r} (metering-agent customers list shows them)"
            )
        if not ledger.remove_customer(args.label, Clock().time()):
            print(f"customer {args.label} was already removed")
            return EX_OK
    finally:
        ledger.close()
    print(f"customer {args.label} removed: no more idle zeros; its usage is still billed")
    return EX_OK


def cmd_resolve_customer(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    resolved = _resolver(cfg).resolve_customer(_token_argument(args.token))
    print(json.dumps(resolved.as_json(), indent=2))
    return EX_OK


def cmd_serve_registration(args: argparse.Namespace) -> int:
    from agent.fulfillment import server as fulfillment
    from agent.fulfillment.customers import require_saas

    cfg = load_config(args)
    require_saas(cfg, "serve-registration")
    if cfg.saas.registration is None:
        from agent.errors import ConfigError

        raise ConfigError("saas.registration", "not set: add listen and redirect to serve it")
    return fulfillment.serve(cfg, make_clock(args))
