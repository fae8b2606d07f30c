#!/usr/bin/env bash
# Installs the Debian packages building and testing nsproxy needs, if missing.
# Idempotent; needs root to install anything.
set -euo pipefail

# command -> package
declare -A NEED=(
    [ip]=iproute2
    [cc]=gcc
    [kill]=procps
)
missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
[ -e /usr/include/stdio.h ] || missing+=(libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install a Rust toolchain (1.85 or newer, e.g. from https://rustup.rs)" >&2
    exit 1
fi
