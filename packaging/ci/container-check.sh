#!/usr/bin/env bash
# The sidecar image, built and run without any registry: packaging/container/build.sh
# --debootstrap (the script sellers use: a Debian 12 base made with debootstrap and `podman
# import`, the image built in the Docker format), then run with podman beside the emulator on the host's
# 127.0.0.1, sharing its accelerated clock (an agent hour passes in a real minute). Checks:
#   the image is at most 150 MB and keeps its HEALTHCHECK; it runs as uid 10001 and holds no
#   pip, setuptools or apt lists; a hour of log lines
#   the script writes into the mounted log folder is sealed at the boundary and accepted once with
#   exactly the lines on disk for that hour; the HEALTHCHECK (`status --check`) passes; `podman
#   stop` (SIGTERM) seals the open hour and sends it at once, with the lines on disk for it, and
#   the container exits 0; `check` in the image against the emulator exits 0 and names the
#   platform; the image's size is printed.
# Platform: METERING_AGENT_CI_PLATFORM=ecs runs the container as an ECS task sees itself (task
# metadata v4 and container credentials from the emulator, no AWS_REGION, IMDS on a closed port:
# the region must come from the TaskARN); =ec2 uses the emulator as IMDS instead.
# Usage, as root: packaging/ci/container-check.sh [BUILD-CONTEXT] (default: the repository)
# The debootstrapped base is cached as a tarball in $METERING_AGENT_CI_CACHE
# (/var/cache/metering-agent-ci); without it, it is made from scratch (about 100 s). The test
# container, its volume and the temporary files are removed on exit; the images are kept.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
context=$(realpath "${1:-$repo}")
py=$repo/.venv/bin/python # the host's agent, for the emulator (.ci/run made the venv)
mode=${METERING_AGENT_CI_PLATFORM:-ecs}
cache=${METERING_AGENT_CI_CACHE:-/var/cache/metering-agent-ci}
image=localhost/metering-agent:ci
name=ma-container-ci-$$
region=eu-central-1 # not botocore's default: the agent must find it (TaskARN, or IMDS on ec2)
work=$(mktemp -d /var/tmp/metering-agent-container-ci.XXXXXX)
rate=60 # agent seconds per real second: an hour in a minute
emulator_pid= writer_pid=
SECONDS=0

say() { printf '[container-check %3ds] %s\n' "$SECONDS" "$*"; }

fail() {
    echo "container-check FAILED: $*" >&2
    if podman container exists "$name" 2>/dev/null; then
        podman logs --tail 40 "$name" >&2 || true
    fi
    [ ! -s "$work/emulator.log" ] || tail -20 "$work/emulator.log" >&2
    exit 1
}

cleanup() {
    set +e
    podman rm -f -v -t 0 "$name" >/dev/null 2>&1
    for pid in $writer_pid $emulator_pid; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

case $mode in ecs | ec2) ;; *) fail "METERING_AGENT_CI_PLATFORM=$mode: expected ecs or ec2" ;; esac
[ -f "$context/packaging/container/Containerfile" ] || fail "$context has no packaging/container/Containerfile"

# -- tools ---------------------------------------------------------------------------------------

missing=
for tool in podman:podman runc:runc newuidmap:uidmap debootstrap:debootstrap skopeo:skopeo; do
    command -v "${tool%%:*}" >/dev/null || missing="$missing ${tool##*:}"
done
if [ -n "$missing" ]; then
    say "installing$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

# -- build: the sellers' script, on a debootstrapped base (no registry here) ----------------------

# build.sh keeps the base's tarball in the cache, and writes the containers.conf this host's podman
# needs there (runc on hybrid cgroups, explicit open-files limits): the runs below use it too.
export METERING_AGENT_BUILD_CACHE=$cache
t0=$SECONDS
"$context/packaging/container/build.sh" --debootstrap --tag "$image" | tee "$work/build.log" ||
    fail "packaging/container/build.sh"
t_build=$((SECONDS - t0))
if [ -z "${CONTAINERS_CONF:-}" ] && [ -f "$cache/containers.conf" ]; then
    export CONTAINERS_CONF=$cache/containers.conf
fi
size=$(podman image inspect --format '{{.Size}}' "$image")
[ "$size" -le 150000000 ] || fail "image $image is $((size / 1000000)) MB, over 150 MB"
# the HEALTHCHECK survives only in the Docker format (build.sh checks it too)
podman image inspect --format '{{json .Config.Healthcheck}}' "$image" | grep -q '"status","--check"' ||
    fail "image $image has no HEALTHCHECK"
