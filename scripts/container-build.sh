#!/usr/bin/env bash
# Builds nsproxy's container image from a root made here: the release binary,
# the shared libraries ldd names for it (glibc), /etc/passwd and /etc/group
# with root and nobody (the relay's account when nsproxy splits), and empty
# mount points. No base image and no registry: contrib/container/Containerfile
# is FROM scratch.
#
#   scripts/container-build.sh [--tag NAME] [--bin PATH]
#
# --tag   the image name (default localhost/nsproxy:VERSION, VERSION from Cargo.toml)
# --bin   use this nsproxy binary instead of building target/release/nsproxy
#
# Needs podman (apt-get install podman runc). Prints the image name last.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
tag="localhost/nsproxy:$version"
bin=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        *) echo "container-build.sh: unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
done
command -v podman >/dev/null || {
    echo "container-build.sh: podman is not installed (apt-get install podman runc)" >&2
    exit 1
}
if [ -z "$bin" ]; then
    cargo build --release --locked --bin nsproxy
    bin=target/release/nsproxy
fi
[ -x "$bin" ] || { echo "container-build.sh: $bin is not an executable" >&2; exit 1; }

ctx=target/container
rm -rf "$ctx"
root="$ctx/rootfs"
mkdir -p "$root/usr/bin" "$root/etc/nsproxy" "$root/run/netns" "$root/run/nsproxy" \
    "$root/proc" "$root/sys" "$root/dev" "$root/tmp"
chmod 1777 "$root/tmp"
# As on Debian: configs name /var/run/netns/... (Kubernetes nodes' CNI paths).
mkdir -p "$root/var"
ln -s ../run "$root/var/run"
install -m 0755 "$bin" "$root/usr/bin/nsproxy"
# Each library at the path the dynamic linker looks for it, the loader
# included (ldd prints it without "=>").
ldd "$bin" | awk '/=> \// { print $3 } /^[ \t]*\/.* \(0x/ { print $1 }' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# Debian's /lib64 and /lib are links into /usr: the loader is found either way.
cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
printf 'passwd: files\ngroup: files\n' > "$root/etc/nsswitch.conf"
cp contrib/container/Containerfile "$ctx/Containerfile"

podman --runtime runc build --quiet --tag "$tag" "$ctx" >/dev/null
size=$(du -sh "$root" | cut -f1)
echo "container-build.sh: built $tag (root: $size)" >&2
echo "$tag"
