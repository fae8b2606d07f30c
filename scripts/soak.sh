#!/usr/bin/env bash
# The soak test (tests/soak.rs): mixed TCP and UDP traffic through 24
# namespaces for the given time, while namespaces are made and deleted under
# glob rules, the config is reloaded (SIGHUP and `nsproxy reload`) and the
# upstream is killed and restarted; then it checks threads, fds, RSS, that
# every loss is in a counter, and the daemon's error log. Run it as root.
#
#   scripts/soak.sh [--duration 30m] [--release]
#
# The duration takes s, m or h (default 2m). Namespaces are named
# nspt-PID-N-tag after the test process; if that process is killed without
# unwinding (SIGKILL, Ctrl-C), this script removes them and the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."

duration=2m
profile=()
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration="${2:?--duration needs a value, e.g. 30m}"; shift 2 ;;
        --duration=*) duration="${1#*=}"; shift ;;
        --release) profile=(--release); shift ;;
        *) echo "soak.sh: unknown argument $1 (use --duration 30m, --release)" >&2; exit 2 ;;
    esac
done
case "$duration" in
    *h) secs=$(( ${duration%h} * 3600 )) ;;
    *m) secs=$(( ${duration%m} * 60 )) ;;
    *s) secs=${duration%s} ;;
    *[!0-9]* | "") echo "soak.sh: bad duration $duration (e.g. 90s, 30m, 2h)" >&2; exit 2 ;;
    *) secs=$duration ;;
esac

pidfile=$(mktemp)
cleanup() {
    read -r test_pid daemon_pid < "$pidfile" 2>/dev/null || true
    # Still running only when this script was interrupted.
    if [ -n "${test_pid:-}" ] && grep -q soak "/proc/$test_pid/cmdline" 2>/dev/null; then
        kill -KILL "$test_pid" 2>/dev/null || true
    fi
    if [ -n "${daemon_pid:-}" ] && grep -q nsproxy "/proc/$daemon_pid/cmdline" 2>/dev/null; then
        kill "$daemon_pid" 2>/dev/null || true
    fi
    if [ -n "${test_pid:-}" ]; then
        for ns in $(ip netns list | awk -v p="nspt-$test_pid-" 'index($1, p) == 1 {print $1}'); do
            ip netns del "$ns" 2>/dev/null || true
        done
    fi
    rm -f "$pidfile"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NSPROXY_SOAK_SECS=$secs NSPROXY_SOAK_PIDFILE=$pidfile \
    cargo test ${profile[@]+"${profile[@]}"} --all-features --test soak -- --ignored --exact soak --nocapture