say "built $image in ${t_build} s: $((size / 1000000)) MB, HEALTHCHECK kept"

user=$(podman image inspect --format '{{.Config.User}}' "$image")
[ "$user" = "10001:10001" ] || fail "image user is '$user', expected 10001:10001"
podman run --rm --entrypoint /bin/sh "$image" -c '
    set -e
    test "$(id -u)" = 10001
    test -w /var/lib/metering-agent
    ! ls -d /usr/lib/metering-agent/lib/python3*/site-packages/pip /usr/lib/metering-agent/bin/pip* 2>/dev/null
    ! ls -d /usr/lib/metering-agent/lib/python3*/site-packages/setuptools 2>/dev/null
    test -z "$(ls -A /var/lib/apt/lists 2>/dev/null)"
    test -z "$(ls /var/cache/apt/archives/*.deb 2>/dev/null)"
    ! command -v gcc pip pip3 >/dev/null
    metering-agent --version >/dev/null' 2>"$work/inside.log" ||
    { cat "$work/inside.log"; fail "image contents (uid, pip/setuptools, apt lists, build tools)"; }
say "image: uid 10001, no pip/setuptools/apt lists/compilers"

# -- host side: the emulator on the shared clock and a product log -------------------------------

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
eport=$(free_port)
closed=$(free_port) # nothing listens here: IMDS out of reach, as on Fargate
wall0=$(date +%s)
origin=$(( (wall0 / 3600) * 3600 + 120 )) # the agent starts at HH:02
clock="$rate:$origin:$wall0"
hour0=$(( origin - 120 ))
hour1=$(( hour0 + 3600 ))
iso_hour() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
wait_agent() { python3 -c "import time; time.sleep(max(0.0, $wall0 + ($1 - $origin) / $rate - time.time()))"; }

"$py" -m agent emulator --port "$eport" --region "$region" --clock "$clock" --any-product \
    >"$work/emulator.log" 2>&1 &
emulator_pid=$!
records() { # "DIMENSION HOUR QUANTITY" per record the emulator accepted
    python3 - "$eport" <<'EOF'
import json, sys, urllib.request
for r in json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/_emulator/records")):
    print(r["UsageDimension"], r["Hour"], r["Quantity"])
EOF
}
for _ in $(seq 100); do records >/dev/null 2>&1 && break; sleep 0.1; done
records >/dev/null 2>&1 || fail "the emulator did not start"

logdir=$work/log
mkdir -p "$logdir"
chmod 0755 "$work" "$logdir"
cat >"$work/config.yaml" <<EOF
product_code: abcd1234efgh5678ijkl90mn
metering: {endpoint_url: "http://127.0.0.1:$eport", send_window: 0}
sampling: {interval: 60}
dimensions:
  - name: requests
    collector: {type: log, path: /var/log/product/access.log, pattern: ' GET /api/', start_at: beginning}
EOF
chmod 0644 "$work/config.yaml"

# Lines stamped with the agent clock's time: the oracle is what is on disk for each hour.
write_lines() { # from agent time $1 to $2, a line every 0.2-0.5 real s, 1 in 5 not billable
    python3 - "$logdir/access.log" "$1" "$2" "$clock" <<'EOF' &
import random, sys, time
path, start, end, (rate, origin, wall0) = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), map(float, sys.argv[4].split(":"))
now = lambda: origin + (time.time() - wall0) * rate
time.sleep(max(0.0, (start - now()) / rate))
with open(path, "a") as f:
    while now() < end:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now()))
        f.write(f"{stamp} {random.choice(['GET /api/items', 'GET /api/users', 'GET /health', 'GET /api/x', 'GET /api/y'])} 200\n")
        f.flush()
        time.sleep(random.uniform(0.2, 0.5))
EOF
    writer_pid=$!
}
on_disk() { grep -c "^$(date -u -d "@$1" +%Y-%m-%dT%H:)[^ ]* GET /api/" "$logdir/access.log" || true; }

platform_env=()
if [ "$mode" = ecs ]; then
    platform_env=(
        -e "ECS_CONTAINER_METADATA_URI_V4=http://127.0.0.1:$eport/ecs/v4"
        -e "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:$eport/ecs/credentials"
        -e "AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:$closed"
    )
else
    platform_env=(-e "AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:$eport")
fi
# A read-only root, as packaging/kubernetes sets it (podman puts tmpfs on /run, /tmp, /var/tmp).
run_args=(--network host --read-only -v "$work/config.yaml:/etc/metering-agent/config.yaml:ro"
    -v "$logdir:/var/log/product:ro" "${platform_env[@]}")

# -- run: an hour sealed and accepted with the lines on disk ------------------------------------

