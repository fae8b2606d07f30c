#!/usr/bin/env bash
# sctp-vm.sh - run a program as root inside a throwaway qemu VM that boots
# Debian's stock kernel with the sctp module loaded.
#
# nsproxy's SCTP tests need kernel SCTP, which CI containers and some
# hosts lack (socket() fails with EPROTONOSUPPORT). This boots
# linux-image-cloud-amd64 (downloaded once with apt-get, cached) under qemu
# with a minimal initramfs: busybox, the sctp module and its dependencies,
# the program with the shared libraries it needs, and any --file. The
# program's output is streamed to stdout; this script exits with the
# program's exit status.
#
# usage: scripts/sctp-vm.sh [options] PROGRAM [ARGS...]
#
#   -f, --file PATH        copy PATH into the VM at the same absolute path
#                          (repeatable; executables bring their libraries)
#   -e, --env NAME=VALUE   set a variable for the program (repeatable)
#   -t, --timeout SECONDS  limit for the whole VM run (default 300)
#       --prepare          only download and unpack the kernel, then exit
#   -h, --help
#
# As a cargo runner (the test binary is PROGRAM; cargo adds its arguments):
#   CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER="$PWD/scripts/sctp-vm.sh --file $PWD/target/debug/nsproxy" \
#       cargo test --test sctp_vm
#
# Inside the VM: SCTPVM=1 is set, `lo` is up in the initial namespace,
# /run/netns is an empty tmpfs, the tools are busybox's (no `ip netns`, but
# `unshare --net=FILE` and `nsenter --net=FILE`), and the program starts in
# the host's working directory if that exists in the VM (else in /).
# Variables RUST_*, CARGO_* and NSPROXY_* are passed through.
#
# Host packages: qemu-system-x86 busybox-static cpio kmod lz4 (and dpkg,
# libc-bin, which Debian always has). Needs `apt-get update` once, for the
# kernel download. Root is not needed.
#
# environment (optional):
#   SCTPVM_CACHE       cache directory (default /var/tmp/nsproxy-sctp-vm,
#                      about 170 MB per kernel)
#   SCTPVM_KERNEL_PKG  exact kernel package (default: what
#                      linux-image-cloud-amd64 depends on; the answer is
#                      remembered for a day: apt-cache costs ~2 s)
#   SCTPVM_ACCEL       auto (default) | kvm | tcg
#   SCTPVM_SMP         guest CPUs (default 2)
#   SCTPVM_MEM         guest RAM in MiB (default 384 + 3 x the initramfs)
#   SCTPVM_KEEP=1      keep the work directory (initramfs, console log)
#
# exit status: the program's; 124 if the VM timed out; 125 for a failure of
# the VM or of this script (the message says which).
set -euo pipefail

