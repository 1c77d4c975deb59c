"""`metering-agent trial`: the seller's own config, end to end, against the built-in emulator.

Why: trusting what an agent bills means watching it bill whole hours of one's own config, and an
hour is too long to wait. The trial runs the unchanged `run` daemon as a child on an accelerated
clock shared with an in-process emulator (MeterUsage + IMDSv2 on a free loopback port), in a
temporary state dir, with dummy credentials: the real state dir and AWS are never touched. It then
prints what MeterUsage received per hour and dimension, and every refusal.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.clock import HOUR, Clock, hour_start, iso, iso_hour
from agent.commands.common import open_ledger_readonly
from agent.config import loader as config_mod
from agent.emulator.rules import Record, Settings
from agent.emulator.server import Emulator
from agent.errors import EX_OK, EX_SOFTWARE, AgentError, ConfigError
from agent.modes.choose import mode_for
from agent.modes.trials import InstanceTrial, Key, Refusal, TrialCustomer, TrialView
from agent.modes.trials import trial_customers as parse_customers
from agent.warnings import Warnings

LEAD = 3.0  # real seconds the daemon gets to start before the first hour begins
HOUR_GRACE = 15.0  # real seconds after a boundary to wait for the hour's records
STOP_TIMEOUT = 60.0
REGISTRATION = 5.0  # real seconds the customers' `customers add` get (and 1 s more each)

# Whatever the seller's shell holds, the trial signs only with dummy keys and asks only the
# emulator's IMDS; platform detection must not find a container either.
_SCRUBBED = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "ECS_CONTAINER_METADATA_URI_V4",
    "KUBERNETES_SERVICE_HOST",
    "METERING_AGENT_CONFIG",
    "HTTP_PROXY",  # the emulator is on loopback: a build host's proxy must not carry the calls
    "HTTPS_PROXY",
    "http_proxy",
    "https_proxy",
)
MAX_SPEED = 600.0  # at most; and a sampling interval must last 1/5 real second (see `speed_limit`)


@dataclass
class Outcome:
    records: list[Record]
    refusals: list[Refusal]
    exit_code: int | None  # the daemon's
    first_hour: int
    hours: int
    dimensions: list[str]
    work: Path  # the temporary state dir, config copy and the agent's log
    view: TrialView = field(default_factory=InstanceTrial)  # the mode's part (modes/trials.py)
    held: list[str] = field(default_factory=list)  # kept unsent in the trial's ledger


def trial_config(raw: Mapping[str, Any], state_dir: Path, endpoint: str) -> dict[str, Any]:
    """The seller's config with the trial's state dir and endpoint, sending at once; hooks are
    left out (a trial must not page anyone), and so is the metrics file."""
    data = dict(raw)
    data["state_dir"] = str(state_dir)
    metering = dict(data.get("metering") or {})
    metering["endpoint_url"] = endpoint
    metering["send_window"] = 0
    data["metering"] = metering
    data.pop("on_metering_failure", None)
    data.pop("on_recovery", None)
    data.pop("metrics", None)  # node_exporter would serve the trial's numbers as the machine's
    return data


def container_env(platform: str, url: str) -> dict[str, str]:
    """A config set to `platform: ecs` or `eks` runs its container path against the emulator:
    its ECS task metadata (the TaskARN names the task and the region), or a pod uid."""
    if platform == "ecs":
        return {"ECS_CONTAINER_METADATA_URI_V4": f"{url}/ecs/v4"}
    if platform == "eks":
        return {"POD_UID": "trial-pod-0000-0000-000000000000"}
    return {}


def child_env(imds_url: str, run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        AWS_ACCESS_KEY_ID="ASIATRIALDUMMYKEY000",
        AWS_SECRET_ACCESS_KEY="trial-dummy-secret-never-valid-at-aws",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=imds_url,
        AWS_EC2_METADATA_V1_DISABLED="true",
        METERING_AGENT_RUN_DIR=str(run_dir),
        NO_PROXY="127.0.0.1,localhost",
    )
    return env


def speed_limit(cfg: config_mod.Config) -> float:
    """The fastest clock that still bills as production would: a round fired up to 1/5 of a real
    second late must stay within a quarter interval of its instant (`daemon.snap`), and a send
    child's second of start-up must stay small beside the hour (and the 6 h window)."""
    return min(MAX_SPEED, 5.0 * min([cfg.interval, *(d.interval for d in cfg.dimensions)]))


def refusals(emulator: Emulator, view: TrialView) -> list[Refusal]:
    """What the service refused, grouped by hour, key and code (the mode says how to read its
    calls)."""
    return view.refusals(emulator.calls())


