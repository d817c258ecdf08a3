#!/usr/bin/env bash
# arm64-vm.sh — run host-cross-built aarch64 Linux programs (this crate's
# test binaries, the rseq probe) in an emulated arm64 guest and return their
# exit status.
#
# Usage: scripts/arm64-vm.sh [OPTIONS] [--probe] [--] PROGRAM [ARGS...]
#        scripts/arm64-vm.sh [OPTIONS] [--probe] --cargo-test [CARGO_ARGS...] [-- TEST_ARGS...]
#        scripts/arm64-vm.sh [OPTIONS] --probe
#
#   --cargo-test       cross-build `cargo test --no-run --target
#                      aarch64-unknown-linux-gnu CARGO_ARGS...` (e.g. --lib
#                      --test percpu) and run every test binary it names, one
#                      after the other, each with TEST_ARGS; must come last
#   --probe            first cross-build scripts/rseq-probe.c and run it in
#                      the guest (rseq registered by glibc, cpu_id agrees with
#                      sched_getcpu, migration, membarrier RSEQ, CPU count),
#                      then once more with glibc's rseq turned off
#   --one-insn-per-tb  translate one guest instruction per block, so the
#                      guest takes interrupts (preemption, IPIs) between
#                      any two instructions, not only at block ends (see
#                      below); several times slower
#   --timeout SECS     wall-clock limit for the guest (default 600)
#   --env NAME=VALUE   set a variable for the programs (repeatable); --env
#                      NAME passes the host's value through
#   --smp N            guest CPUs (default 4)
#   -v, --verbose      also stream the guest kernel console to stderr
#
# PROGRAM is a host path to an aarch64 executable (copied into the guest) or
# a busybox applet (e.g. sh -c '...').  Link programs dynamically against
# glibc: glibc >= 2.35 registers rseq for every thread and exports
# __rseq_offset/__rseq_size, which the crate finds with dlsym; in a static
# binary dlsym finds nothing and the crate silently stays on its portable
# tier (glibc itself still registers there: the probe built -static sees
# __rseq_size 32).
#
# The guest: QEMU `-M virt -cpu max` under TCG (no KVM; MTTCG runs the vCPUs
# on host threads), a stock Debian arm64 kernel (downloaded, never
# installed), and an initramfs with a static busybox, the arm64 dynamic
# loader, libc6:arm64 and libgcc-s1:arm64 (taken from the Debian arm64
# packages, not installed on the host either).  The programs travel in the
# per-run 9p share that also carries run.sh, the output and the exit code
# (see vm-lib.sh); the guest's root is the initramfs itself, a writable
# tmpfs.  (Why not the other two ways: the host root over 9p has no arm64
# userland to chroot into, and copying the programs into a per-run initramfs
# is no faster -- a 14 MB test binary copies over 9p in 0.3 s -- while the
# share is needed anyway for the output and keeps the initramfs cacheable.)
# Programs run as root in /root with PATH, HOME=/root, TERM=dumb and the
# --env variables.  Output is streamed to this script's stdout; progress
# lines ("arm64-vm: [elapsed] ...") go to stderr.
#
# Exit status: the first failing program's exit status (128+N if killed by
# signal N; all programs run), 124 on timeout, 125 when the guest did not
# report one (kernel panic, guest setup failure), 2 on usage errors, 1 on
# host-side setup errors.
#
# Everything slow is cached in ${PERCPU_REF_ARM64_VM_CACHE:-$HOME/.cache/percpu-ref-arm64-vm}
# (shared by all worktrees): the unpacked kernel package, the arm64
# userland packages, the initramfs (keyed on kernel version, userland
# versions and the hash of this script and vm-lib.sh) and the built probe.
# A warm run does no apt work at all; root is needed only to install.
#
# Facts established with this script on an x86_64 host (Intel Xeon under
# KVM, 2 cores, no usable /dev/kvm), QEMU 10.0.2 from bookworm-backports,
# guest kernel linux-image-6.1.0-57-arm64 (6.1.192-3), glibc 2.36:
#   - The guest reaches its command 2-4 s after QEMU starts (4 vCPUs,
#     modules and 9p included; about 20 s with --one-insn-per-tb); a whole
#     --probe run takes 4-7 s.  On the crate's rseq tier the lib, percpu,
#     lifecycle, page, pool, pagecache and tier test binaries take 85-130 s
#     (a membarrier waits for 4 vCPUs sharing 2 host cores), on the
#     portable tier 25-35 s, depending on the load other builds put on the
#     host.
#   - The Debian arm64 vmlinuz is a raw, uncompressed Image (33 MB): QEMU
#     boots it directly; there is nothing to extract (unlike the x86
#     bzImage).  virtio and the PL011 console are built in; virtio_mmio,
#     9pnet, 9pnet_virtio, netfs, fscache and 9p are modules.
#   - -cpu max: LSE atomics (HWCAP_ATOMICS), so the portable tier's
#     fetch_add is one ldadd.  (pauth-impdef=on made no difference to boot or
#     test times here, so the CPU is plain "max".)
#   - CONFIG_RSEQ=y, CONFIG_MEMBARRIER=y.  The probe (scripts/rseq-probe.c)
#     passes in the guest: __rseq_size 20, __rseq_offset -32 (negative: on
#     aarch64 the area lies just below the thread pointer, unlike x86_64's
#     +2336), and cpu_id at TPIDR_EL0 - 32 equals sched_getcpu(); the
#     kernel holds glibc's registration with RSEQ_SIG 0xd428bc00
#     (re-registering gives EBUSY, a different signature EPERM); 4 CPUs
#     online; sched_setaffinity moves a thread onto each CPU and
#     cpu_id/cpu_id_start follow; membarrier QUERY (0x1ff: 6.1 has no
#     GET_REGISTRATIONS) lists PRIVATE_EXPEDITED_RSEQ, which is EPERM before
#     REGISTER and succeeds after it (all CPUs, and one CPU with
#     MEMBARRIER_CMD_FLAG_CPU).  With GLIBC_TUNABLES=glibc.pthread.rseq=0,
#     __rseq_size is 0.
#   - TCG takes asynchronous interrupts only between translation blocks,
#     which end at branches: by default an interrupt never lands between
#     two instructions of one straight-line stretch, e.g. between an rseq
#     commit and an instruction wrongly left after it inside the range (a
#     mutant that KVM-on-x86 catches passes here).  --one-insn-per-tb
#     (QEMU's one-insn-per-tb=on) makes every instruction a block, so every
#     instruction boundary is an interrupt point; with it that mutant
#     fails.  Synchronous faults (a page fault on a load or store) are
#     precise in both modes.
#   - What this guest cannot show: TCG on an x86_64 host runs the guest's
#     loads and stores as host loads and stores, which the host orders as
#     TSO, so none of the reorderings arm64 hardware allows happen here.
#     Tests in this guest catch logic and compiler-level errors of the
#     aarch64 build, not a missing hardware barrier.
#   - Cross build: gcc-aarch64-linux-gnu alone is not enough under
#     --no-install-recommends: libc6-dev-arm64-cross (a Recommends) holds
#     the headers and crt files that cc-rs builds and the linker need.