PROG=sctp-vm
die() { echo "$PROG: error: $*" >&2; exit 125; }
info() { echo "$PROG: $*" >&2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

TIMEOUT=${SCTPVM_TIMEOUT:-300}
PREPARE=0
FILES=()
ENVS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -f|--file) [ $# -ge 2 ] || die "$1 needs a path"; FILES+=("$2"); shift 2 ;;
        -e|--env) [ $# -ge 2 ] || die "$1 needs NAME=VALUE"
            [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants NAME=VALUE, got '$2'"
            ENVS+=("$2"); shift 2 ;;
        -t|--timeout) [ $# -ge 2 ] || die "$1 needs seconds"; TIMEOUT=$2; shift 2 ;;
        --prepare) PREPARE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "--timeout wants seconds, got '$TIMEOUT'"
if [ "$PREPARE" = 0 ]; then
    [ $# -ge 1 ] || { usage >&2; exit 125; }
    [ -f "$1" ] && [ -x "$1" ] || die "'$1' is not an executable file"
    PAYLOAD=$(readlink -f "$1"); shift
fi
T0=$(date +%s%N)
export PATH="$PATH:/usr/sbin:/sbin"

# ---------------------------------------------------------------- host tools
declare -A NEED=([qemu-system-x86_64]=qemu-system-x86 [busybox]=busybox-static [cpio]=cpio
    [modprobe]=kmod [depmod]=kmod [lz4]=lz4 [dpkg-deb]=dpkg [ldd]=libc-bin)
missing=()
for cmd in "${!NEED[@]}"; do command -v "$cmd" >/dev/null || missing+=("${NEED[$cmd]}"); done
if [ ${#missing[@]} -gt 0 ]; then
    die "missing host packages; install them with:
  apt-get update && apt-get install -y --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')"
fi

CACHE=${SCTPVM_CACHE:-/var/tmp/nsproxy-sctp-vm}
mkdir -p "$CACHE" || die "cannot create $CACHE"
exec 9>"$CACHE/.lock"
flock 9   # one preparation at a time; released before the VM starts

# ---------------------------------------------------------------- kernel
# $CACHE/kernel/PKG_VERSION/{vmlinux,kver,lib/modules/KVER}
unpack_kernel() { # DEB DIR
    local deb=$1 dir=$2 tmp kver off
    tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
    dpkg-deb -x "$deb" "$tmp/root" || die "dpkg-deb -x $deb failed"
    kver=$(ls "$tmp/root/lib/modules" | head -n1)
    [ -n "$kver" ] && [ -f "$tmp/root/boot/vmlinuz-$kver" ] || die "$deb holds no kernel"
    mkdir -p "$tmp/k/lib"
    mv "$tmp/root/lib/modules" "$tmp/k/lib/"
    echo "$kver" > "$tmp/k/kver"
    depmod -b "$tmp/k" "$kver" || die "depmod failed"
    # The cloud kernel's bzImage holds an LZ4-compressed ELF vmlinux with a
    # PVH entry point: qemu boots that directly, skipping the decompression
    # that is slow under emulation. Find the LZ4 frame and unpack it.
    for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$tmp/root/boot/vmlinuz-$kver" | cut -d: -f1 | head -5); do
        tail -c "+$((off + 1))" "$tmp/root/boot/vmlinuz-$kver" | lz4 -dc > "$tmp/k/vmlinux" 2>/dev/null || true
        [ "$(head -c 4 "$tmp/k/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && break
        rm -f "$tmp/k/vmlinux"
    done
    [ -f "$tmp/k/vmlinux" ] || cp "$tmp/root/boot/vmlinuz-$kver" "$tmp/k/vmlinuz"
    rm -rf "$dir"
    mv "$tmp/k" "$dir"
    rm -rf "$tmp"
}

resolve_kernel() {
    local memo="$CACHE/.kernel-of-${SCTPVM_KERNEL_PKG:-cloud-amd64}" pkg ver key tmp
    if [ -n "$(find "$memo" -mmin -1440 2>/dev/null)" ] && [ -f "$CACHE/kernel/$(cat "$memo")/kver" ]; then
        KDIR=$CACHE/kernel/$(cat "$memo"); return
    fi
    pkg=${SCTPVM_KERNEL_PKG:-$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}')}
    ver=$( [ -z "$pkg" ] || apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk '/^Version:/ {print $2; exit}')
    if [ -z "$pkg" ] || [ -z "$ver" ]; then
        key=$(ls -t "$CACHE/kernel" 2>/dev/null | head -n1)
        [ -n "$key" ] && [ -f "$CACHE/kernel/$key/kver" ] ||
            die "apt knows no linux-image-cloud-amd64 kernel and none is cached: run 'apt-get update' first"
        info "apt cannot resolve the kernel package; using the cached $key"
        KDIR=$CACHE/kernel/$key; return
    fi
    key="${pkg}_${ver}"
    if [ ! -f "$CACHE/kernel/$key/kver" ]; then
        info "downloading $pkg $ver (once; cached in $CACHE)"
        tmp=$(mktemp -d "$CACHE/.dl.XXXXXX")
        chmod 755 "$tmp"   # apt's download user must be able to write here
        (cd "$tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) ||
            die "apt-get download $pkg=$ver failed (run 'apt-get update'?)"
        mkdir -p "$CACHE/kernel"
        unpack_kernel "$tmp"/*.deb "$CACHE/kernel/$key"
        rm -rf "$tmp"
    fi
    echo "$key" > "$memo"
    KDIR=$CACHE/kernel/$key
}
resolve_kernel
KVER=$(cat "$KDIR/kver")
if [ "$PREPARE" = 1 ]; then info "kernel $KVER ready in $KDIR"; exit 0; fi

# ---------------------------------------------------------------- initramfs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sctp-vm.XXXXXX")
QEMU=
cleanup() {
    [ -z "$QEMU" ] || kill "$QEMU" 2>/dev/null || true
    if [ "${SCTPVM_KEEP:-0}" = 1 ]; then info "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# with_libs FILE DIR: copies the shared libraries FILE needs (and the loader).
with_libs() {
    local lib
    for lib in $(LC_ALL=C ldd "$1" 2>/dev/null | grep -o '/[^ ]*' || true); do
        [ -e "$2$lib" ] || { mkdir -p "$2$(dirname "$lib")" && cp -L "$lib" "$2$lib"; }
    done
}

# The guest's /init, a busybox shell script. Its last line reports the
# program's status with a per-run nonce, so the program's own output cannot
# fake it.
write_init() {
cat <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run/netns && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run/netns
chmod 1777 /tmp
. /vm/run.conf
while read -r ko required; do
    if ! out=$(insmod "/vm/modules/$ko" 2>&1); then
        echo "sctp-vm(guest): insmod $ko failed: $out"
        if [ "$required" = 1 ]; then echo "SCTPVM-EXIT-$NONCE=125"; poweroff -f; fi
    fi
done < /vm/modules/order
ip link set lo up
read -r up _ < /proc/uptime
echo "sctp-vm(guest): kernel $(uname -r) up after ${up}s; running the program"
cd "$HOST_PWD" 2>/dev/null || cd /
run_program
echo "SCTPVM-EXIT-$NONCE=$?"
poweroff -f
EOF
}

# The base archive (busybox, modules, /init) depends only on the kernel and
# this script; it is built once and cached beside the kernel.
BASE=$KDIR/base-$( { cat "$0"; stat -c %s "$(command -v busybox)"; } | sha256sum | cut -c1-12).cpio
if [ ! -f "$BASE" ]; then
    info "building the base initramfs for $KVER"
    rm -f "$KDIR"/base-*.cpio
    b=$WORK/base
    mkdir -p "$b"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,run,root,vm/modules}
    cp -L "$(command -v busybox)" "$b/bin/busybox"
    for applet in $("$b/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$b/bin/$applet"
    done
    # The load order of sctp and its dependencies (libcrc32c, udp_tunnel,
    # ...). Only sctp itself must load: an optional soft dependency such as
    # crc32c-intel fails on CPUs without SSE4.2.
    deps=$(modprobe -d "$KDIR" -S "$KVER" --show-depends sctp) || die "no sctp module in $KVER"
    n=$(grep -c '^insmod ' <<< "$deps")
    i=0
    while read -r word path _; do
        [ "$word" = insmod ] || continue
        i=$((i + 1))
        ko=$(basename "$path"); ko=${ko%.xz}; ko=${ko%.zst}
        case "$path" in
            *.xz) xz -dc "$path" ;;
            *.zst) zstd -qdc "$path" ;;
            *) cat "$path" ;;
        esac > "$b/vm/modules/$ko" || die "cannot unpack $path"
        echo "$ko $([ "$i" = "$n" ] && echo 1 || echo 0)" >> "$b/vm/modules/order"
    done <<< "$deps"
    write_init > "$b/init"
    chmod 755 "$b/init"
    printf '127.0.0.1 localhost\n::1 localhost\n' > "$b/etc/hosts"
    # nobody: the account a split nsproxy's relay runs as.
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$b/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' > "$b/etc/group"
    (cd "$b" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$BASE.tmp" ||
        die "cpio failed"
    mv "$BASE.tmp" "$BASE"
fi
flock -u 9

# The per-run archive: the program, its libraries, --file paths, run.conf.
p=$WORK/run
mkdir -p "$p/vm"
cp -L "$PAYLOAD" "$p/vm/program"
with_libs "$PAYLOAD" "$p"
for f in "${FILES[@]}"; do
    [ -e "$f" ] || die "--file $f does not exist"
    f=$(readlink -f "$f")
    mkdir -p "$p$(dirname "$f")"
    cp -a -L "$f" "$p$f"
    [ ! -f "$f" ] || [ ! -x "$f" ] || with_libs "$f" "$p"
done
NONCE=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
q() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
{
    echo "NONCE=$NONCE"
    echo "HOST_PWD=$(q "$PWD")"
    echo "export SCTPVM=1"
    while IFS= read -r v; do
        [[ "$v" =~ ^(RUST_|CARGO_|NSPROXY_) ]] && echo "export $v=$(q "${!v}")"
    done < <(compgen -e)
    for kv in "${ENVS[@]}"; do echo "export ${kv%%=*}=$(q "${kv#*=}")"; done
    printf 'run_program() { /vm/program'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    printf '; }\n'
} > "$p/vm/run.conf"
(cd "$p" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$WORK/run.cpio" ||
    die "cpio failed"
# The kernel unpacks concatenated newc archives in order.
cat "$BASE" "$WORK/run.cpio" > "$WORK/initrd"

# ---------------------------------------------------------------- qemu
# KVM only where it is real hardware virtualization: a /dev/kvm from PVM
# (kvm_pvm, seen on some cloud VMs) runs only PVM guest kernels, and a stock
# kernel crawls and dies there.
case "${SCTPVM_ACCEL:-auto}" in
    auto) if [ -w /dev/kvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -d /sys/module/kvm_pvm ]; then
              ACCEL=kvm; else ACCEL=tcg; fi ;;
    kvm|tcg) ACCEL=$SCTPVM_ACCEL ;;
    *) die "SCTPVM_ACCEL must be auto, kvm or tcg" ;;
esac
if [ "$ACCEL" = kvm ]; then CPU=(-accel kvm -cpu host); else CPU=(-accel tcg -cpu max); fi
SMP=${SCTPVM_SMP:-2}
mb=$(( $(stat -c %s "$WORK/initrd") >> 20 ))
# The initramfs stays in RAM (twice while it unpacks); each SCTP association
# whose ends both offer 65535 streams costs about 2 MiB per socket.
MEM=${SCTPVM_MEM:-$(( 384 + 3 * mb ))}
KERNEL=$KDIR/vmlinux
[ -f "$KERNEL" ] || KERNEL=$KDIR/vmlinuz
CONSOLE=$WORK/console
: > "$CONSOLE"
info "booting $KVER (accel=$ACCEL, cpus=$SMP, mem=${MEM}M, timeout ${TIMEOUT}s): $(basename "$PAYLOAD") $*"
T1=$(date +%s%N)
# -M pc, not microvm: without HPET and ACPI PM timer, TSC calibration under
# TCG sometimes fails and the boot hangs. `quiet`: the serial console is
# slow under emulation. A panic or oops ends the VM (no exit line: 125).
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 -M pc "${CPU[@]}" -m "$MEM" -smp "$SMP" \
    -nodefaults -no-user-config -display none -vga none -net none -monitor none \
    -serial "file:$CONSOLE" -no-reboot -kernel "$KERNEL" -initrd "$WORK/initrd" \
    -append 'console=ttyS0 quiet panic=-1 oops=panic rdinit=/init' \
    </dev/null >"$WORK/qemu.log" 2>&1 &
QEMU=$!
tail -s 0.1 -n +1 -f --pid="$QEMU" "$CONSOLE" | tr -d '\r' &
TAIL=$!
set +e
wait "$QEMU"
QRC=$?
wait "$TAIL"
set -e
QEMU=
T2=$(date +%s%N)
TIMES=$(awk -v a="$T0" -v b="$T1" -v c="$T2" 'BEGIN { printf "%.1fs: host %.1fs, VM %.1fs", (c-a)/1e9, (b-a)/1e9, (c-b)/1e9 }')
RC=$(tr -d '\r' < "$CONSOLE" | grep -ao "SCTPVM-EXIT-$NONCE=[0-9]*" | tail -n1 | cut -d= -f2 || true)
if [ -n "$RC" ]; then
    info "program exited with status $RC ($TIMES)"
    exit "$RC"
fi
sed 's/^/qemu: /' "$WORK/qemu.log" >&2
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
    info "VM timed out after ${TIMEOUT}s"
    exit 124
fi
info "the VM ended (qemu status $QRC) without the program's exit status: kernel panic? ($TIMES)"
exit 125