def run(
    cfg_path: Path,
    hours: int = 2,
    speed: float = 60.0,
    listing: list[str] | None = None,
    out: Any = None,
    customers: Sequence[TrialCustomer] = (),
) -> Outcome:
    """Run the trial; prints progress to `out` and returns what the emulator saw."""
    out = out or sys.stdout
    cfg = config_mod.load(cfg_path)  # ConfigError (78) before anything starts
    view = mode_for(cfg).trial(customers, cfg.source)  # customers in instance mode: 78
    if speed > speed_limit(cfg):
        raise AgentError(
            f"--speed {speed:g}: at most {speed_limit(cfg):g} for this config (5 x its shortest "
            f"interval, {MAX_SPEED:g} at most); faster, sampling rounds land off their instants"
        )
    raw = config_mod.read_yaml(cfg_path)
    region = cfg.metering.region if cfg.metering.region != "auto" else "us-east-1"
    work = Path(tempfile.mkdtemp(prefix="metering-agent-trial-"))
    wall = Clock()  # the real one: the trial's own waits are in real seconds
    now = wall.time()
    # The first trial hour begins LEAD real seconds (after the customers' registrations) from
    # now, so it is whole.
    lead = LEAD + (REGISTRATION + len(view.registrations()) if view.registrations() else 0)
    first_hour = hour_start(now) + HOUR
    clock = Clock(rate=speed, origin=first_hour - lead * speed, wall0=now)
    settings = Settings(region=region, product_codes={cfg.product_code})
    if listing:
        settings.dimensions = set(listing)
    if cfg.register_usage is not None:
        settings.public_key_version = cfg.register_usage.public_key_version
    emulator = Emulator(settings, clock)
    url = emulator.serve(0)
    data = trial_config(raw, work / "state", url)
    view.adapt(data)
    if cfg.register_usage is not None and cfg.register_usage.public_key:
        # RegisterUsage is answered by the emulator, signed with its own key, not the listing's
        key = work / "emulator-public-key.pem"
        key.write_bytes(emulator.public_key_pem())
        data["register_usage"] = {**data["register_usage"], "public_key": str(key)}
    cfg_copy = work / "config.yaml"
    cfg_copy.write_text(config_mod.dump_yaml(data))
    config_mod.load(cfg_copy)  # the overrides keep it valid
    log_path = work / "agent.log"
    env = {**child_env(url, work / "run"), **container_env(cfg.platform, url)}
    print(
        f"trial: {cfg_path}: {len(cfg.dimensions)} dimensions, {hours} h at {speed:g}x "
        f"(~{hours * HOUR / speed + lead:.0f} s); emulator on {url}, state in {work}",
        file=out,
        flush=True,
    )
    warns = Warnings(cfg.accepted_warnings, out)
    for kind, trap in config_mod.traps(cfg):  # what `check` warns of shows in the table, too
        warns.say(kind, trap)
    code: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    interrupted = False
    names = [d.name for d in cfg.dimensions]
    try:
        if view.registrations():  # as a seller would: a token, then `customers add`
            _register(emulator, view.registrations(), cfg_copy, env, log_path, out)
            if wall.time() > clock.to_wall(first_hour) - 1:
                raise AgentError(
                    f"registering {len(view.registrations())} customers took longer than the "
                    f"{lead:.0f} s before the first hour; try again on a less busy machine"
                )
        clock_args = ["--clock", clock.spec or ""]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "-c", str(cfg_copy), *clock_args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for i in range(hours):
            hour = first_hour + i * HOUR
            if not _wait_until(wall, clock.to_wall(hour), proc):
                break
            print(_start_line(i + 1, hours, hour, clock, wall), file=out, flush=True)
            if not _wait_hour(clock, wall, emulator, proc, hour, names, view):
                break
            print(_progress_line(i + 1, hours, hour, emulator, names, view), file=out, flush=True)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        else:
            code = proc.returncode
    except KeyboardInterrupt:  # Ctrl-C: nothing of the trial stays behind
        interrupted = True
        raise
    finally:
        if proc is not None and proc.poll() is None:  # first, so nothing writes in `work` after
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        emulator.stop()
        if interrupted:
            shutil.rmtree(work, ignore_errors=True)
    ledger = open_ledger_readonly(work / "state", "trial")
    try:
        held = view.held(ledger)
    finally:
        if ledger is not None:
            ledger.close()
    return Outcome(
        emulator.records(),
        refusals(emulator, view),
        code,
        first_hour,
        hours,
        names,
        work,
        view,
        held,
    )


