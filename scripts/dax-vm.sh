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
# on kernel version + hash of this script and vm-lib.sh) and the sparse
# NVDIMM image (whose namespace labels persist, so the namespace is created
# only once).  The parts shared with scripts/arm64-vm.sh (apt, kernel,
# modules, initramfs, the QEMU run) are in scripts/vm-lib.sh.
# See DESIGN.md section 7 for how each fact below was established.

set -euo pipefail
# Functions run inside $(...) below must stop at the first error too.
shopt -s inherit_errexit

VM_NAME=dax-vm
VM_SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
readonly VM_SCRIPT
readonly CACHE_DIR="${PERCPU_REF_VM_CACHE:-$HOME/.cache/percpu-ref-dax-vm}"
readonly NVDIMM_SIZE=1G
readonly LABEL_SIZE=128K
# shellcheck source=scripts/vm-lib.sh
source "$(dirname "$VM_SCRIPT")/vm-lib.sh"

vm_parse_args "$@"
((${#CMD[@]} >= 1)) || usage_error "no command given"

[[ "$(id -u)" == 0 ]] || die 2 "must run as root (installs packages with apt-get)"

# ---------------------------------------------------------------------------
# 1. host packages (idempotent; nothing is done when the tools are there)

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
    ensure_qemu x86 qemu-system-x86_64
}

# ---------------------------------------------------------------------------
# 2. initramfs: static busybox + the needed modules + /init

# Modules, in load order (DESIGN.md 7).  device_dax is required: without it
# there is no /dev/dax0.0 character device.  "nfit" is the ACPI NFIT driver
# (the module is nfit.ko, not acpi_nfit).
readonly TOP_MODULES=(libnvdimm nfit nd_btt nd_pmem dax_pmem device_dax
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    9pnet 9pnet_virtio netfs fscache 9p overlay)

# The guest's /init (busybox sh): vm-lib's common head (mounts, modules, the
# out share at $OUT), then the dax part below.  Kept in the scripts so that
# the scripts' hash used as the initramfs cache key covers it.
write_guest_init() {
    vm_write_init_head "$1"
    cat >>"$1" <<'GUEST_INIT'

mkdir -p /mnt/lower /mnt/rw /mnt/root
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
}

# Prints the initramfs path on stdout.
ensure_initramfs() {
    local kdir="$1" kver img
    kver="$(cat "$kdir/kver")"
    img="$CACHE_DIR/initramfs-$kver-$(vm_scripts_hash).cpio"
    if [[ -f "$img" ]]; then
        printf '%s\n' "$img"
        return 0
    fi
    log "building initramfs for $kver"
    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/.initramfs.XXXXXX")"
    mkdir -p "$tmp/root/bin" "$tmp/root/proc" "$tmp/root/sys" "$tmp/root/dev" "$tmp/root/mnt"
    cp /bin/busybox "$tmp/root/bin/busybox"
    write_guest_init "$tmp/root/init"
    vm_add_modules "$kdir" "$tmp/root" "${TOP_MODULES[@]}"
    vm_require_modules "$tmp/root" device_dax nfit 9p overlay virtio_pci
    # Drop initramfs images built by older versions of the scripts.
    find "$CACHE_DIR" -maxdepth 1 -name 'initramfs-*.cpio' -delete
    vm_cpio "$tmp/root" "$img"
    rm -rf "$tmp"
    printf '%s\n' "$img"
}

# ---------------------------------------------------------------------------
# 3. NVDIMM backing file

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
# One run at a time per cache, held until QEMU exits: the NVDIMM image is
# the guest's shared memory, two guests on it would corrupt each other (and
# two cold runs would race on building the cache).
vm_lock_cache
ensure_packages
KDIR="$(vm_ensure_kernel linux-image-amd64 elf)"
KVER="$(cat "$KDIR/kver")"
INITRAMFS="$(ensure_initramfs "$KDIR")"
NVDIMM_IMG="$(ensure_nvdimm)"

vm_make_run_dir

# The command script run in the guest by bash (from the host root) after
# chroot.  printf %q quotes every word so arbitrary arguments survive.
{
    echo "cd $(printf '%q' "$PWD") || exit 126"
    echo "export PATH=$(printf '%q' "$PATH")"
    echo "export HOME=$(printf '%q' "${HOME:-/root}")"
    echo "export TERM=dumb"
    echo "export PERCPU_REF_DAX=/dev/dax0.0"
    vm_env_exports
    echo "exec $(vm_quote_words "${CMD[@]}")"
} >"$RUN_DIR/out/run.sh"

# shellcheck disable=SC2054  # the commas are QEMU option syntax
QEMU_ARGS=(
    # No usable KVM here: plain TCG.  -cpu max exposes clwb/clflushopt; the
    # default qemu64 CPU has only clflush (clwb would SIGILL).
    -accel tcg -cpu max -smp "$SMP"
    # nvdimm=on adds the ACPI NFIT; slots/maxmem make room for the NVDIMM.
    -machine pc,nvdimm=on
    -m 2G,slots=2,maxmem=4G
    # share=on: guest stores reach the file, so data and labels persist.
    -object "memory-backend-file,id=mem1,share=on,mem-path=$NVDIMM_IMG,size=$NVDIMM_SIZE"
    -device "nvdimm,id=nvdimm1,memdev=mem1,label-size=$LABEL_SIZE"
    -kernel "$KDIR/kernel"
    -initrd "$INITRAMFS"
    -append "console=ttyS0 quiet loglevel=4 panic=-1"
    # Host root, read-only.  multidevs=remap: files from different host
    # filesystems get distinct inode numbers in the guest.
    -fsdev "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap"
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot
)
vm_run_qemu "$KVER" qemu-system-x86_64 "${QEMU_ARGS[@]}"
