#!/usr/bin/env bash
# nsproxy comparative benchmark: one command, as root.
#
#   bench/run.sh            full run: 5 interleaved reps x 5 s, scale N=1000 and N=10000
#   bench/run.sh --quick    2 reps x 2 s, scale N=100 (a few minutes)
#   bench/run.sh --help     every option (passed on to bench/bench.py)
#
# Installs what it needs through apt (haproxy, socat, nginx + libnginx-mod-stream, iperf3, passt,
# gnuplot-nox, iproute2, procps, python3), builds nsproxy and the load generator in release,
# then runs bench/bench.py. Results: bench/results/latest.{md,png,json}; logs: bench/results/logs/.
#
# Everything it creates (network namespaces with unique names nsb<PID>-*, processes) is
# recorded under a state directory and removed on every exit, here and in bench.py; it never
# touches a namespace it did not create.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

for a in "$@"; do
    case "$a" in
    -h | --help)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        echo
        exec python3 bench/bench.py --help
        ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "bench/run.sh: needs root (network namespaces, setns)" >&2
    exit 1
fi

# ---- tools
declare -A NEED=(
    [haproxy]=haproxy
    [socat]=socat
    [nginx]=nginx
    [iperf3]=iperf3
    [pasta]=passt
    [gnuplot]=gnuplot-nox
    [ip]=iproute2
    [ps]=procps
    [python3]=python3
    [xargs]=findutils
)
missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep the packages' own services (nginx on :80, haproxy) from starting on the host:
    # a policy-rc.d that says "no" for the duration of the install, only if there is none.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    rc=0
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } || rc=$?
    [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
    [ $rc = 0 ] || exit $rc
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "bench: cargo not found: install a Rust toolchain (1.85 or newer)" >&2
    exit 1
fi

# ---- build
echo "bench: cargo build --release (nsproxy, examples/loadgen)"
cargo build --release --bin nsproxy --example loadgen
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
NSPROXY=$TARGET/release/nsproxy
LOADGEN=$TARGET/release/examples/loadgen

# ---- safety net: whatever bench.py recorded and did not remove, goes
STATE=$(mktemp -d /tmp/nsbench.XXXXXX)
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [ -s "$STATE/pids" ]; then
        while read -r pid start _label; do
            # Only the recorded process (same pid *and* start time), and its group.
            if [ -r "/proc/$pid/stat" ] && [ "$(awk '{print $22}' "/proc/$pid/stat" 2>/dev/null)" = "$start" ]; then
                kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
            fi
        done <"$STATE/pids"
    fi
    if [ -s "$STATE/netns" ]; then
        left=()
        while read -r ns; do
            case "$ns" in nsb[0-9]*-*) ;; *) continue ;; esac # only names of this harness's form
            [ -e "/run/netns/$ns" ] && left+=("$ns")
        done <"$STATE/netns"
        if [ ${#left[@]} -gt 0 ]; then
            echo "bench: removing ${#left[@]} leftover namespace(s)"
            printf 'netns del %s\n' "${left[@]}" | ip -batch - || true
        fi
    fi
    rm -rf "$STATE"
    exit $rc
}
PY=
stop() {
    # Let bench.py clean up first (it handles SIGTERM), then the EXIT trap double-checks.
    if [ -n "$PY" ] && kill -0 "$PY" 2>/dev/null; then
        kill -TERM "$PY" 2>/dev/null || true
        for _ in $(seq 1 60); do kill -0 "$PY" 2>/dev/null || break; sleep 0.5; done
    fi
    exit 130
}
trap cleanup EXIT
trap stop INT TERM HUP

# In the background + wait, so that a signal to this script is handled at once.
python3 bench/bench.py --state-dir "$STATE" --nsproxy "$NSPROXY" --loadgen "$LOADGEN" "$@" &
PY=$!
rc=0
wait "$PY" || rc=$?
PY=
exit $rc
