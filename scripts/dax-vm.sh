#!/usr/bin/env bash
# dax-vm.sh — run a host command inside a QEMU guest that has a real
# device-dax namespace (/dev/dax0.0) backed by an emulated NVDIMM.
#
# Usage: scripts/dax-vm.sh [OPTIONS] [--] CMD [ARGS...]
#
#   --timeout SECS     wall-clock limit for the guest (default 300)
#   --env NAME=VALUE   set a variable for CMD (repeatable); --env NAME passes
#                      the host's value through
#   --smp N            guest CPUs (default 1; TCG, so each is slow)
#   -v, --verbose      also stream the guest kernel console to stderr
#
# The guest boots a stock Debian kernel (downloaded, never installed) with a
# tiny busybox initramfs, mounts the host's root filesystem read-only over 9p
# under a tmpfs overlay (so the guest can write anywhere, e.g. /tmp, and the
# writes are thrown away), chroots into it, cds to the host's $PWD and runs
# CMD with PERCPU_REF_DAX=/dev/dax0.0 (and the host's PATH and HOME).  CMD's
# stdout+stderr are streamed to this script's stdout; progress lines
# ("dax-vm: [elapsed] ...") go to stderr.
#
# Exit status: CMD's exit status (128+N if killed by signal N), 124 on
# timeout, 125 when the guest did not report one (kernel panic, guest setup
# failure), 2 on usage errors, 1 on host-side setup errors.
#
# Everything slow is cached in ${PERCPU_REF_VM_CACHE:-$HOME/.cache/percpu-ref-dax-vm}:
# the unpacked kernel package, its uncompressed vmlinux, the initramfs (keyed
# on kernel version + hash of this script) and the sparse NVDIMM image (whose
# namespace labels persist, so the namespace is created only once).
# See DESIGN.md section 7 for how each fact below was established.

set -euo pipefail
# Functions run inside $(...) below must stop at the first error too.
shopt -s inherit_errexit

SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
readonly SCRIPT_PATH
readonly CACHE_DIR="${PERCPU_REF_VM_CACHE:-$HOME/.cache/percpu-ref-dax-vm}"
readonly NVDIMM_SIZE=1G
readonly LABEL_SIZE=128K
START_TIME="$EPOCHREALTIME"

# ---------------------------------------------------------------------------
# helpers

log() {
    local now elapsed
    now="$EPOCHREALTIME"
    elapsed="$(awk -v a="$START_TIME" -v b="$now" 'BEGIN { printf "%6.2f", b - a }')"
    printf 'dax-vm: [%ss] %s\n' "$elapsed" "$*" >&2
}

die() {
    local code="$1"
    shift
    log "ERROR: $*"
    exit "$code"
}

usage() {
    local code="${1:-2}"
    # The header comment, from line 2 up to the cache paragraph, is the help.
    if ((code == 0)); then
        sed -n '2,/^# Everything slow/{/^# Everything slow/q;s/^# \{0,1\}//;p}' "$SCRIPT_PATH"
    else
        sed -n '2,/^# Everything slow/{/^# Everything slow/q;s/^# \{0,1\}//;p}' "$SCRIPT_PATH" >&2
    fi
    exit "$code"
}

have() { command -v "$1" >/dev/null 2>&1; }

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# ---------------------------------------------------------------------------
# argument parsing

TIMEOUT=300
SMP=1
VERBOSE=0
GUEST_ENV=()
while (($#)); do
    case "$1" in
        --timeout)
            # 0 would mean "no limit" to timeout(1): refuse it.
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "dax-vm: --timeout needs a number of seconds" >&2; usage 2; }
            TIMEOUT="$2"
            shift 2
            ;;
        --timeout=*)
            TIMEOUT="${1#*=}"
            [[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || { echo "dax-vm: --timeout needs a number of seconds" >&2; usage 2; }
            shift
            ;;
        --env)
            [[ $# -ge 2 ]] || { echo "dax-vm: --env needs NAME=VALUE or NAME" >&2; usage 2; }
            GUEST_ENV+=("$2")
            shift 2
            ;;
        --env=*)
            GUEST_ENV+=("${1#*=}")
            shift
            ;;
        --smp)
            [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || { echo "dax-vm: --smp needs a CPU count" >&2; usage 2; }
            SMP="$2"
            shift 2
            ;;
        -v | --verbose)
            VERBOSE=1
            shift
            ;;
        -h | --help)
            usage 0
            ;;
        --)
            shift
            break
            ;;
        -*)
            echo "dax-vm: unknown option: $1" >&2
            usage 2
            ;;
        *)
            break
            ;;
    esac
