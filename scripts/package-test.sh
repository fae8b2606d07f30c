#!/usr/bin/env bash
# Installs the Debian package into a clean Debian root and runs it there, as
# root:
#
#   scripts/package-test.sh               # builds it first (scripts/package-deb.sh)
#   scripts/package-test.sh --deb PATH    # tests that package
#
# The root is a minimal bookworm made by mmdebstrap (from Debian's packages),
# cached as a tarball under /var/tmp/nsproxy-pkg-root (remove the directory to
# rebuild it) and unpacked afresh for every run. Inside it (chroot) the test
# installs the package with dpkg; checks the system user nsproxy, the man
# pages, the completions, the unit, the conffile and the examples; runs
# `nsproxy check` on the shipped example and on the conffile; runs the unit's
# ExecStartPre and then its ExecStart command line (read from the installed
# unit file), with a namespace ns1 (the conffile's) in the root's /run/netns;
# polls `nsproxy status` until ns1's binding listens; sends a connection
# through it to an upstream on the daemon's host namespace; checks that the
# relay runs as nsproxy and the broker as root; stops the daemon with SIGTERM
# (exit status 0); and purges the package.
#
# Everything runs inside `unshare --mount --net --pid`: the mounts (/proc,
# /run, /dev in the root), the network namespaces and every process end with
# it, also on failure; the daemon's "host" namespace is that new network
# namespace, so nothing listens on the machine's own.
#
# Without root it skips (with NSPROXY_REQUIRE_ROOT=1 that is a failure).
# (`--inside ROOT DEB` is the script running itself inside those namespaces.)
set -euo pipefail
cd "$(dirname "$0")/.."

