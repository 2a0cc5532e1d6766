#!/bin/sh
# lockstep's init on the root disk (written by `lockstep guest build`).
# Mounts, lo, eth0 from lockstep.ip=ADDR/PREFIX and lockstep.gw=GW on the
# kernel command line, redis-server (6379) and mini_httpd (80); prints the
# ready line once redis answers PING; then lockstep.run=: shell (default)
# or poweroff. Power-off, reboot and halt stop the services and remount /
# read-only first, so the disk is clean.
bb=/usr/bin/busybox
[ -e /proc/self ] || $bb mount -t proc proc /proc
$bb mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
# The busybox applets, after the real programs in PATH.
$bb mkdir -p /run/busybox
$bb --install -s /run/busybox
export PATH=/usr/sbin:/usr/bin:/run/busybox HOME=/root
mounted() { grep -q "^[^ ]* $1 " /proc/mounts; }
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -o remount,rw /
# No RTC: the wall clock starts at 1970. As Debian's fake-hwclock does, move
# it on to the time saved at the last shutdown (first boot: the disk's build
# time), so that times on the disk go forward; ext4 deletion times near 0
# read as orphan-list links to e2fsck.
clock=/var/lib/lockstep/clock
saved=$(cat $clock 2>/dev/null)
if [ -n "$saved" ] && [ "$(date +%s)" -lt "$saved" ]; then
  date -s "@$saved" >/dev/null
fi
hostname -F /etc/hostname
ip link set lo up
run=shell
addr=
gw=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    lockstep.run=*) run="${arg#lockstep.run=}" ;;
    lockstep.ip=*) addr="${arg#lockstep.ip=}" ;;
    lockstep.gw=*) gw="${arg#lockstep.gw=}" ;;
  esac
done
if [ -n "$addr" ]; then
  if ! ip link show eth0 >/dev/null 2>&1; then
    echo "lockstep-init: lockstep.ip=$addr, but there is no eth0"
  elif ip addr add "$addr" dev eth0 && ip link set eth0 up; then
    if [ -n "$gw" ]; then
      ip route add default via "$gw" || echo "lockstep-init: cannot add the default route via $gw"
    fi
  else
    echo "lockstep-init: cannot configure eth0 with $addr"
  fi
fi
sysctl -qw vm.overcommit_memory=1
mkdir -p /var/lib/redis /var/log/redis
redis-server /etc/redis/redis.conf || echo "lockstep-init: redis-server did not start"
# mini_httpd's warnings (the IPv4 bind after its dual-stack IPv6 one fails
# harmlessly; it runs as root without chroot) go to its log.
mini_httpd -p 80 -d /srv/www -u nobody -l /var/log/mini_httpd.log -i /run/mini_httpd.pid 2>>/var/log/mini_httpd.log ||
  echo "lockstep-init: mini_httpd did not start; see /var/log/mini_httpd.log"
i=0
until [ "$(redis-cli ping 2>/dev/null)" = PONG ]; do
  i=$((i + 1))
  if [ $i -ge 300 ]; then
    echo "lockstep-init: redis-server does not answer PING; the end of its log:"
    tail -n 5 /var/log/redis/redis-server.log
    break
  fi
  sleep 0.1
done
[ $i -lt 300 ] && echo "lockstep-guest: ready"
# Stop the services, then $1 (poweroff, reboot or halt) with / read-only.
finish() {
  trap '' USR1 USR2 TERM
  redis-cli shutdown >/dev/null 2>&1
  kill -TERM -1 2>/dev/null
  sleep 0.2
  kill -KILL -1 2>/dev/null
  sleep 0.1
  date +%s >$clock
  sync
  mount -o remount,ro / || echo "lockstep-init: / is still read-write"
  "$1" -f
}
# busybox poweroff/reboot/halt signal PID 1: act on them while the shell runs.
trap 'finish poweroff' USR2
trap 'finish reboot' TERM
trap 'finish halt' USR1
case "$run" in
  poweroff) finish poweroff ;;
esac
cd /root
setsid cttyhack sh &
while kill -0 $! 2>/dev/null; do wait $!; done
finish poweroff
