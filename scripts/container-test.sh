#!/usr/bin/env bash
# Builds nsproxy's container image (scripts/container-build.sh) and runs it
# the way the Kubernetes DaemonSet of deploy/kubernetes/ does: host network,
# /run/netns bind-mounted with rslave propagation, every capability dropped
# but the four the split needs, a read-only root, the config directory laid
# out as a ConfigMap volume and followed (--watch-config). Then, on the host:
#
#   1. a namespace made after the container started (its name matches the
#      config's glob) is served: a client in it reaches the upstream;
#   2. the ConfigMap is updated the way the kubelet does it (..data swapped):
#      the new rule is served without a restart or SIGHUP;
#   3. the namespace deleted is released: `nsproxy status` in the container
#      no longer lists it, and the log says it went.
#
# Needs root; installs podman and runc if missing (apt). podman runs with
# --runtime runc (crun refuses a hybrid cgroup setup). Everything it makes
# (container, namespaces, the upstream server, the config directory) has
# this run's pid in its name and is removed on exit, failure included; the
# image is kept (a warm run reuses nothing else). Prints how long it took.
#
#   scripts/container-test.sh [--keep-image]
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS

say() { echo "container-test: $*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || {
    if [ "${NSPROXY_REQUIRE_ROOT:-}" = 1 ]; then fail "needs root (NSPROXY_REQUIRE_ROOT=1 forbids skipping)"; fi
    say "SKIPPED: needs root (network namespaces, podman with host network)"
    exit 0
}
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
    say "installing podman and runc (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends podman runc >/dev/null
fi

id=$$
prefix="nsct$id"
ctr="nsproxy-ct-$id"
image="localhost/nsproxy-test:latest"
up="$prefix-up"
pod="$prefix-pod1"
cfg=$(mktemp -d "/tmp/$prefix-cfg.XXXXXX")
server_pid=""

cleanup() {
    local rc=$?
    if [ $rc -ne 0 ] && podman container exists "$ctr" 2>/dev/null; then
        say "the container's log:"
        podman logs "$ctr" 2>&1 | tail -n 40 >&2 || true
    fi
    podman rm -f -t 2 "$ctr" >/dev/null 2>&1 || true
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    for ns in "$pod" "$up"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$cfg"
    exit $rc
}
trap cleanup EXIT INT TERM

# Waits (at most $2 seconds, polling every 0.1 s) until the command in $3...
# succeeds; $1 says what for.
wait_for() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || fail "$what: not within ${limit}s"
        sleep 0.1
    done
}

# A ConfigMap volume: nsproxy.toml -> ..data/nsproxy.toml, ..data -> ..TIMESTAMP.
published=0
publish() {
    local old="..2026_12_03_00_00_$(printf %02d $published).$id"
    published=$((published + 1))
    local new="..2026_12_03_00_00_$(printf %02d $published).$id"
    mkdir "$cfg/$new"
    cat > "$cfg/$new/nsproxy.toml"
    chmod -R a+rX "$cfg/$new"
    ln -s "$new" "$cfg/..data_tmp"
    mv -T "$cfg/..data_tmp" "$cfg/..data"
    rm -rf "${cfg:?}/$old"
    [ -e "$cfg/nsproxy.toml" ] || ln -s ..data/nsproxy.toml "$cfg/nsproxy.toml"
}
chmod 0755 "$cfg"

rules() {
    # $1: the rules' listen ports; every rule listens in the namespaces the
    # glob matches and forwards to the upstream namespace's server.
    echo 'workers = 1'
    for port in "$@"; do
        cat <<EOF
[[proxy]]
name = "r$port"
protocol = "tcp"
listen = "127.0.0.1:$port"
netns = ["/var/run/netns/$prefix-pod*"]
upstream = "127.0.0.1:9000"
upstream_netns = "$up"
EOF
    done
}

