#!/usr/bin/env bash
# The whole test suite: installs the test dependencies, checks formatting
# and lints, then runs every unit, black-box and differential test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
# The CPU's unit tests again with every block translated at its first run
# (the translation tier; the workspace run above used the interpreter).
RV_TEST_ENGINE=jit cargo test -p rv
# The portable floating-point path (what non-x86-64 hosts run), forced on
# here: its unit tests and the FP differential tests against QEMU.
cargo test -p rv --features portable-fp
cargo test -p lockstep --test differential --features rv/portable-fp
