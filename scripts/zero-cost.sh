#!/usr/bin/env bash
# Prove that PageRef<NoHook> costs exactly what a hand-written AtomicU32
# counter costs: run the same workload on both under callgrind (instruction
# counts are repeatable, unlike timings on a shared machine), count only the
# measured function, and fail unless the counts are equal.
#
# Usage: scripts/zero-cost.sh [iterations]      (default 100000)
# Needs: valgrind. Honours CARGO_TARGET_DIR.
#
# The binary is examples/zero_cost_page.rs. Per iteration it does one
# get_unless_zero, one inc, three dec_and_test (the last one final, 1→0)
# and one first_ref (0→1). Variants:
#   page     PageRef<NoHook>
#   bare     a hand-written AtomicU32 counter, same orderings, same checks
#   minimal  the textbook counter without misuse checks (reference only)
#   hot_ordinary, hot_device
#            the hot path (no transitions) of an ordinary page and of a
#            device page hooked to a PercpuRef: must also be equal
# The compared number is the per-iteration cost (instructions for 2N
# iterations minus those for N). If objdump is installed, the script also
# compares the instructions of zc_page and zc_bare (information only).
#
# Second check, holder tracking of PercpuRef (feature `track`): the binary
# is examples/zero_cost_percpu.rs (per iteration: tryget_live, a clone,
# tryget_live_owned, get_many(2)/put_many(2), all given back), built
#   off        as is, feature `track` off
#   untracked  with every tracking hook compiled out
#              (RUSTFLAGS=--cfg percpu_ref_untracked, own target dir)
#   tracked    with --features track (information: what tracking costs,
#              without backtraces: run with RUST_LIB_BACKTRACE=0)
# for a ref counting per CPU (`percpu`) and one in atomic mode (`atomic`).
# off and untracked must execute the same number of instructions.
#
# Third check, holder tracking of a pool's pages (features `dax`, `track`):
# the binary is examples/zero_cost_pool.rs, built the same three ways with
# the default features (`dax`), for
#   page       the hot path of an allocated page: a clone and a lookup of
#              it, both dropped
#   alloc      alloc + drop (the page takes and gives back its pool
#              reference)
# off and untracked must execute the same number of instructions.
set -euo pipefail

n=${1:-100000}
cd "$(dirname "$0")/.."

if ! command -v valgrind >/dev/null; then
    echo "zero-cost: valgrind not found (apt-get install valgrind)" >&2
    exit 2
fi

# No crate features are involved in PageRef; skipping them keeps the build
# small.
cargo build --quiet --release --no-default-features --example zero_cost_page
target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/examples/zero_cost_page"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Every run on one CPU: the pool's free-page caches are per CPU, and a
# migration in the middle of a run changes which one alloc takes from (and
# its instruction count).
cpu=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*\([0-9]*\).*/\1/p' /proc/self/status)

# ir VARIANT ITERATIONS [BINARY]: instructions executed inside zc_VARIANT.
ir() {
    local exe=${3:-$bin} tag
    tag=$(basename "$exe")
    local log="$tmp/$tag-$1-$2.log" c=""
    if taskset -c "${cpu:-0}" valgrind --tool=callgrind --toggle-collect="zc_$1" \
        --callgrind-out-file="$tmp/$tag-$1-$2.out" "$exe" "$1" "$2" >/dev/null 2>"$log"; then
        c=$(sed -n 's/^==[0-9]*== Collected : \([0-9]*\).*/\1/p' "$log")
    fi
    if [ -z "$c" ] || [ "$c" -eq 0 ]; then
        echo "zero-cost: no callgrind count for $1; log:" >&2
        cat "$log" >&2
        exit 2
    fi
    echo "$c"
}

# Per-iteration cost: run N and 2N iterations and take the difference, so
# the function's constant prologue/epilogue (register saves, which differ
# with the type's layout) drops out. Totals are printed too.
declare -A total loop
for v in page bare minimal hot_ordinary hot_device; do
    total[$v]=$(ir "$v" "$n")
    double=$(ir "$v" $((2 * n)))
    loop[$v]=$((double - total[$v]))
done

