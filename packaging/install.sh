#!/usr/bin/env bash
# Install metering-agent on hosts without dpkg (Amazon Linux 2023, RHEL, ...): the same layout as
# the .deb, with the virtualenv under /opt/metering-agent. Idempotent: run it again to upgrade;
# an existing /etc/metering-agent/config.yaml and the ledger are never touched.
#
#   sudo packaging/install.sh                 install or upgrade
#   sudo packaging/install.sh --uninstall     remove the agent, keep config and ledger
#   sudo packaging/install.sh --purge         remove the agent, its config and its ledger
#   DESTDIR=/tmp/root packaging/install.sh    stage into a scratch root (no user, no systemctl)
#
# Needs Python 3.10+ (Amazon Linux 2023: `dnf install -y python3.11`; its python3 is 3.9) and
# network access to PyPI. PYTHON=/path/to/python3.x picks the interpreter.
set -euo pipefail

PREFIX=/opt/metering-agent
DESTDIR=${DESTDIR:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UNIT=/etc/systemd/system/metering-agent.service
# systemd-sleep's hook folder as this host's systemd names it (Debian 12: /lib/systemd/system-sleep;
# the same folder as /usr/lib/systemd/system-sleep wherever /usr is merged).
SLEEP_HOOK=$(pkg-config --variable=systemd_sleep_dir systemd 2>/dev/null || true)
SLEEP_HOOK=${SLEEP_HOOK:-/usr/lib/systemd/system-sleep}/metering-agent

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys, venv; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    die "no Python 3.10+ with venv found; on Amazon Linux 2023: dnf install -y python3.11 (or set PYTHON=)"
}

systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

install_agent() {
    local python venv="$DESTDIR$PREFIX"
    python=$(pick_python)
    if [ -x "$venv/bin/python" ] &&
        ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
        say "replacing $venv (built with an unusable Python)"
        rm -rf "$venv"
    fi
    say "virtualenv $venv with $("$python" --version)"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-cache-dir --upgrade pip
    "$venv/bin/python" -m pip install --quiet --no-cache-dir \
        -r "$ROOT/packaging/requirements.txt" "$ROOT"
    install -d "$DESTDIR/usr/bin"
    ln -sfn "$PREFIX/bin/metering-agent" "$DESTDIR/usr/bin/metering-agent"
    install -D -m 0644 "$ROOT/packaging/metering-agent.service" "$DESTDIR$UNIT"
    # Before a suspend or hibernation, the sealed hours are sent; after the resume, what is due.
    install -D -m 0755 "$ROOT/packaging/system-sleep/metering-agent" "$DESTDIR$SLEEP_HOOK"
    if [ -e "$DESTDIR/etc/metering-agent/config.yaml" ]; then
        say "keeping $DESTDIR/etc/metering-agent/config.yaml"
    else
        install -D -m 0644 "$ROOT/config.example.yaml" "$DESTDIR/etc/metering-agent/config.yaml"
    fi
    install -d -m 0755 "$DESTDIR/var/lib/metering-agent"
    if [ -n "$DESTDIR" ]; then
        say "staged into $DESTDIR (no user created, systemd not touched)"
        return
    fi
    getent group metering-agent >/dev/null || groupadd --system metering-agent
    getent passwd metering-agent >/dev/null ||
        useradd --system --gid metering-agent --home-dir /var/lib/metering-agent \
            --no-create-home --shell /sbin/nologin --comment "AWS Marketplace metering agent" \
            metering-agent
    # No adm membership: the unit's SupplementaryGroups=adm gives the service its /var/log reads.
    chown metering-agent:metering-agent /var/lib/metering-agent
    if systemd_running; then
        systemctl daemon-reload
        # Enabled, not started: it starts on the buyer's first boot (or `systemctl start`).
        systemctl enable metering-agent.service
        systemctl try-restart metering-agent.service
    fi
    say "installed $("$DESTDIR/usr/bin/metering-agent" --version); edit /etc/metering-agent/config.yaml, then: metering-agent check"
}

uninstall_agent() {
    local purge=$1
    if systemd_running; then
        systemctl disable --now metering-agent.service 2>/dev/null || true
    fi
    rm -f "$DESTDIR$UNIT" "$DESTDIR$SLEEP_HOOK" "$DESTDIR/usr/bin/metering-agent"
    rm -rf "${DESTDIR:?}$PREFIX"
    if systemd_running; then systemctl daemon-reload; fi
    if [ "$purge" = yes ]; then
        rm -rf "$DESTDIR/etc/metering-agent" "$DESTDIR/var/lib/metering-agent"
        say "removed, with config and ledger"
    else
        say "removed; kept $DESTDIR/etc/metering-agent and $DESTDIR/var/lib/metering-agent (--purge removes them)"
    fi
}

case "${1:-}" in
    "") install_agent ;;
    --uninstall) uninstall_agent no ;;
    --purge) uninstall_agent yes ;;
    -h | --help) sed -n '2,13p' "$0" ;;
    *) die "unknown option $1 (use --uninstall, --purge or --help)" ;;
esac
