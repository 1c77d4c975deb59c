#!/usr/bin/env bash
# A full billing hour in under a minute, against the built-in emulator: no AWS account needed.
#
# The emulator plays both AWS sides a real instance talks to: IMDSv2 (region, instance id, role
# credentials) and the Marketplace Metering Service. The agent runs unchanged (check, sample, run,
# status); only its clock is shared with the emulator and sped up 60x, starting 30 minutes before
# an hour boundary, so the hour is sealed and sent after about 30 seconds.
set -euo pipefail

command -v metering-agent >/dev/null || { echo "metering-agent is not on PATH" >&2; exit 1; }
port=${DEMO_PORT:-8787}
work=$(mktemp -d -t metering-agent-demo.XXXXXX)
# shellcheck disable=SC2317  # called by the trap
cleanup() { kill "${run_pid:-}" "${emu_pid:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT

clock=$(python3 -c 'import time; t = time.time(); print(f"60:{t - t % 3600 + 1800}:{t}")')

cat >"$work/config.yaml" <<YAML
product_code: abcd1234efgh5678ijkl90mn
state_dir: $work/state
metering:
  endpoint_url: http://127.0.0.1:$port   # the emulator; on EC2 leave this out
  send_window: 0                          # send right at the hour (default: spread over one)
sampling:
  interval: 60
dimensions:
  - name: vcpus
    collector: {type: system, metric: cpu_count}
    aggregate: max
  - name: vcpu_hours
    collector: {type: system, metric: cpu_count}
    aggregate: integral
    decimals: 3
  - name: memory_gib
    collector: {type: system, metric: memory_total_gib}
    decimals: 2
YAML

# Only the emulator's instance role signs: ignore whatever credentials this machine has.
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE AWS_REGION AWS_DEFAULT_REGION
export AWS_SHARED_CREDENTIALS_FILE=/dev/null AWS_CONFIG_FILE=/dev/null
export AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:$port

echo "== metering-agent emulator (MeterUsage + IMDSv2 on 127.0.0.1:$port)"
metering-agent emulator -c "$work/config.yaml" --port "$port" --clock "$clock" &
emu_pid=$!
for _ in $(seq 50); do
  python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && break
  sleep 0.1
done

echo; echo "== metering-agent check"
metering-agent check -c "$work/config.yaml" --clock "$clock"

echo; echo "== metering-agent sample"
metering-agent sample -c "$work/config.yaml"

echo; echo "== metering-agent run (60x clock: the hour ends in ~30 s, then it is sealed and sent)"
metering-agent run -c "$work/config.yaml" --clock "$clock" &
run_pid=$!
sleep "${DEMO_SECONDS:-40}"
echo; echo "== SIGTERM: the agent seals the partial hour and sends it before exiting"
kill -TERM "$run_pid"
wait "$run_pid"
run_pid=

echo; echo "== metering-agent status"
metering-agent status -c "$work/config.yaml"
echo
echo "health file ($work/state/health.json):"
cat "$work/state/health.json"
echo
echo "== next: your own config, a couple of whole hours in two minutes (no AWS account needed):"
echo "   metering-agent trial -c my-config.yaml --dimensions <the listing's dimension names>"