row() { # label variant
    printf '  %-34s %10s per %s iterations (total %s)\n' "$1" "${loop[$2]}" "$n" "${total[$2]}"
}
echo "callgrind instructions executed inside the measured function"
echo "all operations (1 get_unless_zero + 1 inc + 3 dec_and_test + 1 first_ref per iteration):"
row "PageRef<NoHook>" page
row "bare AtomicU32, same checks" bare
row "bare AtomicU32, no checks (info)" minimal
echo "hot path only (1 get_unless_zero + 1 inc + 2 dec_and_test per iteration, no transitions):"
row "ordinary page, PageRef<NoHook>" hot_ordinary
row "device page, PercpuRefHook" hot_device

# The loop must really run: N iterations of 6 atomic operations each.
if [ "${loop[page]}" -le "$((6 * n))" ]; then
    echo "zero-cost: FAIL: $n iterations cost only ${loop[page]} instructions;" \
        "the loop was optimised away?" >&2
    exit 1
fi

if command -v objdump >/dev/null; then
    # Instructions only: drop addresses, encodings, symbol names and
    # jump targets, so two identical functions compare equal.
    dis() {
        objdump -d --no-show-raw-insn --disassemble="$1" "$bin" |
            sed -n '/^[[:space:]]*[0-9a-f]*:/p' |
            sed -e 's/^[[:space:]]*[0-9a-f]*:[[:space:]]*//' \
                -e 's/<[^>]*>//g' -e 's/0x[0-9a-f]*/ADDR/g' \
                -e 's/^\(j[a-z]*\|call\|jmp\)[[:space:]]\+[0-9a-f]\+/\1 TARGET/' \
                -e 's/[[:space:]]*#.*$//' -e 's/[[:space:]]\+/ /g'
    }
    if diff <(dis zc_page) <(dis zc_bare) >"$tmp/asm.diff"; then
        echo "  objdump: zc_page and zc_bare are the same $(dis zc_page | wc -l) instructions"
    elif diff <(dis zc_page | sort) <(dis zc_bare | sort) >/dev/null; then
        echo "  objdump: zc_page and zc_bare are the same $(dis zc_page | wc -l) instructions," \
            "scheduled in a different order:"
        sed 's/^/    /' "$tmp/asm.diff"
    else
        echo "  objdump: zc_page and zc_bare differ (callgrind decides):"
        sed 's/^/    /' "$tmp/asm.diff"
    fi
fi

status=0
if [ "${loop[page]}" -ne "${loop[bare]}" ]; then
    echo "zero-cost: FAIL: PageRef<NoHook> executed ${loop[page]} instructions per $n" \
        "iterations, the bare AtomicU32 counter ${loop[bare]}" >&2
    status=1
fi
if [ "${loop[hot_ordinary]}" -ne "${loop[hot_device]}" ]; then
    echo "zero-cost: FAIL: the hot path of a device page executed ${loop[hot_device]}" \
        "instructions per $n iterations, of an ordinary page ${loop[hot_ordinary]}" >&2
    status=1
fi
if [ "$status" -eq 0 ]; then
    echo "zero-cost: OK: PageRef<NoHook> == bare AtomicU32" \
        "($((loop[page] / n)) instructions per iteration);" \
        "device page hot path == ordinary ($((loop[hot_device] / n)) per iteration)"
fi

# --- PercpuRef holder tracking ------------------------------------------
# Each build writes the same path: keep a copy of each binary.
pbin="$target_dir/release/examples/zero_cost_percpu"
cargo build --quiet --release --no-default-features --example zero_cost_percpu
cp "$pbin" "$tmp/off"
CARGO_TARGET_DIR="$target_dir/zero-cost-untracked" RUSTFLAGS="${RUSTFLAGS:-} --cfg percpu_ref_untracked" \
    cargo build --quiet --release --no-default-features --example zero_cost_percpu
cp "$target_dir/zero-cost-untracked/release/examples/zero_cost_percpu" "$tmp/untracked"
cargo build --quiet --release --no-default-features --features track --example zero_cost_percpu
cp "$pbin" "$tmp/tracked"

declare -A ploop
for v in percpu atomic; do
    for b in off untracked tracked; do
        # Tracking captures a backtrace per reference when RUST_BACKTRACE
        # asks for one; the information row measures tracking without.
        one=$(RUST_LIB_BACKTRACE=0 ir "$v" "$n" "$tmp/$b")
        two=$(RUST_LIB_BACKTRACE=0 ir "$v" $((2 * n)) "$tmp/$b")
        ploop[$v-$b]=$((two - one))
    done
