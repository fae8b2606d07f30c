#!/usr/bin/env bash
# How the server scales with the size of its config and the namespaces it
# follows, measured on a real daemon (root needed: it makes namespaces).
#
#   start-up  N namespaces served by 2N one-namespace rules (TCP + UDP, one
#             rule each) against the same listeners written as two rules:
#             time from exec to the "ready" log line, and the daemon's CPU
#             time (user + system) until then
#   reload    a no-op reload of R rules: `nsproxy reload`'s wall time and
#             the daemon's CPU time, and the slowest `nsproxy status`
#             answered meanwhile
# On a loaded machine the wall times wander; the CPU times much less.
#   discovery CPU time (user + system) the daemon spends following M
#             namespace additions matched by a glob
#
# Usage: bench/scale.sh [--bin PATH] [--namespaces N] [--rules R]
#        [--additions M] [--only startup|reload|discovery]
# Every namespace it makes is named nsbench-PID-* and removed on exit.
set -euo pipefail

BIN=target/release/nsproxy
NS=1000
RULES=5000
ADDS=1000
ONLY=
while [ $# -gt 0 ]; do
    case "$1" in
        --bin) BIN=$2; shift 2 ;;
        --namespaces) NS=$2; shift 2 ;;
        --rules) RULES=$2; shift 2 ;;
        --additions) ADDS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-scale: needs root (it makes network namespaces)" >&2; exit 2; }

PREFIX="nsbench-$$"
WORK=$(mktemp -d)
DAEMON=
cleanup() {
    [ -n "$DAEMON" ] && kill -9 "$DAEMON" 2>/dev/null || true
    for f in /run/netns/"$PREFIX"-*; do
        [ -e "$f" ] && echo "netns delete $(basename "$f")"
    done > "$WORK/del.batch"
    ip -force -batch "$WORK/del.batch" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }

# make_namespaces TAG COUNT: TAG-0 .. TAG-(COUNT-1), in one `ip -batch`.
make_namespaces() {
    for ((i = 0; i < $2; i++)); do echo "netns add $PREFIX-$1-$i"; done > "$WORK/add.batch"
    ip -batch "$WORK/add.batch"
}

# start CONFIG: runs the daemon, sets DAEMON, returns once it is ready;
# sets TOOK to the seconds that took. (Not in a subshell: DAEMON must stay.)
start() {
    local t0 log=$WORK/log
    : > "$log"
    t0=$(now)
    "$BIN" run --config "$1" --control-socket "$WORK/ctl.sock" 2> "$log" &
    DAEMON=$!
    for ((i = 0; i < 12000; i++)); do
        grep -q "ready: " "$log" && break
        kill -0 "$DAEMON" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.01
    done
    grep -q "ready: " "$log" || { echo "never ready" >&2; exit 1; }
    TOOK="$(echo "$(now) - $t0" | bc) s wall, $(cpu_seconds "$DAEMON") s CPU"
}

stop() {
    kill -TERM "$DAEMON"
    wait "$DAEMON" || true
    DAEMON=
}

cpu_seconds() {
    # utime + stime, fields 14 and 15 of /proc/PID/stat, in clock ticks.
    awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"
}

rule() { # name protocol netns-list
    printf '[[proxy]]\nname = "%s"\nprotocol = "%s"\nlisten = "0.0.0.0:8000"\nnetns = [%s]\nupstream = "127.0.0.1:9"\nupstream_netns = "host"\n' "$1" "$2" "$3"
}

if [ -z "$ONLY" ] || [ "$ONLY" = startup ]; then
    make_namespaces s "$NS"
    : > "$WORK/many.toml"
    all=
    for ((i = 0; i < NS; i++)); do
        n="\"$PREFIX-s-$i\""
        rule "t$i" tcp "$n" >> "$WORK/many.toml"
        rule "u$i" udp "$n" >> "$WORK/many.toml"
        all+="${all:+, }$n"
    done
    { rule t tcp "$all"; rule u udp "$all"; } > "$WORK/two.toml"
    echo "start-up, $NS namespaces, $((2 * NS)) bindings:"
    start "$WORK/two.toml"; stop
    echo "  as 2 rules:                  $TOOK"
    start "$WORK/many.toml"
    echo "  as $((2 * NS)) one-namespace rules: $TOOK"
    t0=$(now)
    before=$(cpu_seconds "$DAEMON")
    "$BIN" reload --control-socket "$WORK/ctl.sock" > /dev/null
    echo "  no-op reload of those rules: $(echo "$(now) - $t0" | bc) s wall, $(echo "$(cpu_seconds "$DAEMON") - $before" | bc) s CPU"
    stop
fi

if [ -z "$ONLY" ] || [ "$ONLY" = reload ]; then
    : > "$WORK/rules.toml"
    for ((i = 0; i < RULES; i++)); do
        printf '[[proxy]]\nname = "r%s"\nprotocol = "tcp"\nlisten = "127.0.0.1:%s"\nnetns = ["host"]\nupstream = "127.0.0.1:9"\nupstream_netns = "host"\n' \
            "$i" $((20000 + i)) >> "$WORK/rules.toml"
    done
    echo "reload, $RULES rules:"
    start "$WORK/rules.toml"
    echo "  start-up:                    $TOOK"
    t0=$(now)
    before=$(cpu_seconds "$DAEMON")
    "$BIN" reload --control-socket "$WORK/ctl.sock" > /dev/null
    echo "  no-op reload:                $(echo "$(now) - $t0" | bc) s wall, $(echo "$(cpu_seconds "$DAEMON") - $before" | bc) s CPU"
    # Once more, asking for the status all along.
    "$BIN" reload --control-socket "$WORK/ctl.sock" > /dev/null &
    reloading=$!
    worst=0
    while kill -0 "$reloading" 2>/dev/null; do
        s0=$(now)
        "$BIN" status --control-socket "$WORK/ctl.sock" > /dev/null
        worst=$(echo "x = $(now) - $s0; if (x > $worst) x else $worst" | bc)
    done
    wait "$reloading"
    echo "  slowest status during one:   $worst s"
    stop
fi

if [ -z "$ONLY" ] || [ "$ONLY" = discovery ]; then
    rule g tcp "\"$PREFIX-d-*\"" > "$WORK/glob.toml"
    echo "discovery, $ADDS additions:"
    start "$WORK/glob.toml"
    before=$(cpu_seconds "$DAEMON")
    t0=$(now)
    make_namespaces d "$ADDS"
    served=0
    for ((i = 0; i < 30000; i++)); do
        # One "listening" line per binding (lifecycle::apply); the glob's
        # initial bindings match nothing, so every line is an addition's.
        served=$(grep -c ': listening rule=' "$WORK/log" || true)
        [ "$served" -ge "$ADDS" ] && break
        sleep 0.01
    done
    [ "$served" -ge "$ADDS" ] || { echo "bench-scale: only $served of $ADDS additions were served" >&2; exit 1; }
    echo "  all listening after:         $(echo "$(now) - $t0" | bc) s"
    echo "  daemon CPU:                  $(echo "$(cpu_seconds "$DAEMON") - $before" | bc) s"
    stop
fi
