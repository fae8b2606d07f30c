#!/usr/bin/env bash
# Runs every nsproxy test. Run it as root: the end-to-end tests create (and
# remove) their own network namespaces. Without root they skip with a reason;
# with NSPROXY_REQUIRE_ROOT=1 such a skip is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-features "$@"
