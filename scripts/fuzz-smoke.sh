#!/usr/bin/env bash
# Fuzz smoke test: build every cargo-fuzz target in fuzz/ and fuzz/shuttle/
# and run each for SECONDS (default 60) on its corpus (fuzz/corpus/<target>,
# seeded by the checked-in seed-* files). fuzz/shuttle/ (percpu_steps) is its
# own fuzz crate: it builds the library with --cfg percpu_ref_shuttle, in its
# own target directory, so the other targets keep building without it.
# Exits non-zero if any target finds a crash, a panic, a sanitizer report, a
# timeout or an out-of-memory (the input is in fuzz/artifacts/<target>/ or
# fuzz/shuttle/artifacts/<target>/), or if a build fails.
#
# Usage: scripts/fuzz-smoke.sh [SECONDS] [TARGET...]
# Needs the nightly toolchain; installs cargo-fuzz if it is missing.
set -euo pipefail

secs=${1:-60}
shift || true
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! rustc +nightly --version >/dev/null 2>&1; then
    echo "fuzz-smoke: needs the nightly toolchain (cargo +nightly); none is installed" >&2
    exit 1
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

shuttle_dir="$root/fuzz/shuttle"
shuttle_flags="--cfg percpu_ref_shuttle"
mapfile -t plain_targets < <(cargo +nightly fuzz list)
mapfile -t shuttle_targets < <(cargo +nightly fuzz list --fuzz-dir "$shuttle_dir")
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=("${plain_targets[@]}" "${shuttle_targets[@]}")
fi

is_shuttle() {
    local s
    for s in "${shuttle_targets[@]}"; do [ "$s" = "$1" ] && return 0; done
    return 1
}

# The fuzz crate of a target, the RUSTFLAGS it is built with, and its
# sanitizer. percpu_steps runs without ASan: shuttle switches stacks
# (corosensei), and a panic unwinding on a switched stack leaves ASan's
# shadow stale, which later shows as false stack-buffer-overflow reports;
# under the model cfg the crate's unsafe code (arena, rseq) is not compiled.
fuzz_dir() { if is_shuttle "$1"; then echo "$shuttle_dir"; else echo "$root/fuzz"; fi; }
flags() { if is_shuttle "$1"; then echo "${RUSTFLAGS:-} $shuttle_flags"; else echo "${RUSTFLAGS:-}"; fi; }
sanitizer() { if is_shuttle "$1"; then echo none; else echo address; fi; }

echo "fuzz-smoke: building ${targets[*]}"
cargo +nightly fuzz build
RUSTFLAGS="$(flags "${shuttle_targets[0]}")" cargo +nightly fuzz build --sanitizer none \
    --fuzz-dir "$shuttle_dir"

logdir=$(mktemp -d)
failed=()
for t in "${targets[@]}"; do
    dir=$(fuzz_dir "$t")
    mkdir -p "fuzz/corpus/$t" "$dir/artifacts/$t"
    log="$logdir/$t.log"
    echo "fuzz-smoke: $t for ${secs}s"
    # -timeout: one input running 20 s is a hang (a finding);
    # -rss_limit_mb: leaves room for ASan's quarantine.
    # libFuzzer runs in-process (no -jobs/-fork), from a scratch cwd.
    if (cd "$logdir" && RUSTFLAGS="$(flags "$t")" timeout $((secs + 120)) cargo +nightly fuzz run \
            --sanitizer "$(sanitizer "$t")" --fuzz-dir "$dir" "$t" "$root/fuzz/corpus/$t" -- \
            -max_total_time="$secs" -timeout=20 -rss_limit_mb=4096 \
            -print_final_stats=1 >"$log" 2>&1); then
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
        echo "fuzz-smoke: $t ok: ${execs:-?} execs, ${rate:-?} exec/s"
    else
        echo "fuzz-smoke: $t FAILED:"
        grep -m1 -A4 -E 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|^error' "$log" || true
        echo "fuzz-smoke: last lines of the $t log:"
        grep -v '^"' "$log" | tail -25
        failed+=("$t")
    fi
done
rm -rf "$logdir"

if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz-smoke: findings in ${failed[*]} (inputs in fuzz/artifacts/ and fuzz/shuttle/artifacts/)"
    exit 1
fi
echo "fuzz-smoke: ${#targets[@]} targets, no findings"
