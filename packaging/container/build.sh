#!/usr/bin/env bash
# Build the metering-agent sidecar image from packaging/container/Containerfile, on a Debian 12
# base you name, with podman (or docker). The one recipe: sellers use it, and so does CI
# (packaging/ci/container-check.sh).
#
#   packaging/container/build.sh [--base IMAGE | --debootstrap] [--tag NAME] [--ca-bundle FILE]
#                                [--engine podman|docker] [--no-cache]
#
#   --base IMAGE      the Debian 12 image to build on (default debian:12-slim, from your
#                     registry or mirror; podman/docker pull it if it is not local)
#   --debootstrap     no registry at all: make a Debian 12 minbase with debootstrap (as root),
#                     slimmed as debian:12-slim is, with this host's apt sources and CA bundle,
#                     import it as localhost/deb12-base:REV and build on it. The root is kept as
#                     a tarball in $METERING_AGENT_BUILD_CACHE (default
#                     /var/cache/metering-agent-build), so it is made once per machine.
#   --ca-bundle FILE  a PEM bundle that pip must trust in the build stage (a TLS-inspecting proxy
#                     between you and PyPI). It goes into the build stage's base only, never into
#                     the image. Default: none (pip uses the base's bundle if it has one, else
#                     its own certifi).
#   --tag NAME        default localhost/metering-agent:VERSION (VERSION from agent/__init__.py)
#   --engine          default podman if installed, else docker
#   --no-cache        build every step again (fresh packages from Debian and PyPI)
#
# podman: the image is built in the Docker format (--format docker), because the OCI image format
# has no HEALTHCHECK and podman would drop it; the script checks that it is there. On a host with
# hybrid (v1 + v2) cgroups podman's default runtime crun refuses to run anything, and where this
# shell's open-files limit is below podman's default one it cannot set it: unless CONTAINERS_CONF
# is already set, the script then writes $METERING_AGENT_BUILD_CACHE/containers.conf
# (runtime runc, the limits of this shell) and uses it; `podman run` on that host needs it too:
#   export CONTAINERS_CONF=/var/cache/metering-agent-build/containers.conf
# It prints the image's size and the build's time at the end.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
cache=${METERING_AGENT_BUILD_CACHE:-/var/cache/metering-agent-build}
base=debian:12-slim base_given= debootstrap_base= ca_bundle= tag= engine= no_cache=()
base_rev=2 # bump when the debootstrap recipe below changes (a new tarball and image)

usage() { sed -n '5,/^# podman:/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-2}"; }
die() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh: $*"; }

while [ $# -gt 0 ]; do
    case $1 in
        --base) base=${2:?--base needs an image} base_given=1; shift 2 ;;
        --debootstrap) debootstrap_base=1; shift ;;
        --ca-bundle) ca_bundle=${2:?--ca-bundle needs a file}; shift 2 ;;
        --tag) tag=${2:?--tag needs a name}; shift 2 ;;
        --engine) engine=${2:?--engine needs podman or docker}; shift 2 ;;
        --no-cache) no_cache=(--no-cache); shift ;;
        -h | --help) usage 0 ;;
        *) echo "build.sh: unknown option $1" >&2; usage ;;
    esac
done
[ -z "$base_given" ] || [ -z "$debootstrap_base" ] || die "--base and --debootstrap: choose one (--debootstrap makes the base)"
case $engine in "" | podman | docker) ;; *) die "--engine $engine: expected podman or docker" ;; esac
if [ -n "$ca_bundle" ]; then
    [ -r "$ca_bundle" ] || die "--ca-bundle $ca_bundle: not a readable file"
    grep -q 'BEGIN CERTIFICATE' "$ca_bundle" || die "--ca-bundle $ca_bundle: no PEM certificate in it"
fi
if [ -z "$engine" ]; then
    if command -v podman >/dev/null; then engine=podman; elif command -v docker >/dev/null; then engine=docker
    else die "neither podman nor docker is installed (Debian: apt-get install podman runc uidmap)"; fi
