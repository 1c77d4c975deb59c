#!/usr/bin/env bash
# The .deb under a live systemd: boots Debian 12 with systemd as PID 1 in systemd-nspawn (the
# recipe in the project notes), installs the package built earlier in CI, points it at the
# emulator on the host's 127.0.0.1 with the accelerated clock (an hour passes in a minute), and
# checks the life cycle a buyer's instance goes through:
#   not started at install; active within 20 s; a bad `systemctl reload` keeps it running;
#   `systemctl restart` mid-hour keeps the hour (one record with the whole hour's max); a power-off
#   mid-hour seals and sends that hour at once; it starts again at boot; an upgrade to a rebuilt
#   higher version restarts it onto the new version; an upgrade of a stopped agent leaves it
#   stopped; `apt-get remove` stops it; purge cleans up; the live `systemd-analyze security`
#   exposure is <= 2.0.
# Usage, as root: packaging/ci/systemd-check.sh path/to/metering-agent_X_amd64.deb
# The debootstrap root is cached in $METERING_AGENT_CI_CACHE (/var/cache/metering-agent-ci);
# without it, it is made from scratch (about 2 minutes). Everything else is torn down on exit.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
deb=$(realpath "$1")
py=$repo/.venv/bin/python # the host's agent, for the emulator (.ci/run made the venv)
cache=${METERING_AGENT_CI_CACHE:-/var/cache/metering-agent-ci}
base=$cache/bookworm-1 # bump the suffix when the package list below changes
packages=systemd,systemd-sysv,dbus,procps,iproute2,adduser,python3,python3-venv,ca-certificates,libyaml-0-2
name=ma-ci-$$
work=$(mktemp -d /var/tmp/metering-agent-ci.XXXXXX)
root=$work/root
rate=60 # agent seconds per real second: an hour in a minute
nspawn_pid= cpid= emulator_pid= gauge_pid= build_pid= sleeper=
SECONDS=0

say() { printf '[systemd-check %3ds] %s\n' "$SECONDS" "$*"; }

