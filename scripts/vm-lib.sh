# vm-lib.sh -- the parts of the QEMU guest scripts (dax-vm.sh, arm64-vm.sh)
# that do not depend on the guest: logging, argument parsing, apt, the
# Debian kernel (downloaded and unpacked, never installed), module
# resolution, initramfs assembly, the per-run 9p share and the QEMU run with
# a time limit and an exit-code file.  Sourced, never run.
#
# The caller sets, before sourcing:
#   VM_NAME      prefix of every message, e.g. "dax-vm"
#   VM_SCRIPT    the caller's path (its header comment is the --help text;
#                with this file, its hash keys the cached initramfs)
#   CACHE_DIR    where downloads, unpacked kernels and initramfs images live
# and may define vm_script_option (see vm_parse_args).
#
# Guest protocol, shared by both guests: the host writes run.sh into a
# per-run directory shared over virtio-9p (mount tag "out"); the guest's
# /init runs it, appends its stdout+stderr to out/output (streamed live by
# the host) and finally writes its exit status to out/exit-code, then powers
# off.  A missing exit-code file means the guest never got that far.

# shellcheck shell=bash

VM_LIB_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
readonly VM_LIB_PATH
START_TIME="$EPOCHREALTIME"

# ---------------------------------------------------------------------------
# helpers

log() {
    local now elapsed
    now="$EPOCHREALTIME"
    elapsed="$(awk -v a="$START_TIME" -v b="$now" 'BEGIN { printf "%6.2f", b - a }')"
    printf '%s: [%ss] %s\n' "$VM_NAME" "$elapsed" "$*" >&2
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
        sed -n '2,/^# Everything slow/{/^# Everything slow/q;s/^# \{0,1\}//;p}' "$VM_SCRIPT"
    else
        sed -n '2,/^# Everything slow/{/^# Everything slow/q;s/^# \{0,1\}//;p}' "$VM_SCRIPT" >&2
    fi
    exit "$code"
}

usage_error() {
    echo "$VM_NAME: $*" >&2
    usage 2
}

have() { command -v "$1" >/dev/null 2>&1; }

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# ---------------------------------------------------------------------------
# argument parsing

# Read by the sourcing script.
# shellcheck disable=SC2034
TIMEOUT=300
SMP=1
VERBOSE=0
GUEST_ENV=()
CMD=()