done
(($# >= 1)) || { echo "dax-vm: no command given" >&2; usage 2; }
CMD=("$@")

[[ "$(id -u)" == 0 ]] || die 2 "must run as root (installs packages with apt-get)"

# ---------------------------------------------------------------------------
# 1. host packages (idempotent; nothing is done when the tools are there)

APT_UPDATED=0
APT_LOG="$CACHE_DIR/apt.log"
# Runs an apt command with its chatter in $APT_LOG; shows the log on failure.
apt_quiet() {
    if ! "$@" >>"$APT_LOG" 2>&1; then
        log "'$*' failed; last lines of $APT_LOG:"
        tail -n 20 "$APT_LOG" >&2
        return 1
    fi
}
apt_update_once() {
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt_quiet apt-get update -o DPkg::Lock::Timeout=300
        APT_UPDATED=1
    fi
}

# No bookworm-backports source exists by default.  QEMU from bookworm-backports
# (10.0.x) matches the preinstalled qemu-utils; add the suite using the same
# mirror and keyring as the existing bookworm source.
ensure_backports_source() {
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local uri="" keyring=""
    local f
    # deb822 sources: take the stanza whose Suites list contains "bookworm".
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        read -r uri keyring < <(awk '
            function flush() { if (has && uri != "") { print uri, key; found = 1; exit } has = 0; uri = ""; key = "" }
            /^[[:space:]]*$/ { flush(); next }
            /^Suites:/   { for (i = 2; i <= NF; i++) if ($i == "bookworm") has = 1 }
            /^URIs:/     { uri = $2 }
            /^Signed-By:/ { key = $2 }
            END { if (!found) flush() }' "$f") || true
        [[ -n "$uri" ]] && break
    done
    # One-line format: "deb [signed-by=K] URI bookworm main".
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        read -r uri keyring < <(awk '
            $1 == "deb" {
                key = ""; i = 2
                if ($2 ~ /^\[/) { for (; i <= NF; i++) { if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\].*/, "", key) } if ($i ~ /\]$/) { i++; break } } }
                if ($(i + 1) == "bookworm") { print $i, key; exit }
            }' /etc/apt/sources.list) || true
    fi
    uri="${uri:-http://deb.debian.org/debian}"
    keyring="${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}"
    log "adding bookworm-backports apt source ($uri)"
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<EOF
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: $keyring
EOF
    APT_UPDATED=0
    apt_update_once
}

apt_install() {
    # Retry once after apt-get update: the package lists may be missing/stale.
    if ! apt_quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "$@"; then
        APT_UPDATED=0
        apt_update_once
        apt_quiet env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 "$@"
    fi
}

ensure_packages() {
    local missing=()
    have ndctl || missing+=(ndctl)
    have daxctl || missing+=(daxctl)
    { have depmod && have modprobe; } || missing+=(kmod)
    have cpio || missing+=(cpio)
    have xz || missing+=(xz-utils)
    # The initramfs needs a statically linked busybox (no libc in there).
    pkg_installed busybox-static || missing+=(busybox-static)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    if ! have qemu-system-x86_64; then
        ensure_backports_source
        log "installing qemu-system-x86 from bookworm-backports"
        # --no-install-recommends: otherwise it drags in GUI/spice/opengl.
        apt_install -t bookworm-backports qemu-system-x86
    fi
}

# ---------------------------------------------------------------------------
# 2. kernel: download the current Debian image package, unpack, never install

# Prints the directory of an unpacked kernel package (with vmlinux, the
# modules and modules.dep) on stdout.
ensure_kernel() {
    local kdir pkg
    mkdir -p "$CACHE_DIR/kernel"
    # Reuse any kernel already unpacked (newest first): rebuild only when
    # missing.  PERCPU_REF_VM_KERNEL_PKG forces a specific package.
    if [[ -n "${PERCPU_REF_VM_KERNEL_PKG:-}" ]]; then
        pkg="$PERCPU_REF_VM_KERNEL_PKG"
    else
        kdir="$(find "$CACHE_DIR/kernel" -mindepth 2 -maxdepth 2 -name .complete -printf '%h\n' 2>/dev/null | sort -V | tail -n 1)"
        if [[ -n "$kdir" ]]; then
            printf '%s\n' "$kdir"
            return 0
        fi
        # linux-image-amd64 is a metapackage; its dependency names the current
        # image package (it changes with security updates).
        pkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')" || true
        if [[ -z "$pkg" ]]; then
            apt_update_once
            pkg="$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
        fi
    fi
    [[ -n "$pkg" ]] || die 1 "cannot resolve the linux-image-amd64 package"
    kdir="$CACHE_DIR/kernel/$pkg"
    if [[ -f "$kdir/.complete" ]]; then
        printf '%s\n' "$kdir"
        return 0
    fi

    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/kernel/.tmp.XXXXXX")"
    log "downloading $pkg (apt-get download; not installed)"
    # APT::Sandbox::User=root: _apt cannot enter $HOME (only a warning).
    if ! (cd "$tmp" && apt_quiet apt-get download -o APT::Sandbox::User=root "$pkg"); then
        # Stale lists may name a package the mirror no longer has.
        APT_UPDATED=0
        apt_update_once
        if [[ -z "${PERCPU_REF_VM_KERNEL_PKG:-}" ]]; then
            pkg="$(apt-cache depends linux-image-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')"
            kdir="$CACHE_DIR/kernel/$pkg"
        fi
        (cd "$tmp" && apt_quiet apt-get download -o APT::Sandbox::User=root "$pkg")
    fi
    log "unpacking $pkg"
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$tmp/root"
    rm -f "$tmp"/*.deb

    local kver vmlinuz
    kver="$(ls "$tmp/root/lib/modules")"
    [[ -n "$kver" && "$kver" != *$'\n'* ]] || die 1 "unexpected module dirs in $pkg: $kver"
    vmlinuz="$tmp/root/boot/vmlinuz-$kver"
    [[ -f "$vmlinuz" ]] || die 1 "no vmlinuz in $pkg"

    # The package ships no modules.dep (it is generated at install time).
    depmod -b "$tmp/root" "$kver"

    # Only the compressed bzImage (vmlinuz) is shipped.  The uncompressed ELF
    # vmlinux carries the Xen PVH entry note, so QEMU boots it directly (no
    # real-mode setup, no in-guest decompression under slow TCG): about twice
    # as fast.  The bzImage payload is an xz stream; find its magic and
    # decompress just that stream (--single-stream ignores trailing data).
    local off
    off="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1)" || true
    if [[ -n "$off" ]]; then
        tail -c +"$((off + 1))" "$vmlinuz" | xz -dc --single-stream >"$tmp/vmlinux" 2>/dev/null || true
    fi
    if [[ "$(head -c 4 "$tmp/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' ')" != "7f454c46" ]]; then
        log "warning: could not extract an ELF vmlinux; booting vmlinuz (slower)"
        rm -f "$tmp/vmlinux"
        cp "$vmlinuz" "$tmp/vmlinux"
    fi
    printf '%s\n' "$kver" >"$tmp/kver"
    touch "$tmp/.complete"
    rm -rf "$kdir"
    mv "$tmp" "$kdir"
    printf '%s\n' "$kdir"
}

# ---------------------------------------------------------------------------
# 3. initramfs: static busybox + the needed modules + /init

# Modules, in load order (DESIGN.md 7).  device_dax is required: without it
# there is no /dev/dax0.0 character device.  "nfit" is the ACPI NFIT driver
# (the module is nfit.ko, not acpi_nfit).
readonly TOP_MODULES=(libnvdimm nfit nd_btt nd_pmem dax_pmem device_dax
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    9pnet 9pnet_virtio netfs fscache 9p overlay)

# The guest's /init (busybox sh).  Kept in this script so that the script
# hash used as the initramfs cache key covers it.
write_guest_init() {
    cat >"$1" <<'GUEST_INIT'
#!/bin/busybox sh
# PID 1 of the dax-vm guest.  Anything that goes wrong ends in poweroff
# without an exit-code file, which the host reports as exit code 125.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

OUT=/mnt/out
glog() {
    read -r up _ </proc/uptime
    echo "dax-vm: [guest ${up}s] $*" >>"$OUT/output" 2>/dev/null
    echo "dax-vm: [guest ${up}s] $*" >/dev/console
}
halt_now() {
    sync
    poweroff -f
    sleep 5
}
fail() {
    echo "dax-vm: guest setup failed: $*" >/dev/console
    echo "dax-vm: guest setup failed: $*" >>"$OUT/output" 2>/dev/null
    halt_now
}

# modules.list holds the insmod order resolved on the host.
while read -r m; do
    insmod "/modules/$m" || fail "insmod $m"
done </modules.list

# Writable 9p share for the command script, its output and its exit code.
# msize: larger 9p messages make reading big test binaries much faster.
mkdir -p "$OUT" /mnt/lower /mnt/rw /mnt/root
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$OUT" || fail "mount out share"

# The host root, read-only, under a tmpfs overlay: the guest may write
# anywhere (/tmp, target dirs, ...), the writes live in guest RAM only.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro hostroot /mnt/lower || fail "mount host root"
mount -t tmpfs -o mode=0755 rw /mnt/rw || fail "mount tmpfs"
mkdir -p /mnt/rw/upper /mnt/rw/work
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /mnt/root || fail "mount overlay"

# The host's /proc, /sys, /dev, /run seen through 9p are meaningless here:
# mount the guest's own on top.
R=/mnt/root
mkdir -p "$R/proc" "$R/sys" "$R/dev" "$R/run"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t devtmpfs devtmpfs "$R/dev"
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts devpts "$R/dev/pts"
mount -t tmpfs -o mode=1777 shm "$R/dev/shm"
mount -t tmpfs -o mode=0755 run "$R/run"
mkdir -p "$R/run/dax-vm"
mount --move "$OUT" "$R/run/dax-vm" || fail "move out share"
OUT="$R/run/dax-vm"

# ndctl/daxctl come from the host root (chroot), so no libraries are needed
# in the initramfs.  Any ndctl command first waits for libnvdimm's
# asynchronous probing, so the namespace state seen here is settled.
nd() { chroot "$R" /usr/bin/ndctl "$@"; }
if nd list -N 2>/dev/null | grep -q '"chardev":"dax0.0"'; then
    # The namespace exists (labels persist in the image): give devtmpfs a
    # moment to show the node.
    i=0
    while [ ! -e /dev/dax0.0 ] && [ "$i" -lt 50 ]; do
        sleep 0.1
        i=$((i + 1))
    done
fi
if [ ! -e /dev/dax0.0 ]; then
    glog "creating the devdax namespace"
    # init-labels refuses to touch an enabled region: disable it first.
    # -f: also reinitialise labels left over from an older layout.
    nd disable-region all >>"$OUT/output" 2>&1 || fail "ndctl disable-region"
    nd init-labels -f all >>"$OUT/output" 2>&1 || fail "ndctl init-labels"
    nd enable-region all >>"$OUT/output" 2>&1 || fail "ndctl enable-region"
    # -a 2M: 2 MiB alignment, so mappings can use huge pages.
    nd create-namespace -m devdax -a 2M >/dev/null 2>>"$OUT/output" || fail "ndctl create-namespace"
else
    glog "devdax namespace already present (labels persist in the image)"
fi
[ -c /dev/dax0.0 ] || fail "/dev/dax0.0 missing after namespace setup"

{
    echo "dax-vm: ndctl list -N:"
    nd list -N
    echo "dax-vm: dax0.0 size=$(cat /sys/bus/dax/devices/dax0.0/size) align=$(cat /sys/bus/dax/devices/dax0.0/align)"
    ls -l /dev/dax0.0
} >>"$OUT/output" 2>&1

glog "running command"
echo "----------------------------------------------------------------------" >>"$OUT/output"
rc=0
chroot "$R" /bin/bash /run/dax-vm/run.sh </dev/null >>"$OUT/output" 2>&1 || rc=$?
echo "$rc" >"$OUT/exit-code.tmp" && mv "$OUT/exit-code.tmp" "$OUT/exit-code"
glog "command exited with $rc"
halt_now
GUEST_INIT
    chmod 0755 "$1"
}

# Prints the initramfs path on stdout.
ensure_initramfs() {
    local kdir="$1" kver hash img
    kver="$(cat "$kdir/kver")"
    hash="$(sha256sum "$SCRIPT_PATH" | cut -c1-12)"
    img="$CACHE_DIR/initramfs-$kver-$hash.cpio"
    if [[ -f "$img" ]]; then
        printf '%s\n' "$img"
        return 0
    fi
    log "building initramfs for $kver"
    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/.initramfs.XXXXXX")"
    mkdir -p "$tmp/root/bin" "$tmp/root/modules" "$tmp/root/proc" "$tmp/root/sys" "$tmp/root/dev" "$tmp/root/mnt"
    cp /bin/busybox "$tmp/root/bin/busybox"
    write_guest_init "$tmp/root/init"

    # Resolve dependencies and order with modprobe itself.  -C /dev/null:
    # ignore the host's /etc/modprobe.d, where ndctl's nvdimm-security.conf
    # turns libnvdimm into an "install" rule that --show-depends would print
    # instead of the module path.
    local m line path seen=" "
    for m in "${TOP_MODULES[@]}"; do
        while read -r line; do
            case "$line" in
                insmod\ *)
                    path="${line#insmod }"
                    path="${path%% *}"
                    [[ "$seen" == *" $path "* ]] && continue
                    seen+="$path "
                    local base
                    base="$(basename "$path")"
                    case "$base" in
                        # busybox insmod cannot read compressed modules.
                        *.ko.xz) xz -dc "$path" >"$tmp/root/modules/${base%.xz}"; base="${base%.xz}" ;;
                        *.ko.zst) zstd -qdc "$path" >"$tmp/root/modules/${base%.zst}"; base="${base%.zst}" ;;
                        *) cp "$path" "$tmp/root/modules/$base" ;;
                    esac
                    printf '%s\n' "$base" >>"$tmp/root/modules.list"
                    ;;
                builtin\ *) ;;
                FAILED\ *) die 1 "modprobe could not resolve ${line#FAILED }" ;;
                *) die 1 "unexpected modprobe output for $m: $line" ;;
            esac
        done < <(modprobe -C /dev/null -d "$kdir/root" -S "$kver" --show-depends "$m" || echo "FAILED $m")
    done
    # Process substitution hides modprobe's exit status: check the result.
    for m in device_dax nfit 9p overlay virtio_pci; do
        grep -qx "$m.ko" "$tmp/root/modules.list" 2>/dev/null || die 1 "module $m missing from the initramfs"
    done

    # Uncompressed cpio: nothing to decompress in the (slow, emulated) guest.
    (cd "$tmp/root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$tmp/initramfs.cpio"
    # Drop initramfs images built by older versions of this script.
    find "$CACHE_DIR" -maxdepth 1 -name 'initramfs-*.cpio' -delete
    mv "$tmp/initramfs.cpio" "$img"
    rm -rf "$tmp"
    printf '%s\n' "$img"
}

# ---------------------------------------------------------------------------
# 4. NVDIMM backing file

ensure_nvdimm() {
    local img="$CACHE_DIR/nvdimm.img"
    if [[ ! -f "$img" ]]; then
        log "creating sparse $NVDIMM_SIZE NVDIMM image"
        # Sparse: costs no disk until written.  QEMU keeps the label area
        # (label-size) at the end of it, so labels -- and the namespace --
        # persist from one run to the next.
        truncate -s "$NVDIMM_SIZE" "$img.tmp"
        mv "$img.tmp" "$img"
    fi
    printf '%s\n' "$img"
}

# ---------------------------------------------------------------------------
# main

mkdir -p "$CACHE_DIR"
log "cache: $CACHE_DIR"
# One run at a time per cache: the NVDIMM image is the guest's shared
# memory, two guests on it would corrupt each other (and two cold runs would
# race on building the cache).  Bounded wait: never hang.
exec 9>"$CACHE_DIR/lock"
if ! flock -n 9; then
    log "waiting for another dax-vm run to finish (up to ${TIMEOUT}s)"
    flock -w "$TIMEOUT" 9 || die 124 "timed out waiting for the lock $CACHE_DIR/lock"
fi
ensure_packages
KDIR="$(ensure_kernel)"
KVER="$(cat "$KDIR/kver")"
INITRAMFS="$(ensure_initramfs "$KDIR")"
NVDIMM_IMG="$(ensure_nvdimm)"

RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/dax-vm-run.XXXXXX")"
mkdir -p "$RUN_DIR/out"
QEMU_PID=""
TAIL_PID=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    # Only the processes started here, by pid.  Killing `timeout` makes it
    # pass SIGTERM on to QEMU.
    if [[ -n "$QEMU_PID" ]]; then kill "$QEMU_PID" 2>/dev/null || true; fi
    if [[ -n "$TAIL_PID" ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The command script run in the guest by bash (from the host root) after
# chroot.  printf %q quotes every word so arbitrary arguments survive.
{
    echo "cd $(printf '%q' "$PWD") || exit 126"
    echo "export PATH=$(printf '%q' "$PATH")"
    echo "export HOME=$(printf '%q' "${HOME:-/root}")"
    echo "export TERM=dumb"
    echo "export PERCPU_REF_DAX=/dev/dax0.0"
    for kv in "${GUEST_ENV[@]}"; do
        name="${kv%%=*}"
        [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die 2 "bad --env name: $name"
        if [[ "$kv" == *=* ]]; then
            value="${kv#*=}"
        else
            # --env NAME passes the host's value through.
            value="${!name-}"
        fi
        echo "export $name=$(printf '%q' "$value")"
    done
    printf 'exec'
    printf ' %q' "${CMD[@]}"
    printf '\n'
} >"$RUN_DIR/out/run.sh"
: >"$RUN_DIR/out/output"
: >"$RUN_DIR/console.log"

# shellcheck disable=SC2054  # the commas are QEMU option syntax
QEMU_ARGS=(
    -nodefaults -no-user-config -display none
    # No usable KVM here: plain TCG.  -cpu max exposes clwb/clflushopt; the
    # default qemu64 CPU has only clflush (clwb would SIGILL).
    -accel tcg -cpu max -smp "$SMP"
    # nvdimm=on adds the ACPI NFIT; slots/maxmem make room for the NVDIMM.
    -machine pc,nvdimm=on
    -m 2G,slots=2,maxmem=4G
    # share=on: guest stores reach the file, so data and labels persist.
    -object "memory-backend-file,id=mem1,share=on,mem-path=$NVDIMM_IMG,size=$NVDIMM_SIZE"
    -device "nvdimm,id=nvdimm1,memdev=mem1,label-size=$LABEL_SIZE"
    -kernel "$KDIR/vmlinux"
    -initrd "$INITRAMFS"
    # panic=-1 + -no-reboot: a kernel panic ends QEMU at once.
    -append "console=ttyS0 quiet loglevel=4 panic=-1"
    -no-reboot
    # Host root, read-only.  multidevs=remap: files from different host
    # filesystems get distinct inode numbers in the guest.
    -fsdev "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap"
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot
    # Writable share: run.sh in, output and exit-code out.
    -fsdev "local,id=out,path=$RUN_DIR/out,security_model=none"
    -device virtio-9p-pci,fsdev=out,mount_tag=out
    # Kernel console to a file, shown on failure (or live with --verbose);
    # the command's own output is streamed from the output share instead,
    # so kernel messages never interleave with it.
    -serial "file:$RUN_DIR/console.log"
    -monitor none
)

log "booting $KVER (TCG, smp=$SMP, timeout ${TIMEOUT}s)"
# -k: if QEMU ignores SIGTERM, SIGKILL it 10 s later.  </dev/null: never
# touch the terminal.
timeout -k 10 "$TIMEOUT" qemu-system-x86_64 "${QEMU_ARGS[@]}" </dev/null >"$RUN_DIR/qemu.log" 2>&1 &
QEMU_PID=$!
# Stream the guest's output live; tail ends shortly after QEMU does.
tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$RUN_DIR/out/output" &
TAIL_PID=$!
if ((VERBOSE)); then
    tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$RUN_DIR/console.log" >&2 &
fi
QEMU_RC=0
wait "$QEMU_PID" || QEMU_RC=$?
QEMU_PID=""
wait "$TAIL_PID" || true
TAIL_PID=""

show_console() {
    log "last lines of the guest console:"
    tail -n 40 "$RUN_DIR/console.log" >&2 || true
    if [[ -s "$RUN_DIR/qemu.log" ]]; then
        log "qemu said:"
        cat "$RUN_DIR/qemu.log" >&2
    fi
}

if ((QEMU_RC == 124 || QEMU_RC == 137)); then
    show_console
    die 124 "timed out after ${TIMEOUT}s (raise with --timeout)"
fi
if [[ ! -f "$RUN_DIR/out/exit-code" ]]; then
    show_console
    if grep -q 'Kernel panic' "$RUN_DIR/console.log" 2>/dev/null; then
        die 125 "the guest kernel panicked (see console above); no exit code"
    fi
    die 125 "guest did not report an exit code (qemu exit status $QEMU_RC)"
fi
RC="$(cat "$RUN_DIR/out/exit-code")"
[[ "$RC" =~ ^[0-9]+$ ]] || die 125 "bad exit code from guest: $RC"
if [[ -s "$RUN_DIR/qemu.log" ]]; then
    log "qemu said:"
    cat "$RUN_DIR/qemu.log" >&2
fi
log "command exited with $RC"
exit "$RC"