in_box() { nsenter -t "$cpid" -m -u -i -n -p -C -r -w env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

fail() {
    echo "systemd-check FAILED: $*" >&2
    if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null; then
        in_box systemctl status --no-pager metering-agent.service >&2 || true
        in_box journalctl --no-pager -n 60 -u metering-agent.service >&2 || true
    fi
    exit 1
}

cgroup_hierarchies() {
    local h found=
    for h in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified; do
        if [ -d "$h" ]; then echo "$h"; found=1; fi
    done
    [ -n "$found" ] || echo /sys/fs/cgroup
}

clear_cgroups() {
    local h
    for h in $(cgroup_hierarchies); do
        if [ -d "$h/nspawn-$name" ]; then
            find "$h/nspawn-$name" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        fi
    done
}

power_off() {
    [ -n "$nspawn_pid" ] || return 0
    if kill -0 "$nspawn_pid" 2>/dev/null; then
        in_box systemctl poweroff 2>/dev/null || kill "$nspawn_pid" 2>/dev/null || true
        for _ in $(seq 300); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$nspawn_pid" 2>/dev/null || true
    fi
    wait "$nspawn_pid" 2>/dev/null || true
    nspawn_pid= cpid=
}

cleanup() {
    set +e
    power_off
    [ -z "$build_pid" ] || kill -- -"$build_pid" 2>/dev/null # its own process group (set -m)
    for pid in $sleeper $emulator_pid $gauge_pid $build_pid; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    clear_cgroups
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# -- the root ----------------------------------------------------------------------------------

for tool in systemd-nspawn:systemd-container debootstrap:debootstrap nsenter:util-linux; do
    if ! command -v "${tool%%:*}" >/dev/null; then
        apt-get update -qq && apt-get install -y -qq "${tool##*:}" >/dev/null
    fi
done
if [ ! -e "$base/.complete" ]; then
    say "no cached root in $base: debootstrap (once per machine)"
    mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    mkdir -p "$cache"
    rm -rf "$base.tmp"
    debootstrap --variant=minbase --include="$packages" bookworm "$base.tmp" \
        "${mirror:-http://deb.debian.org/debian}" >"$work/debootstrap.log" 2>&1 ||
        { tail -20 "$work/debootstrap.log"; fail "debootstrap"; }
    rm -f "$base.tmp"/var/cache/apt/archives/*.deb # smaller to copy each run
    touch "$base.tmp/.complete"
    mv "$base.tmp" "$base"
fi
cp -a "$base" "$root"
cp /etc/resolv.conf "$root/etc/"
say "root ready ($(du -sh "$root" | cut -f1))"

# -- the upgrade's package: a copy of the tree with a higher version, built meanwhile -----------

v1=$(dpkg-deb -f "$deb" Version)
v2="$v1+ci1"
set -m # the build gets a process group of its own, so a teardown stops all of it
(
    src=$work/src/metering-agent
    mkdir -p "$src"
    if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$repo" ls-files -co --exclude-standard -z | tar -C "$repo" --null -T - -c
    else
        tar -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./debian/metering-agent \
            --exclude=./debian/.debhelper -c .
    fi | tar -C "$src" -x
    cd "$src"
    { printf 'metering-agent (%s) bookworm; urgency=medium\n\n  * CI: the upgrade under a live systemd.\n\n' "$v2"
      printf ' -- metering-agent CI <ci@example.com>  %s\n\n' "$(date -R)"
      cat debian/changelog; } >debian/changelog.new
    mv debian/changelog.new debian/changelog
    sed -i "s/^__version__ = .*/__version__ = \"$v2\"/" agent/__init__.py
    dpkg-buildpackage -us -uc -b >"$work/build-v2.log" 2>&1
) &
build_pid=$!
set +m

# -- host side: emulator and a gauge the test controls ------------------------------------------

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
eport=$(free_port)
gport=$(free_port)
mkdir -p "$work/www"
echo 5 >"$work/www/gauge"
python3 -m http.server --bind 127.0.0.1 --directory "$work/www" "$gport" >/dev/null 2>&1 &
gauge_pid=$!

records() { # "DIMENSION HOUR QUANTITY" per record the emulator accepted
    python3 - "$eport" <<'EOF'
import json, sys, urllib.request
for r in json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/_emulator/records")):
    print(r["UsageDimension"], r["Hour"], r["Quantity"])
EOF
}

# -- boot ----------------------------------------------------------------------------------------

boot() {
    clear_cgroups
    local h
    for h in $(cgroup_hierarchies); do mkdir -p "$h/nspawn-$name"; done
    # nspawn in a cgroup of its own (the host has no systemd to make a scope for it).
    bash -c 'for h in "$@"; do echo $$ >"$h/cgroup.procs"; done
        exec systemd-nspawn -D "'"$root"'" --boot --register=no --keep-unit -M "'"$name"'" \
            --console=passive' _ $(for h in $(cgroup_hierarchies); do echo "$h/nspawn-$name"; done) \
        >>"$work/console.log" 2>&1 &
    nspawn_pid=$!
    cpid=
    for _ in $(seq 100); do
        cpid=$(pgrep -P "$nspawn_pid" | head -1) && [ -n "$cpid" ] && break
        sleep 0.1
    done
    [ -n "$cpid" ] || { cat "$work/console.log"; fail "systemd-nspawn did not start"; }
    local state=
    for _ in $(seq 300); do
        state=$(in_box systemctl is-system-running 2>/dev/null) || true
        case $state in running | degraded) break ;; esac
        sleep 0.2
    done
    case $state in running | degraded) ;; *) fail "container did not boot (state: $state)" ;; esac
}

wait_active() { # seconds until active, or fail after $1 s
    local start
    start=$(date +%s.%N)
    for _ in $(seq $(($1 * 10))); do
        if [ "$(in_box systemctl is-active metering-agent.service)" = active ]; then
            python3 -c "import time; print(f'{time.time() - $start:.1f}')"
            return 0
        fi
        sleep 0.1
    done
    fail "metering-agent not active within $1 s"
}

main_pid() { in_box systemctl show -p MainPID --value metering-agent.service; }

boot
say "booted: systemd $(in_box systemctl --version | head -1 | cut -d' ' -f2), $(in_box systemctl is-system-running)"

# -- install -------------------------------------------------------------------------------------

cp "$deb" "$root/var/tmp/v1.deb"
in_box apt-get install -y -qq /var/tmp/v1.deb >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "install"; }
[ "$(in_box systemctl is-enabled metering-agent.service)" = enabled ] || fail "not enabled at install"
[ "$(in_box systemctl is-active metering-agent.service)" = inactive ] ||
    fail "started at install (it must start on the buyer's first boot only)"
say "installed $v1: enabled, not started"

