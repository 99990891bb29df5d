#!/usr/bin/env bash
# The test command: sets the machine up, then runs every check CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "build"
./scripts/build.sh

step "clippy (native and wasm32)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p vmesh-filter --target wasm32-wasip1 -- -D warnings

step "filter size (filter/wasm-size-budget, also the benchmark report's)"
size=$(stat -c %s target/wasm32-wasip1/release/vmesh_filter.wasm)
budget=$(cat filter/wasm-size-budget)
echo "vmesh_filter.wasm: $size bytes (budget $budget)"
[ "$size" -le "$budget" ] || { echo "vmesh_filter.wasm is over its budget of $budget bytes" >&2; exit 1; }

step "envoy --mode validate"
# The sidecar reads the VM's certificate through SDS files the shim writes under
# /var/lib/vmesh/certs; Envoy checks that they exist, so validation points it at stand-ins.
certs=$(mktemp -d)
trap 'rm -rf "$certs"' EXIT
touch "$certs/sds-default.yaml" "$certs/sds-rootca.yaml"
for cfg in envoy-configs/*.yaml; do
  sed "s#/var/lib/vmesh/certs#$certs#g" "$cfg" >"$certs/config.yaml"
  envoy --mode validate -c "$certs/config.yaml" --disable-hot-restart -l error >/dev/null
  echo "$cfg OK"
done

step "tests (unit, conformance through Envoy, wasm host, fuzz corpus)"
cargo test --workspace -- --test-threads "${VMESH_TEST_THREADS:-2}"

step "benchmark harness unit tests"
python3 -m unittest discover -s bench/dns/tests

if cargo fuzz --version >/dev/null 2>&1 && [ "${VMESH_SKIP_FUZZ:-0}" != 1 ]; then
  step "fuzz briefly (${VMESH_FUZZ_SECONDS:-20}s per target)"
  # Sanitizer coverage does not link with the workspace's LTO release profile; libFuzzer needs
  # nightly flags, which RUSTC_BOOTSTRAP allows on the stable toolchain. New inputs go to a
  # scratch corpus; the committed seeds are read only.
  for target in respond name_table tunnel forward; do
    mkdir -p "target/fuzz-corpus/$target"
    log="target/fuzz-corpus/$target.log"
    if ! CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_STRIP=false RUSTC_BOOTSTRAP=1 \
      cargo fuzz run --fuzz-dir fuzz --features libfuzzer "$target" "target/fuzz-corpus/$target" "fuzz/corpus/$target" \
      -- -max_total_time="${VMESH_FUZZ_SECONDS:-20}" -print_final_stats=1 >"$log" 2>&1; then
      tail -40 "$log" >&2
      echo "fuzzing $target found a failure (full log: $log)" >&2
      exit 1
    fi
    echo "$target: $(grep -m1 -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$') inputs, no failure"
  done
fi

step "all checks passed"