set -euo pipefail
# Functions run inside $(...) below must stop at the first error too.
shopt -s inherit_errexit

VM_NAME=arm64-vm
VM_SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
readonly VM_SCRIPT
readonly CACHE_DIR="${PERCPU_REF_ARM64_VM_CACHE:-$HOME/.cache/percpu-ref-arm64-vm}"
readonly RUST_TARGET=aarch64-unknown-linux-gnu
readonly CROSS_CC=aarch64-linux-gnu-gcc
PROBE_SRC="$(dirname "$VM_SCRIPT")/rseq-probe.c"
readonly PROBE_SRC
# The guest's userland: a static busybox for /init, glibc and libgcc_s for
# the programs (Rust's std links libgcc_s for unwinding).
readonly USERLAND_PKGS=(busybox-static:arm64 libc6:arm64 libgcc-s1:arm64)
# shellcheck source=scripts/vm-lib.sh
source "$(dirname "$VM_SCRIPT")/vm-lib.sh"

TIMEOUT=600
SMP=4
ONE_INSN_PER_TB=0
PROBE=0
CARGO_TEST=0
CARGO_ARGS=()
TEST_ARGS=()
# shellcheck disable=SC2317  # called by vm_parse_args
vm_script_option() {
    case "$1" in
        --probe)
            PROBE=1
            VM_SHIFT=1
            ;;
        --one-insn-per-tb)
            ONE_INSN_PER_TB=1
            VM_SHIFT=1
            ;;
        --cargo-test)
            # Everything after it: cargo's words, then "--", then the test
            # binaries' words.
            CARGO_TEST=1
            shift
            VM_SHIFT=1
            while (($#)) && [[ "$1" != "--" ]]; do
                CARGO_ARGS+=("$1")
                shift
                VM_SHIFT=$((VM_SHIFT + 1))
            done
            if (($#)); then
                shift
                VM_SHIFT=$((VM_SHIFT + 1 + $#))
                TEST_ARGS=("$@")
            fi
            ;;
    esac
}
vm_parse_args "$@"
if ((CARGO_TEST)) && ((${#CMD[@]})); then
    usage_error "--cargo-test takes the rest of the line: no PROGRAM with it"
fi
if ((!CARGO_TEST && !PROBE)) && ((${#CMD[@]} == 0)); then
    usage_error "no program given"
fi

need_root() {
    [[ "$(id -u)" == 0 ]] || die 2 "must run as root to install $* (apt-get); a warm cache needs no root"
}

# ---------------------------------------------------------------------------
# 1. host packages (idempotent; nothing is done when the tools are there)

ensure_packages() {
    local missing=()
    { have depmod && have modprobe; } || missing+=(kmod)
    have cpio || missing+=(cpio)
    have "$CROSS_CC" || missing+=(gcc-aarch64-linux-gnu)
    # A Recommends of the cross gcc: headers, crt1.o, libc.so for linking.
    pkg_installed libc6-dev-arm64-cross || missing+=(libc6-dev-arm64-cross)
    if ((${#missing[@]})); then
        need_root "${missing[*]}"
        log "installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    if ! have qemu-system-aarch64; then
        need_root qemu-system-arm
        ensure_qemu arm qemu-system-aarch64
    fi
}

# ---------------------------------------------------------------------------
# 2. the guest's userland: arm64 packages downloaded and unpacked, never
#    installed

# Prints the directory holding the unpacked USERLAND_PKGS (newest first;
# rebuilt only when missing).
ensure_userland() {
    local dir key pkg ver
    mkdir -p "$CACHE_DIR/userland"
    dir="$(find "$CACHE_DIR/userland" -mindepth 2 -maxdepth 2 -name .complete -printf '%h\n' 2>/dev/null | sort -V | tail -n 1)"
    if [[ -n "$dir" ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    need_root "the arm64 package lists"
    ensure_foreign_arch arm64
    key=""
    for pkg in "${USERLAND_PKGS[@]}"; do
        ver="$(apt_candidate "$pkg")"
        if [[ -z "$ver" || "$ver" == "(none)" ]]; then
            apt_update_once
            ver="$(apt_candidate "$pkg")"
        fi
        [[ -n "$ver" && "$ver" != "(none)" ]] || die 1 "apt knows no candidate for $pkg"
        key+="${pkg%%:*}_${ver//[:~]/.}+"
    done
    dir="$CACHE_DIR/userland/${key%+}"
    local tmp deb
    tmp="$(mktemp -d "$CACHE_DIR/userland/.tmp.XXXXXX")"
    log "downloading ${USERLAND_PKGS[*]} (apt-get download; not installed)"
    apt_download "$tmp" "${USERLAND_PKGS[@]}"
    for deb in "$tmp"/*.deb; do
        dpkg-deb -x "$deb" "$tmp/root"
    done
    rm -f "$tmp"/*.deb
    [[ -x "$tmp/root/bin/busybox" ]] || die 1 "no bin/busybox in busybox-static:arm64"
    [[ -e "$tmp/root/lib/ld-linux-aarch64.so.1" ]] || die 1 "no lib/ld-linux-aarch64.so.1 in libc6:arm64"
    touch "$tmp/.complete"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    printf '%s\n' "$dir"
}

# ---------------------------------------------------------------------------
# 3. initramfs: busybox, loader + libraries, modules, /init

# virtio-mmio transport (the virt machine's own; one module, where PCI would
# need three), then 9p.
readonly TOP_MODULES=(virtio_mmio 9pnet_virtio 9p)
VM_9P_DEVICE=virtio-9p-device

# The guest's /init: vm-lib's common head (mounts, modules, the out share
# at $OUT), then the part below.
write_guest_init() {
    vm_write_init_head "$1"
    cat >>"$1" <<'GUEST_INIT'

# The root is the initramfs (tmpfs): writable, gone at poweroff.
mkdir -p /tmp /root /run /dev/pts /dev/shm
chmod 1777 /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=0755 run /run
ln -s /proc/self/mounts /etc/mtab 2>/dev/null

glog "running command"
echo "----------------------------------------------------------------------" >>"$OUT/output"
rc=0
sh "$OUT/run.sh" </dev/null >>"$OUT/output" 2>&1 || rc=$?
echo "$rc" >"$OUT/exit-code.tmp" && mv "$OUT/exit-code.tmp" "$OUT/exit-code"
glog "command exited with $rc"
halt_now
GUEST_INIT
}

# Prints the initramfs path on stdout.
ensure_initramfs() {
    local kdir="$1" userland="$2" kver img
    kver="$(cat "$kdir/kver")"
    img="$CACHE_DIR/initramfs-$kver-$(basename "$userland" | sha256sum | cut -c1-8)-$(vm_scripts_hash).cpio"
    if [[ -f "$img" ]]; then
        printf '%s\n' "$img"
        return 0
    fi
    log "building initramfs for $kver"
    local tmp r
    tmp="$(mktemp -d "$CACHE_DIR/.initramfs.XXXXXX")"
    r="$tmp/root"
    mkdir -p "$r/bin" "$r/lib" "$r/etc" "$r/proc" "$r/sys" "$r/dev" "$r/mnt"
    cp "$userland/root/bin/busybox" "$r/bin/busybox"
    # The loader path baked into every aarch64 binary is
    # /lib/ld-linux-aarch64.so.1 (a symlink into lib/aarch64-linux-gnu);
    # without /etc/ld.so.cache the loader searches /lib/aarch64-linux-gnu.
    cp -a "$userland/root/lib/ld-linux-aarch64.so.1" "$r/lib/"
    cp -a "$userland/root/lib/aarch64-linux-gnu" "$r/lib/"
    write_guest_init "$r/init"
    vm_add_modules "$kdir" "$r" "${TOP_MODULES[@]}"
    vm_require_modules "$r" virtio_mmio 9pnet_virtio 9p
    # Drop initramfs images built by older versions of the scripts.
    find "$CACHE_DIR" -maxdepth 1 -name 'initramfs-*.cpio' -delete
    vm_cpio "$r" "$img"
    rm -rf "$tmp"
    printf '%s\n' "$img"
}

# ---------------------------------------------------------------------------
# 4. the programs

# Cross-builds with the linker set here, not in a committed
# .cargo/config.toml, so host builds are untouched.
cross_env() {
    export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER="${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-$CROSS_CC}"
    # cc-rs (C code in dependencies) for the target.
    export CC_aarch64_unknown_linux_gnu="${CC_aarch64_unknown_linux_gnu:-$CROSS_CC}"
}

ensure_rust_target() {
    if ! rustup target list --installed 2>/dev/null | grep -qx "$RUST_TARGET"; then
        log "rustup target add $RUST_TARGET"
        rustup target add "$RUST_TARGET" >&2
    fi
}

# Prints, one per line, the test executables of
# `cargo test --no-run --target aarch64-unknown-linux-gnu CARGO_ARGS...`.
cargo_test_binaries() {
    ensure_rust_target
    cross_env
    log "cargo test --no-run --target $RUST_TARGET ${CARGO_ARGS[*]}"
    local json
    json="$(cargo test --no-run --target "$RUST_TARGET" --message-format=json-render-diagnostics "${CARGO_ARGS[@]}")" ||
        die 1 "the cross build failed"
    # "executable" is null for artifacts that are not programs.
    printf '%s\n' "$json" | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p'
}

# Prints the path of the probe built for aarch64 (cached by source hash).
build_probe() {
    local flags=(-O2 -Wall -Wextra -Werror -pthread) hash out
    hash="$({ cat "$PROBE_SRC"; echo "${flags[*]}"; } | sha256sum | cut -c1-12)"
    out="$CACHE_DIR/rseq-probe-$hash"
    if [[ ! -x "$out" ]]; then
        log "building the rseq probe for aarch64"
        # Dynamic on purpose: glibc's rseq symbols are only there.
        "$CROSS_CC" "${flags[@]}" -o "$out.tmp" "$PROBE_SRC"
        mv "$out.tmp" "$out"
    fi
    printf '%s\n' "$out"
}

# check_program PATH USERLAND: an aarch64 ELF whose libraries the guest has.
check_program() {
    local path="$1" userland="$2" hdr lib
    hdr="$(LC_ALL=C readelf_cross -h "$path" 2>/dev/null)" || die 1 "$path: not an ELF file"
    grep -q 'Machine:.*AArch64' <<<"$hdr" || die 1 "$path: not an aarch64 program ($(grep 'Machine:' <<<"$hdr" | sed 's/ *Machine: *//'))"
    if ! readelf_cross -l "$path" | grep -q 'Requesting program interpreter'; then
        log "warning: $path is statically linked: glibc still registers rseq, but dlsym (how the crate finds __rseq_offset) finds nothing, so the crate stays on its portable tier"
        return 0
    fi
    while read -r lib; do
        [[ -e "$userland/root/lib/aarch64-linux-gnu/$lib" || -e "$userland/root/lib/$lib" ]] ||
            die 1 "$path needs $lib, which the guest does not have (only libc6 and libgcc-s1 are in it)"
    done < <(readelf_cross -d "$path" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
}

readelf_cross() { aarch64-linux-gnu-readelf "$@"; }

# ---------------------------------------------------------------------------
# main

mkdir -p "$CACHE_DIR"
log "cache: $CACHE_DIR"
# Held while the cache is built; released before the guest runs, so that
# several guests may run at once.
vm_lock_cache
ensure_packages
# apt sees the arm64 kernel and userland only with the arm64 architecture
# added; a warm cache needs neither apt nor root.
if ! compgen -G "$CACHE_DIR/kernel/*/.complete" >/dev/null || ! compgen -G "$CACHE_DIR/userland/*/.complete" >/dev/null; then
    need_root "the arm64 kernel and userland packages"
    ensure_foreign_arch arm64
fi
KDIR="$(vm_ensure_kernel linux-image-arm64:arm64 image)"
KVER="$(cat "$KDIR/kver")"
USERLAND="$(ensure_userland)"
INITRAMFS="$(ensure_initramfs "$KDIR" "$USERLAND")"
PROBE_BIN=""
if ((PROBE)); then
    PROBE_BIN="$(build_probe)"
fi
vm_unlock_cache

# Each job: a label (what the host calls it) and the guest command line.
JOB_LABELS=()
JOB_LINES=()
add_job() {
    JOB_LABELS+=("$1")
    JOB_LINES+=("$2")
}
HOST_PROGRAMS=()
if ((PROBE)); then
    HOST_PROGRAMS+=("$PROBE_BIN")
fi
if ((CARGO_TEST)); then
    bins="$(cargo_test_binaries | sort -u)"
    mapfile -t TEST_BINS <<<"$bins"
    [[ -n "${TEST_BINS[0]}" ]] || die 1 "cargo test --no-run built no test binary"
    HOST_PROGRAMS+=("${TEST_BINS[@]}")
elif ((${#CMD[@]})) && [[ -f "${CMD[0]}" ]]; then
    CMD[0]="$(readlink -f "${CMD[0]}")"
    HOST_PROGRAMS+=("${CMD[0]}")
fi

vm_make_run_dir
mkdir -p "$RUN_DIR/out/bin"
# The programs go into the share under bin/ (a hard link when on the same
# filesystem, else a copy); the guest runs them from there.
declare -A GUEST_PATH=()
i=0
for p in "${HOST_PROGRAMS[@]}"; do
    check_program "$p" "$USERLAND"
    g="bin/$i-$(basename "$p")"
    ln -f "$p" "$RUN_DIR/out/$g" 2>/dev/null || cp "$p" "$RUN_DIR/out/$g"
    GUEST_PATH["$p"]="/mnt/out/$g"
    i=$((i + 1))
done

if ((PROBE)); then
    g="${GUEST_PATH[$PROBE_BIN]}"
    add_job "rseq-probe --cpus $SMP" "$(vm_quote_words "$g" --cpus "$SMP")"
    add_job "rseq-probe --expect-unregistered (GLIBC_TUNABLES=glibc.pthread.rseq=0)" \
        "GLIBC_TUNABLES=glibc.pthread.rseq=0 $(vm_quote_words "$g" --expect-unregistered)"
fi
if ((CARGO_TEST)); then
    for p in "${TEST_BINS[@]}"; do
        label="${p#"$PWD"/}"
        ((${#TEST_ARGS[@]})) && label+=" ${TEST_ARGS[*]}"
        add_job "$label" "$(vm_quote_words "${GUEST_PATH[$p]}" "${TEST_ARGS[@]}")"
    done
elif ((${#CMD[@]})); then
    if [[ -n "${GUEST_PATH[${CMD[0]}]:-}" ]]; then
        add_job "${CMD[*]}" "$(vm_quote_words "${GUEST_PATH[${CMD[0]}]}" "${CMD[@]:1}")"
    else
        add_job "${CMD[*]}" "$(vm_quote_words "${CMD[@]}")"
    fi
fi

# run.sh, run by busybox sh in the guest: every job in turn, each framed by
# lines with the guest uptime, its duration and its exit status; the result
# is the first failing job's status.
{
    echo "export PATH=/sbin:/bin:/usr/sbin:/usr/bin"
    echo "export HOME=/root"
    echo "export TERM=dumb"
    vm_env_exports
    echo "cd /root || exit 126"
    # shellcheck disable=SC2016  # expanded in the guest
    echo 'up() { read -r u _ </proc/uptime; echo "$u"; }
rc=0
job() {
    t0=$(up)
    echo "arm64-vm: [guest ${t0}s] run: $1"
    (eval "$2")
    r=$?
    t1=$(up)
    echo "arm64-vm: [guest ${t1}s] exit status $r after $(awk -v a="$t0" -v b="$t1" "BEGIN { printf \"%.2f\", b - a }")s: $1"
    if [ "$rc" -eq 0 ]; then rc=$r; fi
}'
    for k in "${!JOB_LINES[@]}"; do
        echo "job $(printf '%q' "${JOB_LABELS[$k]}") $(printf '%q' "${JOB_LINES[$k]}")"
    done
    # shellcheck disable=SC2016  # expanded in the guest
    echo 'exit "$rc"'
} >"$RUN_DIR/out/run.sh"

ACCEL=tcg,thread=multi
if ((ONE_INSN_PER_TB)); then
    ACCEL+=,one-insn-per-tb=on
fi
# shellcheck disable=SC2054  # the commas are QEMU option syntax
QEMU_ARGS=(
    # No usable KVM (and an x86 host): TCG, multi-threaded, one host thread
    # per vCPU.  -cpu max: every feature QEMU emulates (LSE atomics among
    # them).
    -accel "$ACCEL" -machine virt -cpu max -smp "$SMP"
    -m 2G
    -kernel "$KDIR/kernel"
    -initrd "$INITRAMFS"
    -append "console=ttyAMA0 quiet loglevel=4 panic=-1"
)
VM_LABEL="$KVER arm64"
if ((ONE_INSN_PER_TB)); then
    VM_LABEL+=", one insn per TB"
fi
vm_run_qemu "$VM_LABEL" qemu-system-aarch64 "${QEMU_ARGS[@]}"
