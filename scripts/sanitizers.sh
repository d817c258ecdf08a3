#!/usr/bin/env bash
# Sanitizer and Miri gates (DESIGN.md §8 has the commands and their costs):
#
#   asan  the test suite (unit + integration tests, default features) under
#         AddressSanitizer;
#   tsan  the concurrency tests (integration tests percpu, page, pool) under
#         ThreadSanitizer, with std rebuilt by -Zbuild-std (needs rust-src);
#   miri  the portable tier's unit and integration tests (the PercpuRef
#         core, the page layer, and the pool on its anonymous backend; CPU
#         ids, rseq, membarrier and mmap use their portable fallbacks under
#         cfg(miri); tests needing files or devices are ignored there), then
#         the concurrent ones again under MIRI_SEEDS scheduler seeds.
#
# Usage: scripts/sanitizers.sh [asan] [tsan] [miri]   (default: all three)
#
# A step whose rustup component cannot be installed (offline machine, a
# nightly without it) prints why and is skipped, not failed. Each step runs
# in its own target dir (RUSTFLAGS differ) under $CARGO_TARGET_DIR (default
# ./target) and is bounded by a timeout. Exits non-zero if any step fails.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if ! rustc +nightly --version >/dev/null 2>&1; then
    echo "sanitizers: needs the nightly toolchain (cargo +nightly); none is installed" >&2
    exit 1
fi

host=$(rustc +nightly -vV | sed -n 's/^host: //p')
base_target=${CARGO_TARGET_DIR:-$root/target}
# Miri scheduler seeds for the concurrent tests (each seed reruns them).
miri_seeds=${MIRI_SEEDS:-0..4}
step_timeout=${SANITIZER_STEP_TIMEOUT:-1200}

steps=("$@")
[ "${#steps[@]}" -eq 0 ] && steps=(asan tsan miri)

failed=()
skipped=()

# Add rustup components; on refusal say why and return 1 (the caller skips).
components() {
    local out
    if ! out=$(rustup +nightly component add "$@" 2>&1); then
        echo "sanitizers: cannot add nightly component(s) $* — skipping this step:"
        echo "$out" | sed 's/^/    /'
        return 1
    fi
}

run() {
    local name=$1
    shift
    local t0=$SECONDS
    echo "sanitizers: [$name] $*"
    if timeout "$step_timeout" "$@"; then
        echo "sanitizers: [$name] ok in $((SECONDS - t0)) s"
    else
        echo "sanitizers: [$name] FAILED (exit $?) after $((SECONDS - t0)) s"
        failed+=("$name")
    fi
}

# Tests named with one of these words run threads against each other.
concurrent_filters=(concurrent thread stress _vs_ race hammer)

for s in "${steps[@]}"; do
    case $s in
    asan)
        CARGO_TARGET_DIR=$base_target/asan \
            RUSTFLAGS="-Zsanitizer=address" RUSTDOCFLAGS="-Zsanitizer=address" \
            ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1" \
            run asan cargo +nightly test --no-fail-fast --target "$host" --lib --tests
        ;;
    tsan)
        if ! components rust-src; then
            skipped+=(tsan)
            continue
        fi
        # --lib is left out: its unit tests are single-threaded.
        CARGO_TARGET_DIR=$base_target/tsan \
            RUSTFLAGS="-Zsanitizer=thread" RUSTDOCFLAGS="-Zsanitizer=thread" \
            TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1" \
            run tsan cargo +nightly test --no-fail-fast -Zbuild-std --target "$host" \
            --test percpu --test page --test pool
        ;;
    miri)
        if ! components miri rust-src; then
            skipped+=(miri)
            continue
        fi
        export CARGO_TARGET_DIR=$base_target/miri
        if ! out=$(cargo +nightly miri setup 2>&1); then
            echo "sanitizers: cargo miri setup failed — skipping miri:"
            echo "$out" | sed 's/^/    /'
            skipped+=(miri)
            unset CARGO_TARGET_DIR
            continue
        fi
        MIRIFLAGS="" \
            run miri cargo +nightly miri test --no-default-features --features dax \
            --lib --test percpu --test page --test pool
        MIRIFLAGS="-Zmiri-many-seeds=$miri_seeds" \
            run miri-seeds cargo +nightly miri test --no-default-features --features dax \
            --test percpu --test page --test pool -- "${concurrent_filters[@]}"
        unset CARGO_TARGET_DIR
        ;;
    *)
        echo "sanitizers: unknown step $s (asan, tsan, miri)"
        exit 2
        ;;
    esac
done

[ "${#skipped[@]}" -gt 0 ] && echo "sanitizers: skipped ${skipped[*]} (see above)"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "sanitizers: FAILED: ${failed[*]}"
    exit 1
fi
echo "sanitizers: all run steps passed"
