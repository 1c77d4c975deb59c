"""`emulator`: the local MeterUsage + IMDSv2 emulator on 127.0.0.1, for a seller's offline tests."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from agent.commands.common import load_config, make_clock
from agent.errors import EX_OK, Unavailable


def cmd_emulator(args: argparse.Namespace) -> int:
    from agent.emulator.rules import Settings
    from agent.emulator.server import Emulator
    from agent.host.imds import IMDS_ENV

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