cat >"$root/etc/metering-agent-ci.yaml" <<EOF
product_code: abcd1234efgh5678ijkl90mn
metering: {endpoint_url: "http://127.0.0.1:$eport", region: us-east-1, send_window: 0}
sampling: {interval: 60}
dimensions:
  - name: gauge
    collector: {type: http, url: "http://127.0.0.1:$gport/gauge", format: text, query: "([0-9]+)"}
    aggregate: max
EOF
mkdir -p "$root/etc/systemd/system/metering-agent.service.d"
# Agent clock: t = origin + (wall - wall0) * rate; the emulator shares it.
wall0=$(date +%s)
origin=$(( (wall0 / 3600) * 3600 + 300 )) # the agent starts at HH:05
clock="$rate:$origin:$wall0"
hour0=$(( origin - 300 ))
wait_agent() { # sleep until the agent clock reads $1 (in the background: a signal ends it)
    python3 -c "import time; time.sleep(max(0.0, $wall0 + ($1 - $origin) / $rate - time.time()))" &
    sleeper=$!
    wait "$sleeper"
    sleeper=
}
iso_hour() { date -u -d "@$1" +%Y-%m-%dT%H:%M:%SZ; }
agent_now() { python3 -c "import time; print(int($origin + (time.time() - $wall0) * $rate))"; }

"$py" -m agent emulator --port "$eport" --clock "$clock" --any-product >"$work/emulator.log" 2>&1 &
emulator_pid=$!
for _ in $(seq 50); do records >/dev/null 2>&1 && break; sleep 0.1; done

cat >"$root/etc/systemd/system/metering-agent.service.d/ci.conf" <<EOF
[Service]
Environment=METERING_AGENT_CONFIG=/etc/metering-agent-ci.yaml
Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:$eport
ExecStart=
ExecStart=/usr/bin/metering-agent run --clock $clock
EOF
in_box systemctl daemon-reload
in_box systemctl start --no-block metering-agent.service
t_active=$(wait_active 20)
say "active in ${t_active} s"

# -- live exposure -------------------------------------------------------------------------------

score=$(in_box systemd-analyze security metering-agent.service |
    sed -n 's/.*Overall exposure level for .*: \([0-9.]*\).*/\1/p')
say "live systemd-analyze security exposure: $score"
awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 2.0) }' || fail "exposure $score > 2.0"

# -- reload: a bad config is refused and the agent keeps running --------------------------------

pid=$(main_pid)
cp "$root/etc/metering-agent-ci.yaml" "$work/good.yaml"
echo "dimensions: [" >"$root/etc/metering-agent-ci.yaml"
if in_box systemctl reload metering-agent.service 2>/dev/null; then fail "a bad config reloaded"; fi
cp "$work/good.yaml" "$root/etc/metering-agent-ci.yaml"
in_box systemctl reload metering-agent.service || fail "a good config did not reload"
[ "$(main_pid)" = "$pid" ] && [ "$(in_box systemctl is-active metering-agent.service)" = active ] ||
    fail "reload stopped the agent"
say "reload: bad config refused, good one taken, same process"

# -- restart mid-hour keeps the hour ------------------------------------------------------------

wait_agent $((hour0 + 1500)) # HH:25
in_box systemctl restart metering-agent.service || fail "restart"
[ "$(main_pid)" != "$pid" ] || fail "restart kept the old process"
echo 9 >"$work/www/gauge" # the hour's max comes after the restart
say "restarted at agent $(iso_hour $(( origin + (($(date +%s) - wall0) * rate) ))); gauge 5 -> 9"
wait_agent $((hour0 + 3000))
echo 3 >"$work/www/gauge" # for the next hour (this one's max stays 9)
wait_agent $((hour0 + 3600 + 600)) # sealed at the boundary, sent at once (send_window 0)
got=$(records | grep "^gauge $(iso_hour "$hour0") " || true)
[ "$got" = "gauge $(iso_hour "$hour0") 9" ] ||
    fail "hour $(iso_hour "$hour0"): expected one record with the hour's max 9, got: ${got:-none}"
say "hour $(iso_hour "$hour0") accepted once with 9 (5 before the restart, 9 after)"

# -- power-off mid-hour seals and sends at once; boot starts it again ----------------------------

wait_agent $((hour0 + 3600 + 1200)) # HH+1:20
power_off
hour1=$((hour0 + 3600))
got=$(records | grep "^gauge $(iso_hour "$hour1") " || true)
[ "$got" = "gauge $(iso_hour "$hour1") 3" ] ||
    fail "power-off did not seal and send hour $(iso_hour "$hour1"): ${got:-none}"
