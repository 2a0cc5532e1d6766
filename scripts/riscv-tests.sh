#!/usr/bin/env bash
# Builds the official RISC-V ISA tests (riscv-tests) from a checkout and
# runs each through `lockstep run --elf` with every engine, printing what
# passed and failed. Not part of the test suite: it needs a checkout of
# https://github.com/riscv-software-src/riscv-tests with its `env`
# submodule (https://github.com/riscv/riscv-test-env), which CI cannot
# fetch.
#
#   bash scripts/riscv-tests.sh /path/to/riscv-tests [lockstep binary]
#
# Suites: the physical-memory ("p") tests of RV64 I, M, A, F, D, C and the
# machine- and supervisor-mode tests (mi, si), and the virtual-memory
# ("v") tests of the user suites, which run each test as a user program
# under Sv39 with pages faulted in on demand. The Zb* tests are left out:
# the engine implements RV64GC. The "v" environment is C, so it needs the
# riscv64 libc headers (libc6-dev-riscv64-cross), installed here if
# missing.
set -euo pipefail
src="${1:?usage: riscv-tests.sh RISCV_TESTS_DIR [LOCKSTEP]}"
root="$(cd "$(dirname "$0")/.." && pwd)"
lockstep="${2:-$root/target/release/lockstep}"
[ -f "$src/env/p/link.ld" ] || { echo "riscv-tests: '$src' has no env/p/link.ld (is the env submodule checked out?)" >&2; exit 1; }
[ -x "$lockstep" ] || { echo "riscv-tests: no lockstep binary at '$lockstep' (cargo build --release)" >&2; exit 1; }
bash "$root/scripts/test-deps.sh"
if [ ! -e /usr/riscv64-linux-gnu/include/stdint.h ]; then
  apt-get install -y -qq libc6-dev-riscv64-cross >/dev/null
fi

out="$(mktemp -d /tmp/riscv-tests.XXXXXX)"
trap 'rm -rf "$out"' EXIT
# The Linux cross compiler builds position-independent code by default:
# the "v" environment's kernel runs at a virtual address where a GOT of
# physical addresses would fault, so no PIE.
cc=(riscv64-linux-gnu-gcc -march=rv64gc_zicsr_zifencei -mabi=lp64d -static -fno-pie -no-pie -mcmodel=medany
  -fvisibility=hidden -nostdlib -nostartfiles -fno-stack-protector)
built=0
for suite in rv64ui rv64um rv64ua rv64uf rv64ud rv64uc rv64mi rv64si; do
  for test in "$src"/isa/$suite/*.S; do
    name=$(basename "$test" .S)
    "${cc[@]}" -I"$src/env/p" -I"$src/isa/macros/scalar" -T"$src/env/p/link.ld" "$test" -o "$out/$suite-p-$name"
    built=$((built + 1))
    case $suite in rv64mi | rv64si) continue ;; esac
    entropy=0x$(echo "$name" | md5sum | cut -c 1-7)
    "${cc[@]}" -std=gnu99 -O2 -DENTROPY="$entropy" -I"$src/env/v" -I"$src/isa/macros/scalar" -T"$src/env/v/link.ld" \
      "$src/env/v/entry.S" "$src"/env/v/*.c "$test" -o "$out/$suite-v-$name"
    built=$((built + 1))
  done
done

status=0
for engine in interp jit; do
  passed=0
  failed=()
  for elf in "$out"/*; do
    if timeout 60 "$lockstep" run --elf "$elf" --max-insns 50000000 --engine "$engine" >/dev/null 2>"$out.err"; then
      passed=$((passed + 1))
    else
      failed+=("$(basename "$elf"): $(tail -1 "$out.err")")
    fi
  done
  echo "riscv-tests, engine $engine: $passed of $built passed"
  for f in "${failed[@]}"; do
    echo "  FAILED $f"
    status=1
  done
done
rm -f "$out.err"
exit $status