fi
command -v "$engine" >/dev/null || die "--engine $engine: not installed"
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/agent/__init__.py")
tag=${tag:-localhost/metering-agent:$version}
scratch=$(mktemp -d /var/tmp/metering-agent-build.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

# -- podman on this host: runtime and limits -----------------------------------------------------

if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ]; then
    conf=$cache/containers.conf
    hybrid= ulimits=
    [ -f /sys/fs/cgroup/cgroup.controllers ] || hybrid=1 # cgroup v1 or hybrid: crun fails
    # podman (as root) gives containers 1048576 open files and processes; where this shell's
    # hard limit is lower, runc cannot raise them ("error setting rlimits ... operation not
    # permitted"), so the containers get that limit. podman also lowers its own process limit to
    # the kernel's pid_max (32768 here, under a shell that allows 96367): the lower of the two.
    nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo unlimited)
    if [ "$pid_max" != unlimited ] && { [ "$nproc" = unlimited ] || [ "$pid_max" -lt "$nproc" ]; }; then
        nproc=$pid_max
    fi
    for limit in "nofile=$nofile" "nproc=$nproc"; do
        hard=${limit#*=}
        if [ "$hard" != unlimited ] && [ "$hard" -lt 1048576 ]; then
            ulimits="$ulimits${ulimits:+, }\"$limit:$hard\""
        fi
    done
    if [ -n "$hybrid$ulimits" ]; then
        mkdir -p "$cache"
        {
            echo "# written by packaging/container/build.sh for this host's podman"
            [ -z "$ulimits" ] || printf '[containers]\ndefault_ulimits = [%s]\n' "$ulimits"
            if [ -n "$hybrid" ]; then
                command -v runc >/dev/null || die "cgroups v1/hybrid: podman needs runc (apt-get install runc)"
                printf '\n[engine]\nruntime = "runc"\n'
            fi
        } >"$conf"
        export CONTAINERS_CONF=$conf
        say "podman on this host needs $conf (${hybrid:+runc: cgroups v1 or hybrid}${hybrid:+${ulimits:+; }}${ulimits:+limits: $ulimits}):"
        say "  export CONTAINERS_CONF=$conf   (for podman run, too)"
    else
        rm -f "$conf"
    fi
fi

# -- the base: debootstrap, for a machine without a registry ---------------------------------------

if [ -n "$debootstrap_base" ]; then
    base=localhost/deb12-base:$base_rev
    tarball=$cache/deb12-base-$base_rev.tar
    if ! "$engine" image exists "$base" 2>/dev/null && ! "$engine" image inspect "$base" >/dev/null 2>&1; then
        if [ ! -s "$tarball" ]; then
            [ "$(id -u)" = 0 ] || die "--debootstrap runs debootstrap, as root"
            command -v debootstrap >/dev/null || die "--debootstrap: apt-get install debootstrap"
            mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
            root=$scratch/rootfs
            say "debootstrap bookworm from ${mirror:-http://deb.debian.org/debian} (once; about 100 s)"
            debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" \
                >"$scratch/debootstrap.log" 2>&1 || { tail -20 "$scratch/debootstrap.log"; die "debootstrap failed"; }
            # What debian:12-slim leaves out, now and in every later apt-get install.
            cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
            find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
            find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
            rm -rf "$root"/usr/share/{groff,info,linda,lintian/overrides,locale,man}/* \
                "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin \
                "$root"/var/lib/apt/lists/* "$root/etc/hostname" \
                "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old
            # The host's apt sources (its mirror), and its CAs: apt and pip inside trust what the
            # host trusts (a TLS-inspecting proxy's CA, say).
            rm -f "$root/etc/apt/sources.list"
            if [ -f /etc/apt/sources.list.d/debian.sources ]; then
                cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/"
            else
                echo "deb ${mirror:-http://deb.debian.org/debian} bookworm main" >"$root/etc/apt/sources.list"
            fi
            mkdir -p "$root/etc/ssl/certs" "$root/usr/local/share/ca-certificates"
            [ ! -f /etc/ssl/certs/ca-certificates.crt ] || cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
            cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
            mkdir -p "$cache"
            tar -C "$root" -cf "$tarball.tmp" .
            mv "$tarball.tmp" "$tarball"
            rm -rf "$root"
        fi
        "$engine" import -q "$tarball" "$base" >/dev/null || die "$engine import $tarball"
        say "base $base imported from $tarball"
    fi
fi

# -- the CA bundle pip trusts, in the build stage's base only --------------------------------------

build_args=(--build-arg "BASE=$base")
if [ -n "$ca_bundle" ]; then
    mkdir "$scratch/ca"
    cp "$ca_bundle" "$scratch/ca/ca-certificates.crt"
    printf 'ARG BASE\nFROM ${BASE}\nCOPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n' \
        >"$scratch/ca/Containerfile"
    "$engine" build -q --build-arg "BASE=$base" -f "$scratch/ca/Containerfile" \
        -t localhost/metering-agent-build-base "$scratch/ca" >/dev/null ||
        die "could not add $ca_bundle to $base"
    build_args+=(--build-arg BUILD_BASE=localhost/metering-agent-build-base)
fi

# -- build -----------------------------------------------------------------------------------------

format=()
[ "$engine" = docker ] || format=(--format docker --layers)
say "building $tag on $base with $engine"
SECONDS=0
"$engine" build "${format[@]}" "${no_cache[@]}" "${build_args[@]}" -f "$repo/packaging/container/Containerfile" \
    -t "$tag" "$repo" >"$scratch/build.log" 2>&1 || { tail -40 "$scratch/build.log"; die "$engine build failed"; }
took=$SECONDS
grep -h '^bytecode:' "$scratch/build.log" | sed 's/^/build.sh: /' || true

health=$("$engine" image inspect --format '{{json .Config.Healthcheck}}' "$tag")
case $health in *'"status","--check"'*) ;; *) die "$tag has no HEALTHCHECK (found: $health)" ;; esac
size=$("$engine" image inspect --format '{{.Size}}' "$tag")
say "built $tag in $took s: $(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }') MB" \
    "($engine image inspect --format '{{.Size}}'), HEALTHCHECK kept"