say "building the image"
build_start=$SECONDS
scripts/container-build.sh --tag "$image" >/dev/null
say "image built in $((SECONDS - build_start))s: $(podman image inspect --format '{{.Size}}' "$image" | awk '{ printf "%.1f MB", $1 / 1e6 }')"

# /run/netns must be a mount point with shared propagation before the
# container starts, or namespaces mounted later never reach it (ip netns
# makes it so at its first `add`; container runtimes on Kubernetes nodes do
# the same for theirs).
ip netns add "$up"
ip -n "$up" link set lo up
[ "$(findmnt -no PROPAGATION /run/netns)" = shared ] || fail "/run/netns is not a shared mount"
ip netns exec "$up" python3 -c '
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9000))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from upstream\n")
    c.close()
' &
server_pid=$!

publish < <(rules 7100)
say "starting the container $ctr"
podman --runtime runc run -d --name "$ctr" \
    --network host \
    --ulimit nofile=20000:20000 --ulimit nproc=4096:4096 \
    --cap-drop all --cap-add SYS_ADMIN,SETUID,SETGID,SETPCAP \
    --security-opt no-new-privileges \
    --read-only --tmpfs /run/nsproxy:mode=0755 \
    -v /run/netns:/run/netns:rslave \
    -v "$cfg":/etc/nsproxy:ro \
    "$image" --log-format json run --config /etc/nsproxy/nsproxy.toml --watch-config >/dev/null
logs() { podman logs "$ctr" 2>&1; }
# Read whole, then searched: `grep -q` leaving a pipe early would fail it (pipefail).
log_has() { grep -qF -- "$1" <<<"$(logs)"; }
wait_for "the container reports ready" 30 log_has '"ready: '
log_has 'relay running as nobody' || fail "the relay did not drop to nobody"
# What each process holds, seen from the host: the relay (the container's
# pid 1) nothing, the broker (its child) CAP_SYS_ADMIN alone.
relay=$(podman inspect --format '{{.State.Pid}}' "$ctr")
broker=$(cat "/proc/$relay/task/$relay/children" | awk '{ print $1 }')
cap() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
[ "$(cap "$relay" CapEff)" = 0000000000000000 ] || fail "the relay has capabilities: $(cap "$relay" CapEff)"
[ "$(cap "$relay" NoNewPrivs)" = 1 ] || fail "the relay has no no_new_privs"
[ "$(cap "$broker" CapEff)" = 0000000000200000 ] || fail "the broker holds $(cap "$broker" CapEff), not CAP_SYS_ADMIN alone"
say "relay pid $relay: no capability; broker pid $broker: CAP_SYS_ADMIN"

served() {
    # $1: port; the client runs in the namespace made after the start.
    local got
    got=$(ip netns exec "$pod" timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1; cat <&3") || return 1
    [ "$got" = "hello from upstream" ]
}

say "1. a namespace made after the container started is served"
ip netns add "$pod"
ip -n "$pod" link set lo up
wait_for "$pod served on 7100" 20 served 7100
status() { podman exec "$ctr" /usr/bin/nsproxy status; }
grep -qF "/var/run/netns/$pod" <<<"$(status)" || fail "status does not list $pod"

say "2. a ConfigMap update (..data swapped) is followed"
publish < <(rules 7100 7101)
wait_for "the new rule served on 7101" 20 served 7101
log_has 'changed: reloading' || fail "no reload for the changed config"
if log_has 'SIGHUP received'; then fail "a SIGHUP was seen (nothing sent one)"; fi

say "3. the namespace deleted is released"
ip netns del "$pod"
not_listed() {
    local s
    s=$(status) || return 1
    ! grep -qF "/var/run/netns/$pod" <<<"$s"
}
wait_for "$pod released" 20 not_listed
grep -F "/var/run/netns/$pod" <<<"$(logs)" | grep -E 'gone|deleted' >/dev/null || fail "the log does not say $pod went"

podman rm -f -t 5 "$ctr" >/dev/null
say "OK in $((SECONDS - started))s"