# The test proper, in the new mount, network and pid namespaces (the script
# runs itself with --inside ROOT DEB there). Its mounts are unmounted on the
# way out; the namespaces end with it anyway.
inside() {
    local root=$1 deb=$2
    # grep -q may close a pipe early: its writer's SIGPIPE is no failure.
    set +o pipefail
    fail() { echo "package-test: $*" >&2; exit 1; }
    in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "$@"; }
    # Polls "$@" up to 200 times, 0.1 s apart; true once it succeeds.
    poll() { local i; for i in $(seq 200); do "$@" && return 0; sleep 0.1; done; return 1; }
    mounts=() # global: the EXIT trap reads it after this function returns
    daemon=
    upstream=
    leave() {
        local p
        for p in $daemon $upstream; do
            { kill -KILL "$p" && wait "$p"; } 2>/dev/null || true
        done
        local i
        for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" || true; done
    }
    trap leave EXIT
    mount -t proc proc "$root/proc" && mounts+=("$root/proc")
    mount -t tmpfs -o mode=0755 tmpfs "$root/run" && mounts+=("$root/run")
    mount --bind /dev "$root/dev" && mounts+=("$root/dev")
    ip link set lo up

    echo "== dpkg -i $deb"
    in_root dpkg -i "$deb" || fail "dpkg -i $deb failed"
    in_root dpkg-query -W -f '${Status}\n' nsproxy | grep -qx 'install ok installed' ||
        fail "dpkg does not list nsproxy as installed"

    echo "== the system user nsproxy"
    local pw
    pw=$(in_root getent passwd nsproxy) || fail "postinst made no user nsproxy"
    echo "$pw"
    local uid shell
    uid=$(echo "$pw" | cut -d: -f3)
    shell=$(echo "$pw" | cut -d: -f7)
    [ "$uid" -lt 1000 ] || fail "nsproxy is not a system user (uid $uid)"
    [ "$shell" = /usr/sbin/nologin ] || fail "nsproxy has the login shell $shell"
    in_root getent group nsproxy >/dev/null || fail "postinst made no group nsproxy"

    echo "== the files"
    local f
    for f in /usr/bin/nsproxy /usr/lib/systemd/system/nsproxy.service /etc/nsproxy/nsproxy.toml \
        /usr/share/man/man1/nsproxy.1.gz /usr/share/man/man1/nsproxy-run.1.gz \
        /usr/share/man/man1/nsproxy-check.1.gz /usr/share/bash-completion/completions/nsproxy \
        /usr/share/zsh/vendor-completions/_nsproxy /usr/share/fish/vendor_completions.d/nsproxy.fish \
        /usr/share/doc/nsproxy/examples/hello.toml /usr/share/doc/nsproxy/copyright \
        /usr/share/doc/nsproxy/README.md; do
        [ -s "$root$f" ] || fail "the package installed no $f"
    done
    in_root dpkg-query -W -f '${Conffiles}\n' nsproxy | grep -q ' /etc/nsproxy/nsproxy.toml ' ||
        fail "/etc/nsproxy/nsproxy.toml is not a conffile"
    zcat "$root/usr/share/man/man1/nsproxy-run.1.gz" | grep -qF -- '\fB\-\-config\fR' ||
        fail "the man page of nsproxy run does not describe --config"
    in_root bash -n /usr/share/bash-completion/completions/nsproxy || fail "the bash completion does not parse"
    in_root bash -c '. /usr/share/bash-completion/completions/nsproxy && complete -p nsproxy' ||
        fail "the bash completion defines no completion for nsproxy"
    if grep -l '__broker\|__generate' "$root/usr/share/bash-completion/completions/nsproxy" \
        "$root/usr/share/zsh/vendor-completions/_nsproxy" "$root/usr/share/fish/vendor_completions.d/nsproxy.fish"; then
        fail "a completion (above) offers a hidden subcommand"
    fi
    in_root nsproxy --version

    echo "== dpkg -i again, over an edited conffile"
    echo "# edited by package-test" >>"$root/etc/nsproxy/nsproxy.toml"
    in_root dpkg -i "$deb" </dev/null || fail "installing $deb a second time failed"
    grep -qx '# edited by package-test' "$root/etc/nsproxy/nsproxy.toml" ||
        fail "reinstalling replaced the edited /etc/nsproxy/nsproxy.toml"
    [ "$(in_root getent passwd nsproxy)" = "$pw" ] || fail "reinstalling changed the user nsproxy"

    echo "== nsproxy check on the shipped example and on the conffile"
    in_root nsproxy check --config /usr/share/doc/nsproxy/examples/hello.toml ||
        fail "nsproxy check rejects the shipped example"
    in_root nsproxy check --config /etc/nsproxy/nsproxy.toml || fail "nsproxy check rejects the conffile"

    # The unit's commands, as systemd would run them (it has no shell).
    local unit="$root/usr/lib/systemd/system/nsproxy.service"
    local pre start rundir
    pre=$(sed -n 's/^ExecStartPre=//p' "$unit")
    start=$(sed -n 's/^ExecStart=//p' "$unit")
    rundir=$(sed -n 's/^RuntimeDirectory=//p' "$unit")
    [ -n "$start" ] || fail "$unit has no ExecStart="
    [ "$(echo "$start" | wc -l)" = 1 ] || fail "$unit has more than one ExecStart="
    case "$start" in /usr/bin/nsproxy\ *) ;; *) fail "ExecStart= is not /usr/bin/nsproxy: $start" ;; esac
    [ -z "$rundir" ] || install -d -m 0755 "$root/run/$rundir"
    if [ -n "$pre" ]; then
        echo "== ExecStartPre: $pre"
        # shellcheck disable=SC2086 # word splitting as systemd splits
        in_root $pre || fail "ExecStartPre failed: $pre"
    fi

    # ns1 (the conffile listens in it), a network namespace of this test
    # under the root's own /run/netns (a tmpfs of this mount namespace).
    mkdir -p "$root/run/netns"
    touch "$root/run/netns/ns1"
    unshare --net="$root/run/netns/ns1" true || fail "cannot make the namespace ns1"
    mounts+=("$root/run/netns/ns1")
    nsenter --net="$root/run/netns/ns1" ip link set lo up
    # The upstream (127.0.0.1:9000 in the daemon's host namespace, the test's).
    busybox nc -ll -p 9000 -e echo hello-from-upstream &
    upstream=$!

    echo "== ExecStart: $start"
    local log="$root/tmp/nsproxy.log"
    # Not through in_root: a function would run in a subshell of its own,
    # and $! must be the daemon (chroot and env exec it, keeping the pid).
    # shellcheck disable=SC2086
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin $start >"$log" 2>&1 &
    daemon=$!
    listening() {
        kill -0 "$daemon" 2>/dev/null || { cat "$log" >&2; fail "the daemon exited"; }
        in_root nsproxy status --json 2>/dev/null | grep -q '"state": "listening"'
    }
    poll listening || { cat "$log" >&2; fail "the daemon's binding in ns1 did not listen within 20 s"; }
    in_root nsproxy status

    echo "== a connection in ns1 through the daemon to the upstream"
    local got
    got=$(nsenter --net="$root/run/netns/ns1" timeout 10 \
        bash -c 'exec 3<>/dev/tcp/127.0.0.1/8000 && read -r line <&3 && echo "$line"') || true
    [ "$got" = hello-from-upstream ] || { cat "$log" >&2; fail "through port 8000 in ns1: got '$got', not hello-from-upstream"; }
    echo "$got"

    echo "== the relay runs as nsproxy, the broker as root"
    local relay_uid broker broker_uid
    relay_uid=$(awk '/^Uid:/ { print $2 "," $3 "," $4 "," $5 }' "/proc/$daemon/status")
    [ "$relay_uid" = "$uid,$uid,$uid,$uid" ] || fail "the relay (pid $daemon) runs as uid $relay_uid, not nsproxy's $uid"
    broker=$(grep -l "^PPid:[[:space:]]*$daemon$" /proc/[0-9]*/status | head -n 1 | cut -d/ -f3)
    [ -n "$broker" ] && [ "$(cat "/proc/$broker/comm")" = nsproxy-broker ] ||
        fail "the daemon has no child nsproxy-broker"
    broker_uid=$(awk '/^Uid:/ { print $2 }' "/proc/$broker/status")
    [ "$broker_uid" = 0 ] || fail "the broker runs as uid $broker_uid"
    echo "relay pid $daemon uid $uid, broker pid $broker uid 0"

    echo "== SIGTERM"
    kill -TERM "$daemon"
    local code=0
    wait "$daemon" || code=$?
    daemon=
    cat "$log"
    [ "$code" = 0 ] || fail "the daemon exited with status $code after SIGTERM"
    grep -q 'stopped' "$log" || fail "the daemon's log has no 'stopped'"

    echo "== dpkg --purge"
    in_root dpkg --purge nsproxy || fail "dpkg --purge nsproxy failed"
    [ ! -e "$root/usr/bin/nsproxy" ] || fail "/usr/bin/nsproxy is still there after the purge"
    [ ! -e "$root/etc/nsproxy/nsproxy.toml" ] || fail "the conffile is still there after the purge"
}

