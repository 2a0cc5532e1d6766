#!/usr/bin/env bash
# Installs what the test suite needs, idempotently: the riscv64 cross
# toolchain (to build test programs), QEMU user and system mode (the
# differential oracles), iproute2 (network namespaces, bridges, taps),
# e2fsprogs (fsck and debugfs on guest disks), and for the benchmarks
# iputils-ping and iperf3; nftables and tc (iproute2) to make the pair
# tests' log link lossy and slow; and etcd for the pair's arbiter tests, unpacked
# from Debian's etcd-server package into target/tools/etcd (installing the
# package would start a system service on port 2379). None is a runtime
# dependency of lockstep.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

need=()
command -v riscv64-linux-gnu-gcc >/dev/null || need+=(gcc-riscv64-linux-gnu)
command -v qemu-riscv64 >/dev/null || need+=(qemu-user)
command -v qemu-system-riscv64 >/dev/null || need+=(qemu-system-misc)
command -v ip >/dev/null || need+=(iproute2)
command -v debugfs >/dev/null || need+=(e2fsprogs)
command -v ping >/dev/null || need+=(iputils-ping)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v nft >/dev/null || need+=(nftables)
etcd="$root/target/tools/etcd/usr/bin/etcd"
need_etcd=0
command -v etcd >/dev/null || [ -x "$etcd" ] || need_etcd=1
if [ ${#need[@]} -eq 0 ] && [ $need_etcd -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
updated=0
update() {
  [ $updated -eq 1 ] && return 0
  updated=1
  $SUDO apt-get update -qq || echo "test-deps: warning: apt-get update failed; trying the existing lists" >&2
}
if [ ${#need[@]} -gt 0 ]; then
  echo "test-deps: installing ${need[*]}" >&2
  update
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ $need_etcd -eq 1 ]; then
  echo "test-deps: unpacking etcd-server into $root/target/tools/etcd" >&2
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  chmod 777 "$tmp"
  (cd "$tmp" && { apt-get download etcd-server >/dev/null 2>&1 || { update; apt-get download etcd-server >/dev/null; }; })
  mkdir -p "$root/target/tools/etcd"
  dpkg-deb -x "$tmp"/etcd-server_*.deb "$root/target/tools/etcd"
  [ -x "$etcd" ] || { echo "test-deps: etcd-server did not contain usr/bin/etcd" >&2; exit 1; }
fi
