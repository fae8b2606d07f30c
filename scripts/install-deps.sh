#!/usr/bin/env bash
# Installs the Debian packages building and testing nsproxy needs, if missing.
# Idempotent; needs root to install anything.
set -euo pipefail

# command -> package
declare -A NEED=(
    [ip]=iproute2
    [cc]=gcc
    [kill]=procps
    # The tests: setpriv (util-linux) runs nsproxy without CAP_SYS_ADMIN;
    # nsenter (util-linux) and ss (iproute2) look at sockets in
    # deleted namespaces; promtool validates the metrics.
    [nsenter]=util-linux
    [setpriv]=util-linux
    [promtool]=prometheus
    # The status page's tests load it in headless Chromium.
    [chromium]=chromium
    # The SCTP tests' VM (scripts/sctp-vm.sh): qemu, a busybox initramfs,
    # the kernel's module tools, and lz4 for its kernel image.
    [qemu-system-x86_64]=qemu-system-x86
    [busybox]=busybox-static
    [cpio]=cpio
    [modprobe]=kmod
    [lz4]=lz4
    # The Debian package (scripts/package-deb.sh, package-test.sh): lintian
    # checks it, mmdebstrap makes the clean root it is installed into.
    [lintian]=lintian
    [mmdebstrap]=mmdebstrap
    # The container image and its test (scripts/container-build.sh,
    # container-test.sh): podman with the runc runtime; python3 for the
    # test's upstream and for kubernetes-validate (scripts/k8s-validate.sh).
    [podman]=podman
    [runc]=runc
    [python3]=python3
)
missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
# kubernetes-validate goes into a venv: Debian's python3 needs python3-venv.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip' 2>/dev/null; then
    missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The VM's kernel comes from apt (linux-image-cloud-amd64): apt needs its
# package lists, unless a kernel is cached already.
if [ -z "$(ls /var/tmp/nsproxy-sctp-vm/kernel 2>/dev/null)" ] &&
    ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    echo "install-deps: apt-get update (for the SCTP test VM's kernel)"
    apt-get update -q
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install a Rust toolchain (1.85 or newer, e.g. from https://rustup.rs)" >&2
    exit 1
fi