def _register(
    emulator: Emulator,
    customers: Sequence[TrialCustomer],
    cfg_copy: Path,
    env: dict[str, str],
    log_path: Path,
    out: Any,
) -> None:
    """The emulator issues each buyer's registration token; `customers add --token - --as LABEL`
    stores the customer under its label through ResolveCustomer, as the seller would (all at
    once: each is a second of start-up)."""
    running = []
    for c in customers:
        token = emulator.issue_token(c.account, c.license, f"agmt-{c.label}")
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "customers", "add", "--token", "-", "--as", c.label,
             "-c", str(cfg_copy)],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        running.append((c, proc, token))
    failed = []
    for c, proc, token in running:
        try:
            stdout, stderr = proc.communicate(token + "\n", timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        with open(log_path, "a") as log:
            log.write(stdout + stderr)
        if proc.returncode != 0:
            failed.append(f"{c.label!r}: {(stderr.strip().splitlines() or ['no answer'])[-1]}")
        else:
            print(f"customer {c.label}: account {c.account}, registered", file=out)
    if failed:
        raise ConfigError("--customers", f"customer {failed[0]}")


def _wait_until(wall: Clock, at: float, proc: subprocess.Popen[bytes]) -> bool:
    """Until the real time `at`; False when the agent died first."""
    while wall.time() < at:
        if proc.poll() is not None:
            return False
        wall.sleep(min(0.1, max(at - wall.time(), 0.0)))
    return True


def _start_line(i: int, n: int, hour: int, clock: Clock, wall: Clock) -> str:
    """Said as trial hour `hour` begins: its real start and end, for a seller driving load."""
    start, end = wall.time(), clock.to_wall(hour + HOUR)
    return (
        f"trial hour {i}/{n} ({iso_hour(hour)} on the agent's clock) began at "
        f"{iso(start)} real time; it ends at {iso(end)} ({end - start:.0f} s)"
    )


def _wait_hour(
    clock: Clock,
    wall: Clock,
    emulator: Emulator,
    proc: subprocess.Popen[bytes],
    hour: int,
    names: list[str],
    view: TrialView = InstanceTrial(),  # noqa: B008 (stateless)
) -> bool:
    """Until `hour` has a record or a refusal for every key it should (every dimension; in SaaS
    mode every customer's, see modes/trials.py), or a grace after its end; False when the agent
    died."""
    end_wall = clock.to_wall(hour + HOUR)
    while True:
        if proc.poll() is not None:
            return False
        if wall.time() >= end_wall:
            done = _got(emulator, hour, view)
            if view.expected(names, done) <= done and {k[-1] for k in done} >= set(names):
                return True
            if wall.time() >= end_wall + HOUR_GRACE:
                return True
        wall.sleep(0.1)


def _got(emulator: Emulator, hour: int, view: TrialView) -> set[Key]:
    done = {view.key(r) for r in emulator.records() if r.hour == hour}
    return done | {f.key for f in refusals(emulator, view) if f.hour == hour and f.key}


def _progress_line(
    i: int, n: int, hour: int, emulator: Emulator, names: list[str], view: TrialView
) -> str:
    """Each dimension's quantity (SaaS mode: its records' count and total)."""
    got: dict[str, list[Record]] = {}
    for r in emulator.records():
        if r.hour == hour:
            got.setdefault(r.dimension, []).append(r)
    refused = {f.key[-1]: f.code for f in refusals(emulator, view) if f.hour == hour and f.key}
    parts = []
    for name in names:
        mine = got.get(name, [])
        if len(view.key_names) == 1 and mine:
            parts.append(f"{name} {mine[0].quantity_text}")
        elif mine:
            total = format(sum((r.quantity for r in mine), Decimal(0)).normalize(), "f")
            parts.append(f"{name} {total} ({len(mine)} customers)")
        elif name in refused:
            parts.append(f"{name} refused ({refused[name]})")
        else:
            parts.append(f"{name} -")
    return f"hour {i}/{n} {iso_hour(hour)}: " + ", ".join(parts)


def render(outcome: Outcome) -> str:
    """What the service received, hour by hour and key (dimension; SaaS mode: customer and
    dimension), then the refusals."""
    view = outcome.view
    width = len(view.key_names)
    rows = [("hour", *view.key_names, "quantity", "allocations", "")]
    last = outcome.first_hour + outcome.hours * HOUR
    for r in sorted(outcome.records, key=lambda r: (r.hour, view.key(r))):
        note = ""
        if r.hour < outcome.first_hour:
            note = "partial: the agent started in it"
        elif r.hour >= last:
            note = "partial: the trial stopped the agent in it (a stop seals and sends)"
        rows.append((iso_hour(r.hour), *view.key(r), r.quantity_text, _allocations(r), note))
    with_alloc = any(r.allocations for r in outcome.records)
    lines = [f"{view.operation} received:"]
    if len(rows) == 1:
        lines.append("  nothing")
    else:
        shown = width + 2  # hour, the key, quantity
        widths = [max(len(row[c]) for row in rows) for c in range(shown + 1)]
        for row in rows:
            cells = [row[c].ljust(widths[c]) for c in range(shown)]
            if with_alloc:
                cells.append(row[shown].ljust(widths[shown]))
            lines.append(("  " + "  ".join(cells) + "  " + row[-1]).rstrip())
    if outcome.refusals:
        lines.append("refused:")
        for f in outcome.refusals:
            when = iso_hour(f.hour) if f.hour is not None else "-"
            lines.append(f"  {when}  {f.what}  {f.code}  x{f.count}")
    if outcome.held:
        lines.append("held, not sent:")
        lines.extend(f"  {line}" for line in outcome.held)
    return "\n".join(lines)


def _allocations(r: Record) -> str:
    if not r.allocations:
        return "-"
    parts = []
    for a in r.allocations:
        tags = ",".join(f"{t['Key']}={t['Value']}" for t in a.get("Tags") or []) or "untagged"
        qty = a.get("AllocatedUsageQuantityAsDecimal", a.get("AllocatedUsageQuantity"))
        parts.append(f"{tags}:{qty}")
    return " ".join(parts)


def main(
    cfg_path: Path,
    hours: int,
    speed: float,
    dimensions: str | None,
    out: Any = None,
    customers: str | None = None,
) -> int:
    """The `trial` command: 0 when every hour went through, 1 on any refusal or failure."""
    out = out or sys.stdout
    if not 1 <= hours <= 48:
        raise AgentError(f"--hours {hours}: expected 1 to 48")
    if not speed >= 1:
        raise AgentError(f"--speed {speed:g}: expected 1 or more (60: an hour in a minute)")
    listing = [d.strip() for d in dimensions.split(",") if d.strip()] if dimensions else None
    outcome = run(cfg_path, hours, speed, listing, out, customer_list(customers))
    print(render(outcome), file=out, flush=True)
    problems = []
    if outcome.exit_code != 0:
        problems.append(f"the agent exited {outcome.exit_code}")
    if outcome.refusals:
        problems.append(f"{outcome.view.operation} refused requests (see above)")
    view = outcome.view
    for h in range(outcome.first_hour, outcome.first_hour + outcome.hours * HOUR, HOUR):
        got = {view.key(r) for r in outcome.records if r.hour == h}
        got |= {f.key for f in outcome.refusals if f.hour == h and f.key}
        missing = [d for d in outcome.dimensions if d not in {k[-1] for k in got}]
        missing += [" ".join(k) for k in sorted(view.expected(outcome.dimensions, got) - got)
                    if k[-1] not in missing]  # fmt: skip
        if missing:  # no samples: a collector that failed, or a source that was never there
            problems.append(f"nothing received for {iso_hour(h)} {', '.join(missing)}")
    if not problems:
        shutil.rmtree(outcome.work, ignore_errors=True)
        return EX_OK
    log_path = outcome.work / "agent.log"
    for problem in problems:
        print(f"trial: {problem}", file=out)
    print(f"trial: the agent's log ({log_path}) ends:", file=out)
    for line in log_path.read_text(errors="replace").splitlines()[-15:]:
        print(f"  {line}", file=out)
    return EX_SOFTWARE


def customer_list(value: str | None) -> list[TrialCustomer]:
    """`--customers`: a file that exists (a customer a line, `#` comments), else the customers
    themselves, comma-separated; each `LABEL`, `LABEL=ACCOUNT_ID` or `ACCOUNT_ID`."""
    if not value:
        return []
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError("--customers", f"{path}: cannot be read: {e}") from None
        specs = [line.split("#", 1)[0].strip() for line in text.splitlines()]
        where = f"{path}: "
    else:
        specs = value.split(",")
        where = ""
    try:
        return parse_customers([s for s in specs if s.strip()])
    except ValueError as e:
        raise ConfigError("--customers", f"{where}{e}") from None


def cmd_trial(args: argparse.Namespace) -> int:
    return main(
        config_mod.resolve_path(args.config),
        args.hours,
        args.speed,
        args.dimensions,
        customers=args.customers,
    )