# vm_parse_args "$@": the options every guest script takes (--timeout,
# --env, --smp, -v, -h), then "--" or the first non-option word; the rest
# is CMD.  A script adds options by defining vm_script_option, which is
# called with the remaining words first and sets VM_SHIFT to the number of
# words it consumed (0: not its option).
vm_parse_args() {
    local VM_SHIFT
    while (($#)); do
        VM_SHIFT=0
        if declare -F vm_script_option >/dev/null; then
            vm_script_option "$@"
        fi
        if ((VM_SHIFT > 0)); then
            shift "$VM_SHIFT"
            continue
        fi
        case "$1" in
            --timeout)
                # 0 would mean "no limit" to timeout(1): refuse it.
                [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout needs a number of seconds"
                TIMEOUT="$2"
                shift 2
                ;;
            --timeout=*)
                TIMEOUT="${1#*=}"
                [[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || usage_error "--timeout needs a number of seconds"
                shift
                ;;
            --env)
                [[ $# -ge 2 ]] || usage_error "--env needs NAME=VALUE or NAME"
                GUEST_ENV+=("$2")
                shift 2
                ;;
            --env=*)
                GUEST_ENV+=("${1#*=}")
                shift
                ;;
            --smp)
                [[ $# -ge 2 && "$2" =~ ^[1-9][0-9]*$ ]] || usage_error "--smp needs a CPU count"
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
                usage_error "unknown option: $1"
                ;;
            *)
                break
                ;;
        esac
    done
    # shellcheck disable=SC2034  # read by the sourcing script
    CMD=("$@")
}

# Prints one "export NAME=VALUE" line per --env, shell-quoted.  --env NAME
# passes the host's value through.
vm_env_exports() {
    local kv name value
    for kv in "${GUEST_ENV[@]}"; do
        name="${kv%%=*}"
        [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die 2 "bad --env name: $name"
        if [[ "$kv" == *=* ]]; then
            value="${kv#*=}"
        else
            value="${!name-}"
        fi
        echo "export $name=$(printf '%q' "$value")"
    done
}

# Prints its arguments as one shell command line, each word quoted.
vm_quote_words() {
    local first=1 w
    for w in "$@"; do
        ((first)) || printf ' '
        printf '%q' "$w"
        first=0
    done
}

# ---------------------------------------------------------------------------
# apt (idempotent; nothing is done when the tools are there)

APT_UPDATED=0
# Runs an apt command with its chatter in $CACHE_DIR/apt.log; shows the log
# on failure.
apt_quiet() {
    local apt_log="$CACHE_DIR/apt.log"
    if ! "$@" >>"$apt_log" 2>&1; then
        log "'$*' failed; last lines of $apt_log:"
        tail -n 20 "$apt_log" >&2
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

# Makes apt see packages of a foreign architecture (dpkg multiarch).  Only
# package lists are added: nothing of that architecture gets installed.
ensure_foreign_arch() {
    local arch="$1"
    if [[ "$(dpkg --print-architecture)" == "$arch" ]] || dpkg --print-foreign-architectures | grep -qx "$arch"; then
        return 0
    fi
    log "dpkg --add-architecture $arch (for apt-get download of $arch packages)"
    dpkg --add-architecture "$arch"
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

# Installs QEMU for the given system (x86, arm) from bookworm-backports
# unless its binary is there.  Both come from the same suite because they
# share qemu-system-common, whose version must match.
ensure_qemu() {
    local system="$1" binary="$2"
    have "$binary" && return 0
    ensure_backports_source
    log "installing qemu-system-$system from bookworm-backports"
    # --no-install-recommends: otherwise it drags in GUI/spice/opengl.
    apt_install -t bookworm-backports "qemu-system-$system"
}

# apt-get download PKG... into DIR (never installs).  Retries once after
# apt-get update: stale lists may name a version the mirror no longer has.
apt_download() {
    local dir="$1"
    shift
    # APT::Sandbox::User=root: _apt cannot enter $HOME (only a warning).
    if ! (cd "$dir" && apt_quiet apt-get download -o APT::Sandbox::User=root "$@"); then
        APT_UPDATED=0
        apt_update_once
        (cd "$dir" && apt_quiet apt-get download -o APT::Sandbox::User=root "$@")
    fi
}

# Prints the candidate version of a package (e.g. busybox-static:arm64).
apt_candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }'
}

# ---------------------------------------------------------------------------
# kernel: download the current Debian image package, unpack, never install

# Prints the current image package a kernel metapackage depends on (it
# changes with security updates), e.g. linux-image-6.1.0-57-amd64 for
# linux-image-amd64, linux-image-6.1.0-57-arm64:arm64 for
# linux-image-arm64:arm64.
kernel_package_of() {
    apt-cache depends "$1" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

# vm_ensure_kernel META MODE: prints the directory of an unpacked kernel
# package: root/ (the package: modules, with a generated modules.dep),
# kver, and kernel (the file QEMU boots).  MODE "elf" extracts the
# uncompressed ELF vmlinux from an x86 bzImage (it carries the Xen PVH
# entry note, so QEMU boots it directly: about twice as fast under TCG);
# MODE "image" boots the packaged vmlinuz as is (arm64: a raw Image).
# Reuses the newest kernel already unpacked; PERCPU_REF_VM_KERNEL_PKG forces
# a specific package.
vm_ensure_kernel() {
    local meta="$1" mode="$2" kdir pkg
    mkdir -p "$CACHE_DIR/kernel"
    if [[ -n "${PERCPU_REF_VM_KERNEL_PKG:-}" ]]; then
        pkg="$PERCPU_REF_VM_KERNEL_PKG"
    else
        kdir="$(find "$CACHE_DIR/kernel" -mindepth 2 -maxdepth 2 -name .complete -printf '%h\n' 2>/dev/null | sort -V | tail -n 1)"
        if [[ -n "$kdir" && -f "$kdir/kernel" ]]; then
            printf '%s\n' "$kdir"
            return 0
        fi
        pkg="$(kernel_package_of "$meta")" || true
        if [[ -z "$pkg" ]]; then
            apt_update_once
            pkg="$(kernel_package_of "$meta")"
        fi
    fi
    [[ -n "$pkg" ]] || die 1 "cannot resolve the $meta package"
    kdir="$CACHE_DIR/kernel/${pkg%%:*}"
    if [[ -f "$kdir/.complete" && -f "$kdir/kernel" ]]; then
        printf '%s\n' "$kdir"
        return 0
    fi

    local tmp
    tmp="$(mktemp -d "$CACHE_DIR/kernel/.tmp.XXXXXX")"
    log "downloading $pkg (apt-get download; not installed)"
    if ! (cd "$tmp" && apt_quiet apt-get download -o APT::Sandbox::User=root "$pkg"); then
        # Stale lists may name a package the mirror no longer has.
        APT_UPDATED=0
        apt_update_once
        if [[ -z "${PERCPU_REF_VM_KERNEL_PKG:-}" ]]; then
            pkg="$(kernel_package_of "$meta")"
            kdir="$CACHE_DIR/kernel/${pkg%%:*}"
        fi
        (cd "$tmp" && apt_quiet apt-get download -o APT::Sandbox::User=root "$pkg")
    fi
    log "unpacking $pkg"
    # The .deb file name has no ":arch" qualifier.
    dpkg-deb -x "$tmp"/"${pkg%%:*}"_*.deb "$tmp/root"
    rm -f "$tmp"/*.deb

    local kver vmlinuz
    kver="$(ls "$tmp/root/lib/modules")"
    [[ -n "$kver" && "$kver" != *$'\n'* ]] || die 1 "unexpected module dirs in $pkg: $kver"
    vmlinuz="$tmp/root/boot/vmlinuz-$kver"
    [[ -f "$vmlinuz" ]] || die 1 "no vmlinuz in $pkg"

    # The package ships no modules.dep (it is generated at install time).
    depmod -b "$tmp/root" "$kver"

    case "$mode" in
        elf)
            # Only the compressed bzImage (vmlinuz) is shipped.  Its payload
            # is an xz stream; find its magic and decompress just that
            # stream (--single-stream ignores trailing data).
            local off
            off="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -n 1 | cut -d: -f1)" || true
            if [[ -n "$off" ]]; then
                tail -c +"$((off + 1))" "$vmlinuz" | xz -dc --single-stream >"$tmp/kernel" 2>/dev/null || true
            fi
            if [[ "$(head -c 4 "$tmp/kernel" 2>/dev/null | od -An -tx1 | tr -d ' ')" != "7f454c46" ]]; then
                log "warning: could not extract an ELF vmlinux; booting vmlinuz (slower)"
                rm -f "$tmp/kernel"
                cp "$vmlinuz" "$tmp/kernel"
            fi
            ;;
        image)
            ln "$vmlinuz" "$tmp/kernel"
            ;;
        *) die 1 "vm_ensure_kernel: unknown mode $mode" ;;
    esac
    printf '%s\n' "$kver" >"$tmp/kver"
    touch "$tmp/.complete"
    rm -rf "$kdir"
    mv "$tmp" "$kdir"
    printf '%s\n' "$kdir"
}

# ---------------------------------------------------------------------------
# initramfs assembly

# vm_add_modules KDIR ROOT MODULE...: copies each module and its
# dependencies, resolved and ordered by modprobe itself, into ROOT/modules
# (decompressed: busybox insmod cannot read .ko.xz/.ko.zst) and appends the
# insmod order to ROOT/modules.list.  -C /dev/null ignores the host's
# /etc/modprobe.d, where ndctl's nvdimm-security.conf turns libnvdimm into an
# "install" rule that --show-depends would print instead of the module path.
vm_add_modules() {
    local kdir="$1" root="$2"
    shift 2
    local kver m line path base seen=" "
    kver="$(cat "$kdir/kver")"
    mkdir -p "$root/modules"
    for m in "$@"; do
        while read -r line; do
            case "$line" in
                insmod\ *)
                    path="${line#insmod }"
                    path="${path%% *}"
                    [[ "$seen" == *" $path "* ]] && continue
                    seen+="$path "
                    base="$(basename "$path")"
                    case "$base" in
                        *.ko.xz) xz -dc "$path" >"$root/modules/${base%.xz}"; base="${base%.xz}" ;;
                        *.ko.zst) zstd -qdc "$path" >"$root/modules/${base%.zst}"; base="${base%.zst}" ;;
                        *) cp "$path" "$root/modules/$base" ;;
                    esac
                    printf '%s\n' "$base" >>"$root/modules.list"
                    ;;
                builtin\ *) ;;
                FAILED\ *) die 1 "modprobe could not resolve ${line#FAILED }" ;;
                *) die 1 "unexpected modprobe output for $m: $line" ;;
            esac
        done < <(modprobe -C /dev/null -d "$kdir/root" -S "$kver" --show-depends "$m" || echo "FAILED $m")
    done
    touch "$root/modules.list"
}

# vm_require_modules ROOT MODULE...: process substitution hides modprobe's
# exit status, so check that each named module made it in (unless built in).
vm_require_modules() {
    local root="$1" m
    shift
    for m in "$@"; do
        grep -qx "$m.ko" "$root/modules.list" 2>/dev/null || die 1 "module $m missing from the initramfs"
    done
}

# Prints a short hash of the guest scripts (the caller and this library):
# part of the initramfs cache key, since /init is written by them.
vm_scripts_hash() {
    cat "$VM_SCRIPT" "$VM_LIB_PATH" | sha256sum | cut -c1-12
}

# vm_write_init_head FILE: the first part of every guest's /init (busybox
# sh): mounts, the glog/fail/halt_now helpers, insmod of modules.list, and
# the writable 9p share mounted at $OUT (/mnt/out).  The caller appends the
# rest.
vm_write_init_head() {
    {
        echo '#!/bin/busybox sh'
        echo "VM_NAME=$VM_NAME"
        cat <<'GUEST_INIT_HEAD'
# PID 1 of the guest.  Anything that goes wrong ends in poweroff without an
# exit-code file, which the host reports as exit code 125.
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

OUT=/mnt/out
glog() {
    read -r up _ </proc/uptime
    echo "$VM_NAME: [guest ${up}s] $*" >>"$OUT/output" 2>/dev/null
    echo "$VM_NAME: [guest ${up}s] $*" >/dev/console
}
halt_now() {
    sync
    poweroff -f
    sleep 5
}
fail() {
    echo "$VM_NAME: guest setup failed: $*" >/dev/console
    echo "$VM_NAME: guest setup failed: $*" >>"$OUT/output" 2>/dev/null
    halt_now
}

# modules.list holds the insmod order resolved on the host.
while read -r m; do
    insmod "/modules/$m" || fail "insmod $m"
done </modules.list

# Writable 9p share for the command script, its output and its exit code.
# msize: larger 9p messages make reading big test binaries much faster.
mkdir -p "$OUT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "$OUT" || fail "mount out share"
GUEST_INIT_HEAD
    } >"$1"
    chmod 0755 "$1"
}

# vm_cpio ROOT OUT: an uncompressed newc cpio of ROOT (nothing to
# decompress in the slow, emulated guest), written atomically.
vm_cpio() {
    (cd "$1" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$2.tmp"
    mv "$2.tmp" "$2"
}

# ---------------------------------------------------------------------------
# cache lock

# One cache, one builder: two cold runs must not race on building the cache.
# Bounded wait (TIMEOUT): never hang.  The lock is fd 9; vm_unlock_cache
# releases it (processes started while it is held inherit it).
vm_lock_cache() {
    exec 9>"$CACHE_DIR/lock"
    if ! flock -n 9; then
        log "waiting for another $VM_NAME run to finish (up to ${TIMEOUT}s)"
        flock -w "$TIMEOUT" 9 || die 124 "timed out waiting for the lock $CACHE_DIR/lock"
    fi
}

vm_unlock_cache() {
    exec 9>&-
}

# ---------------------------------------------------------------------------
# the run: per-run share, QEMU with a time limit, exit code

RUN_DIR=""
QEMU_PID=""
TAIL_PID=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
vm_cleanup() {
    # Only the processes started here, by pid.  Killing `timeout` makes it
    # pass SIGTERM on to QEMU.
    if [[ -n "$QEMU_PID" ]]; then kill "$QEMU_PID" 2>/dev/null || true; fi
    if [[ -n "$TAIL_PID" ]]; then kill "$TAIL_PID" 2>/dev/null || true; fi
    if [[ -n "$RUN_DIR" ]]; then rm -rf "$RUN_DIR"; fi
}

# Creates RUN_DIR with out/ (the writable share: run.sh in, output and
# exit-code out) and the cleanup traps.
vm_make_run_dir() {
    RUN_DIR="$(mktemp -d "${TMPDIR:-/tmp}/$VM_NAME-run.XXXXXX")"
    mkdir -p "$RUN_DIR/out"
    : >"$RUN_DIR/out/output"
    : >"$RUN_DIR/console.log"
    trap vm_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# vm_run_qemu DESCRIPTION QEMU_BINARY ARGS...: boots the guest with the out
# share (virtio-9p device model $VM_9P_DEVICE), the kernel console in
# console.log, a time limit of TIMEOUT seconds, and the guest's output
# streamed to stdout; then exits this script with the guest command's exit
# status (124 timeout, 125 no exit code reported).
VM_9P_DEVICE=virtio-9p-pci
vm_run_qemu() {
    local what="$1" qemu="$2"
    shift 2
    local args=("$@"
        -nodefaults -no-user-config -display none
        # panic=-1 on the kernel command line + -no-reboot: a kernel panic
        # ends QEMU at once.
        -no-reboot
        # Writable share: run.sh in, output and exit-code out.
        -fsdev "local,id=out,path=$RUN_DIR/out,security_model=none"
        -device "$VM_9P_DEVICE,fsdev=out,mount_tag=out"
        # Kernel console to a file, shown on failure (or live with
        # --verbose); the command's own output is streamed from the output
        # share instead, so kernel messages never interleave with it.
        -serial "file:$RUN_DIR/console.log"
        -monitor none
    )
    log "booting $what (TCG, smp=$SMP, timeout ${TIMEOUT}s)"
    # -k: if QEMU ignores SIGTERM, SIGKILL it 10 s later.  </dev/null: never
    # touch the terminal.
    timeout -k 10 "$TIMEOUT" "$qemu" "${args[@]}" </dev/null >"$RUN_DIR/qemu.log" 2>&1 &
    QEMU_PID=$!
    # Stream the guest's output live; tail ends shortly after QEMU does.
    tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$RUN_DIR/out/output" &
    TAIL_PID=$!
    if ((VERBOSE)); then
        tail -n +1 -s 0.2 -f --pid="$QEMU_PID" "$RUN_DIR/console.log" >&2 &
    fi
    local qemu_rc=0
    wait "$QEMU_PID" || qemu_rc=$?
    QEMU_PID=""
    wait "$TAIL_PID" || true
    TAIL_PID=""

    if ((qemu_rc == 124 || qemu_rc == 137)); then
        vm_show_console
        die 124 "timed out after ${TIMEOUT}s (raise with --timeout)"
    fi
    if [[ ! -f "$RUN_DIR/out/exit-code" ]]; then
        vm_show_console
        if grep -q 'Kernel panic' "$RUN_DIR/console.log" 2>/dev/null; then
            die 125 "the guest kernel panicked (see console above); no exit code"
        fi
        die 125 "guest did not report an exit code (qemu exit status $qemu_rc)"
    fi
    local rc
    rc="$(cat "$RUN_DIR/out/exit-code")"
    [[ "$rc" =~ ^[0-9]+$ ]] || die 125 "bad exit code from guest: $rc"
    if [[ -s "$RUN_DIR/qemu.log" ]]; then
        log "qemu said:"
        cat "$RUN_DIR/qemu.log" >&2
    fi
    log "command exited with $rc"
    exit "$rc"
}

vm_show_console() {
    log "last lines of the guest console:"
    tail -n 40 "$RUN_DIR/console.log" >&2 || true
    if [[ -s "$RUN_DIR/qemu.log" ]]; then
        log "qemu said:"
        cat "$RUN_DIR/qemu.log" >&2
    fi
}