done
echo "PercpuRef holder tracking (per iteration: tryget_live, clone, tryget_live_owned," \
    "get_many(2)+put_many(2), all given back):"
for v in percpu atomic; do
    printf '  %-8s feature off %8s   hooks compiled out %8s   feature on (info) %8s per %s iterations\n' \
        "$v" "${ploop[$v-off]}" "${ploop[$v-untracked]}" "${ploop[$v-tracked]}" "$n"
    if [ "${ploop[$v-off]}" -le "$((4 * n))" ]; then
        echo "zero-cost: FAIL: $v: $n iterations cost only ${ploop[$v-off]} instructions;" \
            "the loop was optimised away?" >&2
        status=1
    elif [ "${ploop[$v-off]}" -ne "${ploop[$v-untracked]}" ]; then
        echo "zero-cost: FAIL: $v: with the track feature off the workload executed" \
            "${ploop[$v-off]} instructions per $n iterations, with the tracking code" \
            "compiled out ${ploop[$v-untracked]}" >&2
        status=1
    fi
done
if [ "$status" -eq 0 ]; then
    echo "zero-cost: OK: track off == tracking compiled out" \
        "(percpu $((ploop[percpu-off] / n)), atomic $((ploop[atomic-off] / n)) instructions" \
        "per iteration; with tracking $((ploop[percpu-tracked] / n)) and" \
        "$((ploop[atomic-tracked] / n)))"
fi

# --- DevicePagePool page holder tracking ---------------------------------
# Same three builds, with the default features (the pool needs `dax`).
dbin="$target_dir/release/examples/zero_cost_pool"
cargo build --quiet --release --example zero_cost_pool
cp "$dbin" "$tmp/pool-off"
CARGO_TARGET_DIR="$target_dir/zero-cost-untracked" RUSTFLAGS="${RUSTFLAGS:-} --cfg percpu_ref_untracked" \
    cargo build --quiet --release --example zero_cost_pool
cp "$target_dir/zero-cost-untracked/release/examples/zero_cost_pool" "$tmp/pool-untracked"
cargo build --quiet --release --features track --example zero_cost_pool
cp "$dbin" "$tmp/pool-tracked"

pool_status=0
declare -A dloop
for v in page alloc; do
    for b in off untracked tracked; do
        one=$(RUST_LIB_BACKTRACE=0 ir "$v" "$n" "$tmp/pool-$b")
        two=$(RUST_LIB_BACKTRACE=0 ir "$v" $((2 * n)) "$tmp/pool-$b")
        dloop[$v-$b]=$((two - one))
    done
done
echo "DevicePagePool page holder tracking (page: clone + lookup of an allocated page," \
    "both dropped; alloc: alloc + drop):"
for v in page alloc; do
    printf '  %-8s feature off %8s   hooks compiled out %8s   feature on (info) %8s per %s iterations\n' \
        "$v" "${dloop[$v-off]}" "${dloop[$v-untracked]}" "${dloop[$v-tracked]}" "$n"
    if [ "${dloop[$v-off]}" -le "$((4 * n))" ]; then
        echo "zero-cost: FAIL: pool $v: $n iterations cost only ${dloop[$v-off]} instructions;" \
            "the loop was optimised away?" >&2
        pool_status=1
    elif [ "${dloop[$v-off]}" -ne "${dloop[$v-untracked]}" ]; then
        echo "zero-cost: FAIL: pool $v: with the track feature off the workload executed" \
            "${dloop[$v-off]} instructions per $n iterations, with the tracking code" \
            "compiled out ${dloop[$v-untracked]}" >&2
        pool_status=1
    fi
done
if [ "$pool_status" -eq 0 ]; then
    echo "zero-cost: OK: pool pages, track off == tracking compiled out" \
        "(page $((dloop[page-off] / n)), alloc $((dloop[alloc-off] / n)) instructions" \
        "per iteration; with tracking $((dloop[page-tracked] / n)) and" \
        "$((dloop[alloc-tracked] / n)))"
else
    status=1
fi
exit "$status"
