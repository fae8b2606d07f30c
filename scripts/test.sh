#!/usr/bin/env bash
# Runs every nsproxy test. Run it as root: the end-to-end tests create (and
# remove) their own network namespaces. Without root they skip with a reason;
# with NSPROXY_REQUIRE_ROOT=1 such a skip is a failure.
#
# Then the library's unit tests again as user nobody, without capabilities:
# they must not need root.
#
# Then the Kubernetes manifests are validated offline (scripts/k8s-validate.sh)
# and the container image is built and run as the DaemonSet runs it
# (scripts/container-test.sh: podman, host network, /run/netns rslave).
#
# Then a two-minute soak (scripts/soak.sh: traffic, namespace churn, reloads
# and upstream restarts, with leak and loss checks).
#
# Then the Debian package is built and installed into a clean Debian root,
# where the daemon runs from the unit's command line (scripts/package-test.sh).
#
# Then the SCTP end-to-end tests (tests/sctp_vm.rs) run again inside a qemu
# VM that boots Debian's stock kernel with the sctp module
# (scripts/sctp-vm.sh), because the host kernel may have no SCTP; there they
# may not skip. Arguments go to the first, host run only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-features "$@"

echo "== library unit tests as an unprivileged user (nobody)"
# They decide without root or sockets (the reconciler, config, status), so
# they must pass as a user who can do neither. Run as root, this drops to
# nobody with no groups and no capabilities; run as anyone else, the run
# above already was unprivileged and this repeats it.
lib_bin=$(cargo test --all-features --lib --no-run --message-format=json |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
[ -n "$lib_bin" ] || { echo "test.sh: cargo named no library test binary" >&2; exit 1; }
unprivileged=()
if [ "$(id -u)" = 0 ]; then
    unprivileged=(setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --)
fi
# nobody needs to reach the binary (every directory above it searchable) and
# the working directory; say so instead of failing obscurely.
"${unprivileged[@]}" test -x "$lib_bin" || {
    echo "test.sh: $lib_bin is not executable by nobody (check the permissions of target/ and its parents)" >&2
    exit 1
}
"${unprivileged[@]}" test -r . -a -x . || {
    echo "test.sh: nobody cannot enter $PWD" >&2
    exit 1
}
unit_log=$(mktemp)
# The few unit tests that need root (the broker, dropping privileges) ran
# as root above; here they skip, as they would for any user.
if ! HOME=/nonexistent env -u NSPROXY_REQUIRE_ROOT "${unprivileged[@]}" "$lib_bin" 2>&1 | tee "$unit_log"; then
    rm -f "$unit_log"
    echo "test.sh: the library's unit tests failed as nobody" >&2
    exit 1
fi
ran=$(sed -n 's/^test result: ok\. \([0-9]*\) passed.*/\1/p' "$unit_log")
rm -f "$unit_log"
echo "test.sh: ${ran:-?} library unit tests passed as nobody (uid 65534, no capabilities)"

echo "== Kubernetes manifests, offline (scripts/k8s-validate.sh)"
scripts/k8s-validate.sh

echo "== the container image, run as the DaemonSet runs it (scripts/container-test.sh)"
scripts/container-test.sh

echo "== soak test, two minutes (scripts/soak.sh --duration 2m)"
scripts/soak.sh --duration 2m

echo "== the Debian package, installed and run in a clean root (scripts/package-test.sh)"
scripts/package-test.sh

echo "== SCTP end-to-end tests in a VM (scripts/sctp-vm.sh)"
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The test binary runs in the VM; it starts the nsproxy binary, which the
# harness copies in at the same path.
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/sctp-vm.sh --file $target/debug/nsproxy" \
    cargo test --all-features --test sctp_vm 2>&1 | tee "$log"
# cargo's status is the VM's; this also makes sure the VM really ran them.
grep -q '^sctp-vm: program exited with status 0' "$log" || {
    echo "test.sh: the SCTP tests did not run in the VM" >&2
    exit 1
}
