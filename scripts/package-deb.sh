#!/usr/bin/env bash
# Builds the Debian package target/debian/nsproxy_VERSION-1_ARCH.deb (with
# cargo-deb, from [package.metadata.deb] in Cargo.toml) and checks it with
# lintian: an error fails the build, warnings are printed. The last line of
# output is the package's path.
#
#   scripts/package-deb.sh
#
# Needs cargo; installs cargo-deb (the pinned version below, with cargo) and
# lintian (with apt, as root) when missing. What goes into the package that is
# not in the repository is generated into target/package-deb/ first: the man
# pages and the bash, zsh and fish completions (from the CLI definition,
# `nsproxy __generate`), and the systemd unit with the package's paths (from
# contrib/nsproxy.service).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb $CARGO_DEB_VERSION" ]; then
    echo "package-deb: installing cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi
if ! command -v lintian >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "package-deb: lintian is missing (apt-get install lintian)" >&2; exit 1; }
    echo "package-deb: installing lintian"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian ||
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends lintian; }
fi

cargo build --release --locked
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target/release/nsproxy"

# Cargo.toml's assets name these paths, relative to the repository (not to
# cargo's target directory, which may be elsewhere).
gen=target/package-deb
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions" "$gen/systemd"
"$bin" __generate man "$gen/man"
"$bin" __generate completions "$gen/completions"

# The unit: contrib/nsproxy.service (the one for a manual install) with the
# package's paths, its install notes replaced, and the man page named.
unit="$gen/systemd/nsproxy.service"
{
    echo "# systemd unit of the nsproxy Debian package. The config is"
    echo "# /etc/nsproxy/nsproxy.toml; edit it, then: systemctl enable --now nsproxy"
    echo "# Reload the config:  systemctl reload nsproxy   (SIGHUP; an invalid config is"
    echo "# rejected and the running one keeps serving: see \`journalctl -u nsproxy\`)."
    sed -n '/^\[Unit\]/,$p' contrib/nsproxy.service |
        sed -e 's|/usr/local/bin/nsproxy|/usr/bin/nsproxy|g' \
            -e 's|/etc/nsproxy\.toml|/etc/nsproxy/nsproxy.toml|g' \
            -e 's|^Description=.*|&\nDocumentation=man:nsproxy(1) file:///usr/share/doc/nsproxy/README.md|'
} >"$unit"
if grep -n '/usr/local\|/etc/nsproxy\.toml' "$unit"; then
    echo "package-deb: $unit still names a path of the manual install (above): update the substitutions in $0" >&2
    exit 1
fi
grep -q '^ExecStart=/usr/bin/nsproxy run --config /etc/nsproxy/nsproxy.toml$' "$unit" || {
    echo "package-deb: $unit has no ExecStart=/usr/bin/nsproxy run --config /etc/nsproxy/nsproxy.toml (contrib/nsproxy.service changed?)" >&2
    exit 1
}

# cargo-deb prints the package's path last.
deb=$(cargo deb --no-build --locked | tail -n 1)
[ -f "$deb" ] || { echo "package-deb: cargo deb named no package (got: $deb)" >&2; exit 1; }

echo "== lintian $deb"
lintian --fail-on error --info "$deb" || {
    echo "package-deb: lintian reports an error (E: above) in $deb" >&2
    exit 1
}
echo "$deb"
