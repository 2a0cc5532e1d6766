#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin HOME=/root
run=shell
root=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    lockstep.run=*) run="${arg#lockstep.run=}" ;;
    root=*) root="${arg#root=}" ;;
  esac
done
# The virtio and ext4 drivers are modules in Debian's kernel; they are here
# in load order (dependencies first): $1/*.ko.
load_modules() {
  for m in "$1"/*.ko; do insmod "$m" 2>/dev/null; done
}
# busybox poweroff/reboot/halt signal PID 1: act on them while the shell runs.
trap 'poweroff -f' USR2
trap 'reboot -f' TERM
trap 'halt -f' USR1
shell() {
  setsid cttyhack sh &
  while kill -0 $! 2>/dev/null; do wait $!; done
  poweroff -f
}
if [ -z "$root" ]; then
  echo "lockstep-guest: ready"
  case "$run" in
    poweroff) poweroff -f ;;
  esac
  load_modules /lib/modules
  shell
fi
# root=DEVICE: boot from that disk.
fail() {
  echo "lockstep-guest: $*; staying in the initramfs"
  case "$run" in
    poweroff) poweroff -f ;;
  esac
  shell
}
load_modules /lib/modules
load_modules /lib/modules/root
i=0
while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b "$root" ] || fail "no root device $root"
mkdir -p /newroot
mount -t ext4 -o rw "$root" /newroot || fail "cannot mount the root disk $root (ext4)"
if [ ! -x /newroot/sbin/lockstep-init ]; then
  umount /newroot
  fail "the root disk $root has no /sbin/lockstep-init"
fi
for d in dev proc sys; do
  mkdir -p /newroot/$d
  mount --move /$d /newroot/$d
done
exec switch_root /newroot /sbin/lockstep-init
