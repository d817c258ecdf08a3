#!/usr/bin/env bash
# The real /dev/dax tests: builds `tests/devdax.rs` on the host and runs the
# binary inside the QEMU guest of scripts/dax-vm.sh (an emulated NVDIMM
# exposed as /dev/dax0.0). The first run installs QEMU and the guest kernel
# (as root); later runs boot in a few seconds.
#
# Usage: scripts/test-devdax.sh [dax-vm.sh OPTIONS] [-- TEST-HARNESS ARGS]
#   e.g. scripts/test-devdax.sh --timeout 600 -- --nocapture
# On a machine with a real device, run the tests directly instead:
#   PERCPU_REF_DAX=/dev/daxX.Y cargo test --release --test devdax -- --include-ignored
set -euo pipefail
cd "$(dirname "$0")/.."

vm_args=()
while (($#)) && [[ $1 != -- ]]; do
    vm_args+=("$1")
    shift
done
[[ ${1:-} == -- ]] && shift

bin=$(cargo test --release --test devdax --no-run --message-format=json \
    | sed -n 's/.*"executable":"\([^"]*\/devdax-[^"]*\)".*/\1/p' | tail -n 1)
if [[ -z $bin ]]; then
    echo "test-devdax: the devdax test binary was not built" >&2
    exit 1
fi
exec scripts/dax-vm.sh "${vm_args[@]}" -- "$bin" --include-ignored --test-threads=1 "$@"
