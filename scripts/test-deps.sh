#!/usr/bin/env bash
# Installs what the test suite needs, idempotently: the riscv64 cross
# toolchain (to build test programs), QEMU user and system mode (the
# differential oracles), iproute2 (network namespaces, bridges, taps),
# e2fsprogs (fsck and debugfs on guest disks), and for the benchmarks
# iputils-ping and iperf3. None is a runtime dependency of lockstep.
set -euo pipefail

need=()
command -v riscv64-linux-gnu-gcc >/dev/null || need+=(gcc-riscv64-linux-gnu)
command -v qemu-riscv64 >/dev/null || need+=(qemu-user)
command -v qemu-system-riscv64 >/dev/null || need+=(qemu-system-misc)
command -v ip >/dev/null || need+=(iproute2)
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v ping >/dev/null || need+=(iputils-ping)
command -v iperf3 >/dev/null || need+=(iperf3)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
echo "test-deps: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || echo "test-deps: warning: apt-get update failed; trying the existing lists" >&2
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
