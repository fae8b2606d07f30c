#!/usr/bin/env bash
# Builds nsproxy and runs the reference scenario of examples/hello.toml:
# port 8000 answered in the host namespace, ns1 and ns2.
#
#   sudo examples/demo.sh          # demonstrate, then keep serving until Ctrl-C
#   sudo examples/demo.sh --once   # demonstrate and exit
#
# It creates the demo namespaces ns1 and ns2 if they do not exist (and removes
# only the ones it created), starts a small upstream on 127.0.0.1:9000, runs
# nsproxy, and connects to port 8000 in each namespace.
set -euo pipefail
cd "$(dirname "$0")/.."

once=0
[ "${1:-}" = "--once" ] && once=1
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (network namespaces need it)" >&2; exit 1; }

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v cc >/dev/null || need+=(gcc libc6-dev)
if [ ${#need[@]} -gt 0 ]; then
    echo "demo.sh: installing ${need[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi
command -v cargo >/dev/null || {
    echo "demo.sh: cargo not found: install Rust (https://rustup.rs) and run again" >&2
    exit 1
}

cargo build --release --bin nsproxy --example hello_upstream

created=()
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "${created[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for ns in ns1 ns2; do
    if ! ip netns list | awk '{print $1}' | grep -qx "$ns"; then
        ip netns add "$ns"
        created+=("$ns")
    fi
    ip -n "$ns" link set lo up
done

target/release/examples/hello_upstream 127.0.0.1:9000 &
pids+=($!)
log=target/demo-nsproxy.log
target/release/nsproxy run --config examples/hello.toml 2>"$log" &
pids+=($!)

# Bounded wait until port 8000 answers in all three namespaces.
ask() { # ns addr
    local cmd='exec 3<>/dev/tcp/'"$2"'/8000 && timeout 2 cat <&3'
    if [ "$1" = host ]; then bash -c "$cmd"; else ip netns exec "$1" bash -c "$cmd"; fi
}
for _ in $(seq 100); do
    ok=1
    for ns in host ns1 ns2; do ask "$ns" 127.0.0.1 >/dev/null 2>&1 || ok=0; done
    [ $ok = 1 ] && break
    sleep 0.1
done

echo
for ns in host ns1 ns2; do
    for addr in 127.0.0.1 ::1; do
        printf '%-5s %-10s -> %s\n' "$ns" "[$addr]:8000" "$(ask "$ns" "$addr" 2>&1 || echo FAILED)"
    done
done
echo
echo "nsproxy threads: $(awk '/^Threads:/ {print $2}' "/proc/${pids[1]}/status") (main + 2 workers + the namespace thread)"
echo "nsproxy log ($log):"
tail -n 4 "$log"

if [ $once = 1 ]; then exit 0; fi
echo
echo "serving; try: ip netns exec ns1 bash -c 'cat </dev/tcp/127.0.0.1/8000'   (Ctrl-C stops)"
tail -n 0 -f "$log" --pid "${pids[1]}"
