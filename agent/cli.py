"""The command line: the parser, the dispatch to the commands (agent/commands/, one module per
group), and the mapping of AgentError subclasses to sysexits exit codes.

Every error a user can cause ends here as one line on stderr and a documented exit code; anything
else is a bug and keeps its traceback. A command's module is imported only when that command
runs, so a short command (or the daemon) loads nothing of another's.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from typing import Any

from agent import __version__
from agent.errors import EX_OK, EX_SOFTWARE, AgentError

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
    p.add_argument(
        "--strict",
        action="store_true",
        help="a warning the config does not accept (warnings.accept) fails the check (78)",
    )
    add_clock_options(p)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "sample", parents=[common], help="run every collector once and print what it would add"
    )
    p.add_argument(
        "--from-beginning",
        action="store_true",
        help="test each log pattern against the lines already in its files (count, examples, "
        "top label values)",
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
    p.add_argument(
        "--customers",
        default=None,
        metavar="FILE|LIST",
        help="SaaS mode: the customers to register, from a file (one a line) or comma-separated: "
        "LABEL, LABEL=ACCOUNT_ID or ACCOUNT_ID",
    )
    p.set_defaults(func=cmd_trial)

    p = sub.add_parser(
        "prepare-image",
        parents=[common],
        help="the last step before creating an AMI: remove the ledger, health file and locks",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_prepare_image)

    p = sub.add_parser(
        "reset-ledger",
        parents=[common],
        help="move a damaged ledger aside (ledger.db.damaged-TIME) so the next `run` starts anew",
    )
    p.add_argument("--yes", action="store_true", help="required: the move is on purpose")
    p.set_defaults(func=cmd_reset_ledger)
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
    p = sub.add_parser(
        "watch-subscriptions",
        parents=[common],
        help="apply the subscription queue's notifications (what `run` starts when "
        "saas.notifications is set)",
    )
    add_clock_options(p)
    p.set_defaults(func=cmd_watch_subscriptions)


def add_clock_options(p: argparse.ArgumentParser) -> None:
    # For the demo and tests: the same engine on a faster clock (RATE[:ORIGIN[:WALL0]]).
    # Production never passes it.
    p.add_argument("--clock", default=None, help=argparse.SUPPRESS)


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


def _usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`customers` without an action: its usage, exit 2 (as argparse's own usage errors)."""
    parser.print_help(sys.stderr)
    return 2


# -- dispatch: each command's module, imported when it runs --------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from agent.commands import check

    return check.cmd_check(args)


def cmd_schema(args: argparse.Namespace) -> int:
    from agent.commands import check

    return check.cmd_schema(args)


def cmd_sample(args: argparse.Namespace) -> int:
    from agent.commands import sample

    return sample.cmd_sample(args)


def cmd_run(args: argparse.Namespace) -> int:
    from agent.commands import run

    return run.cmd_run(args)


def cmd_send(args: argparse.Namespace) -> int:
    from agent.commands import run

    return run.cmd_send(args)


def cmd_register_usage(args: argparse.Namespace) -> int:
    from agent.commands import run

    return run.cmd_register_usage(args)


def cmd_status(args: argparse.Namespace) -> int:
    from agent.commands import status

    return status.cmd_status(args)


def cmd_report(args: argparse.Namespace) -> int:
    from agent.commands import report

    return report.cmd_report(args)


def cmd_emulator(args: argparse.Namespace) -> int:
    from agent.commands import emulator

    return emulator.cmd_emulator(args)


def cmd_trial(args: argparse.Namespace) -> int:
    from agent.commands import trial

    return trial.cmd_trial(args)


def cmd_prepare_image(args: argparse.Namespace) -> int:
    from agent.commands import image

    return image.cmd_prepare_image(args)


def cmd_reset_ledger(args: argparse.Namespace) -> int:
    from agent.commands import reset_ledger

    return reset_ledger.cmd_reset_ledger(args)


def cmd_customers_add(args: argparse.Namespace) -> int:
    from agent.commands import customers

    return customers.cmd_customers_add(args)


def cmd_customers_list(args: argparse.Namespace) -> int:
    from agent.commands import customers

    return customers.cmd_customers_list(args)


def cmd_customers_remove(args: argparse.Namespace) -> int:
    from agent.commands import customers

    return customers.cmd_customers_remove(args)


def cmd_resolve_customer(args: argparse.Namespace) -> int:
    from agent.commands import customers

    return customers.cmd_resolve_customer(args)


def cmd_serve_registration(args: argparse.Namespace) -> int:
    from agent.commands import customers

    return customers.cmd_serve_registration(args)


def cmd_watch_subscriptions(args: argparse.Namespace) -> int:
    from agent.commands import customers

    return customers.cmd_watch_subscriptions(args)
