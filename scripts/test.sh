#!/usr/bin/env bash
# Runs every nsproxy test. Run it as root: the end-to-end tests create (and
# remove) their own network namespaces. Without root they skip with a reason;
# with NSPROXY_REQUIRE_ROOT=1 such a skip is a failure.
#
# Then a two-minute soak (scripts/soak.sh: traffic, namespace churn, reloads
# and upstream restarts, with leak and loss checks).
#
# Then the SCTP end-to-end tests (tests/sctp_vm.rs) run again inside a qemu
# VM that boots Debian's stock kernel with the sctp module
# (scripts/sctp-vm.sh), because the host kernel may have no SCTP; there they
# may not skip. Arguments go to the first, host run only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-features "$@"

echo "== soak test, two minutes (scripts/soak.sh --duration 2m)"
scripts/soak.sh --duration 2m

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