if [ "${1:-}" = --inside ]; then
    inside "$2" "$3"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    if [ "${NSPROXY_REQUIRE_ROOT:-}" = 1 ]; then
        echo "package-test: FAILED: needs root (NSPROXY_REQUIRE_ROOT=1)" >&2
        exit 1
    fi
    echo "SKIPPED package-test: needs root (a chroot, mounts and namespaces)"
    exit 0
fi

deb=
while [ $# -gt 0 ]; do
    case "$1" in
    --deb) deb=$(realpath "$2"); shift 2 ;;
    *) echo "package-test: unknown argument $1 (usage: $0 [--deb PATH])" >&2; exit 2 ;;
    esac
done

# command -> package, on the machine running the test.
declare -A NEED=([mmdebstrap]=mmdebstrap [busybox]=busybox-static [unshare]=util-linux
    [nsenter]=util-linux [ip]=iproute2 [flock]=util-linux)
missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "package-test: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; }
fi

if [ -z "$deb" ]; then
    # Its output (the build, lintian's findings) shown, its last line kept.
    # (Through cat: tee to /dev/stderr would reopen a log file at offset 0.)
    deb=$(scripts/package-deb.sh | tee >(cat >&2) | tail -n 1)
fi
[ -f "$deb" ] || { echo "package-test: no package at $deb" >&2; exit 1; }

# The base root: made once, kept. A change of what it holds changes its name.
cache=/var/tmp/nsproxy-pkg-root
suite=bookworm
include=adduser
base="$cache/$suite-minbase-$include.tar"
mkdir -p "$cache"
exec 9>"$cache/lock"
flock 9
# mmdebstrap picks its output's format from the name, and "NAME.tar.tmp.PID"
# made it a directory: one left there by that is removed (a plain root tree,
# nothing mounted in it; --one-file-system all the same).
if [ -d "$base" ]; then
    rm -rf --one-file-system "$base"
fi
if [ ! -s "$base" ]; then
    echo "package-test: making the base root $base (mmdebstrap, once)"
    mmdebstrap --variant=minbase --format=tar --include="$include" "$suite" "$base.tmp.$$" ||
        { rm -rf --one-file-system "$base.tmp.$$"; echo "package-test: mmdebstrap failed" >&2; exit 1; }
    mv "$base.tmp.$$" "$base"
fi
flock -u 9

run=$(mktemp -d "$cache/run.XXXXXX")
inner_pid=
cleanup() {
    if [ -n "$inner_pid" ] && kill -0 "$inner_pid" 2>/dev/null; then
        # --kill-child: its namespace's processes go with it.
        kill -KILL "$inner_pid" 2>/dev/null || true
        wait "$inner_pid" 2>/dev/null || true
    fi
    # The mounts were made in the test's own mount namespace, gone with it;
    # never remove a tree that still has something mounted in it here.
    # (grep reads everything: with pipefail, -q could fail findmnt on SIGPIPE.)
    if findmnt -rn -o TARGET | grep "^$run" >/dev/null; then
        echo "package-test: something is still mounted under $run: not removing it" >&2
        return
    fi
    rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
root="$run/root"
mkdir "$root"
tar -C "$root" -xpf "$base"
cp "$deb" "$root/tmp/"

echo "package-test: testing $(basename "$deb") in $root"
unshare --mount --net --pid --fork --mount-proc --kill-child --propagation private \
    "$PWD/scripts/package-test.sh" --inside "$root" "/tmp/$(basename "$deb")" &
inner_pid=$!
status=0
wait "$inner_pid" || status=$?
inner_pid=
if [ "$status" != 0 ]; then
    echo "package-test: FAILED (status $status)" >&2
    exit 1
fi
echo "package-test: passed"