say "power-off at HH+1:20: hour $(iso_hour "$hour1") sealed and sent at once (3)"
boot
t_boot=$(wait_active 30)
say "booted again: active ${t_boot} s after the container was up"

# -- upgrade: running -> restarted on the new version; stopped -> stays stopped -----------------

wait "$build_pid" || { tail -30 "$work/build-v2.log"; fail "building $v2"; }
build_pid=
cp "$work/src/metering-agent_${v2}_$(dpkg --print-architecture).deb" "$root/var/tmp/v2.deb"
now=$(agent_now)
hour2=$(( now / 3600 * 3600 ))
if [ $(( now - hour2 )) -gt 900 ]; then hour2=$(( hour2 + 3600 )); fi
wait_agent $(( hour2 + 300 )) # upgrade at HH:05: it takes ~20 agent minutes; all in one hour
pid=$(main_pid)
in_box apt-get install -y -qq /var/tmp/v2.deb >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "upgrade"; }
[ "$(in_box dpkg-query -W -f '${Version}' metering-agent)" = "$v2" ] || fail "not upgraded"
[ "$(in_box systemctl is-active metering-agent.service)" = active ] || fail "not running after the upgrade"
[ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart the agent onto the new code"
in_box systemctl show -p NeedDaemonReload --value metering-agent.service | grep -qx no ||
    fail "the unit changed on disk without daemon-reload"
say "upgrade $v1 -> $v2: restarted (pid $pid -> $(main_pid)), $(in_box metering-agent --version)"
echo 7 >"$work/www/gauge" # after the upgrade's restart: this hour's max only if it stayed open
wait_agent $(( $(agent_now) + 300 ))
[ $(( $(agent_now) - hour2 )) -lt 3300 ] || fail "the upgrade took too long to test its hour"
in_box systemctl stop metering-agent.service # seals the hour and sends it at once
got=$(records | grep "^gauge $(iso_hour "$hour2") " || true)
[ "$got" = "gauge $(iso_hour "$hour2") 7" ] ||
    fail "hour $(iso_hour "$hour2") across the upgrade: expected 7 (the max after it), got: ${got:-none}"
say "the upgrade kept hour $(iso_hour "$hour2") open: one record, 7 (3 before, 7 after)"

in_box apt-get install -y -qq --reinstall /var/tmp/v2.deb >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "reinstall"; }
[ "$(in_box systemctl is-active metering-agent.service)" = inactive ] ||
    fail "an upgrade started a stopped agent"
say "upgrade of a stopped agent: still stopped"

# -- the journal: no timestamps of our own, a quiet ExecStartPre, warnings once per hour ----------

journal=$(in_box journalctl --no-pager -o cat -u metering-agent.service)
if grep -E '^[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9:]+' <<<"$journal"; then fail "timestamped lines"; fi
if grep -E '^ok ' <<<"$journal"; then fail "ExecStartPre printed ok lines"; fi
drops=$(in_box journalctl --no-pager -o cat -p warning -u metering-agent.service | grep -c "already sealed" || true)
[ "$drops" -le 1 ] || fail "late-sample warning repeated $drops times in one hour"
say "journal: no own timestamps, quiet ExecStartPre, ${drops} late-sample warning(s) at priority warning"
grep -E "systemd job|cannot ask systemd|stays open|sealed quantity|stopped;" <<<"$journal" | sed 's/^/    /'

# -- remove stops it; purge cleans up -----------------------------------------------------------

in_box systemctl start metering-agent.service
wait_active 20 >/dev/null
in_box apt-get remove -y -qq metering-agent >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "remove"; }
[ "$(in_box systemctl is-active metering-agent.service)" != active ] || fail "still active after remove"
if in_box pgrep -u metering-agent >/dev/null; then fail "agent processes left after remove"; fi
[ -e "$root/var/lib/metering-agent/ledger.db" ] || fail "remove deleted the ledger (purge does)"
say "remove: stopped, no processes left, ledger kept"
in_box apt-get purge -y -qq metering-agent >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "purge"; }
for path in /var/lib/metering-agent /usr/lib/metering-agent /etc/metering-agent \
    /etc/systemd/system/multi-user.target.wants/metering-agent.service; do
    [ ! -e "$root$path" ] || fail "purge left $path"
done
say "purge: state, code, config and enablement gone"

say "records the emulator accepted:"
records | sed 's/^/    /'
say "all systemd checks passed in ${SECONDS} s (active in ${t_active} s, exposure $score)"
