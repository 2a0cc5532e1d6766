#!/usr/bin/env bash
# The whole test suite: installs the test dependencies, checks formatting
# and lints, then runs every unit, black-box and differential test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo test --workspace