touch "$logdir/access.log" && chmod 0644 "$logdir/access.log" # the product's log, empty so far
# Without systemd on the host podman cannot time the HEALTHCHECK: it is run by hand below.
podman run -d --name "$name" --health-interval disable "${run_args[@]}" "$image" run --clock "$clock" >/dev/null \
    2>"$work/podman-run.log" || { cat "$work/podman-run.log"; fail "podman run"; }
t_start=$SECONDS
for _ in $(seq 100); do
    [ -n "$(podman exec "$name" sh -c 'ls /var/lib/metering-agent/ledger.db 2>/dev/null')" ] && break
    [ "$(podman inspect --format '{{.State.Running}}' "$name")" = true ] || fail "the agent exited at start"
    sleep 0.2
done
say "agent running in the container ($mode mode), ledger made in $((SECONDS - t_start)) s"

write_lines $((hour0 + 600)) $((hour0 + 3000)) # HH:10 to HH:50
wait "$writer_pid"
writer_pid=
if podman healthcheck run "$name" >/dev/null 2>"$work/health.log"; then
    say "HEALTHCHECK (status --check): healthy"
else
    cat "$work/health.log" >&2; fail "HEALTHCHECK status --check: unhealthy"
fi
want0=$(on_disk "$hour0")
[ "$want0" -gt 0 ] || fail "no lines written in hour $(iso_hour "$hour0")"
got=
for _ in $(seq 150); do # sealed at the boundary and sent at once (send_window 0)
    got=$(records | grep "^requests $(iso_hour "$hour0") " || true)
    [ -z "$got" ] || break
    sleep 0.2
done
sleep 2 # a second record for the hour would show now
got=$(records | grep "^requests $(iso_hour "$hour0") " || true)
[ "$got" = "requests $(iso_hour "$hour0") $want0" ] ||
    fail "hour $(iso_hour "$hour0"): expected one record of $want0 (lines on disk), got: ${got:-none}"
say "hour $(iso_hour "$hour0") sealed and accepted once: $want0 lines (= on disk)"

# -- stop: SIGTERM seals the open hour and sends it ---------------------------------------------

write_lines $((hour1 + 300)) $((hour1 + 1500)) # HH+1:05 to HH+1:25
wait "$writer_pid"
writer_pid=
wait_agent $((hour1 + 1800))
t0=$SECONDS
podman stop -t 30 "$name" >/dev/null 2>>"$work/podman-run.log" || fail "podman stop"
t_stop=$((SECONDS - t0))
code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
[ "$code" = 0 ] || fail "the agent exited $code on SIGTERM, expected 0"
want1=$(on_disk "$hour1")
got=$(records | grep "^requests $(iso_hour "$hour1") " || true)
[ "$got" = "requests $(iso_hour "$hour1") $want1" ] ||
    fail "podman stop at HH+1:30: expected hour $(iso_hour "$hour1") sent at once with $want1, got: ${got:-none}"
say "podman stop at HH+1:30: exit 0 in ${t_stop} s, hour $(iso_hour "$hour1") sealed and sent: $want1 lines (= on disk)"
n=$(records | wc -l)
[ "$n" = 2 ] || { records >&2; fail "expected 2 records in all, got $n"; }
podman rm -v "$name" >/dev/null 2>>"$work/podman-run.log"

# -- check inside the image ---------------------------------------------------------------------

out=$(podman run --rm --no-healthcheck "${run_args[@]}" "$image" check --clock "$clock" 2>&1) ||
    { echo "$out"; fail "check in the image exited non-zero"; }
echo "$out" | sed 's/^/    /'
if [ "$mode" = ecs ]; then # (on ec2, check has long said nothing of platforms)
    grep -qw ecs <<<"$out" || fail "check did not name the platform ecs"
    grep -q container-role <<<"$out" || fail "check did not sign with the task role (container-role)"
    say "check in the image: exit 0, names ecs, task role credentials"
else
    say "check in the image: exit 0"
fi

# -- size ----------------------------------------------------------------------------------------

podman save -q --format oci-archive -o "$work/image.tar" "$image" >/dev/null
archive=$(stat -c %s "$work/image.tar")
skopeo inspect "oci-archive:$work/image.tar" >/dev/null || fail "skopeo cannot read the oci-archive"
say "records the emulator accepted:"
records | sed 's/^/    /'
say "image $image: $((size / 1000000)) MB in storage, oci-archive $((archive / 1000000)) MB"
say "all container checks passed in ${SECONDS} s ($mode mode; build ${t_build} s, stop ${t_stop} s)"
