#!/usr/bin/env bash
# Runs a command (vagrant, virsh, ssh) where the lab's libvirt lives: a network namespace of its own
# (`flannel-vagrant`, only lo, up) and, inside it, a user namespace in which root appears as `nobody`.
#
# Why: as root, qemu:///session IS the system libvirtd (/var/run/libvirt/libvirt-sock), whose networks are
# bridges, dnsmasq and NAT rules on this host. Seen from a user namespace where we are not uid 0, libvirt
# runs a per-user session daemon (spawned on first use, exits 120 s after its last client) with qemu's
# user-mode networking only, and KVM still works (/dev/kvm belongs to our real uid). Every socket the VMs
# use (ssh forwarded to 127.0.0.1:<port>, the lab network's multicast on lo) is inside the namespace:
# nothing reaches this host's interfaces. Files are created as the real root user.
#   lab-ns.sh <command...>     run it there          lab-ns.sh --delete    remove the network namespace
# State: LAB_HOME (/var/tmp/fevg: libvirt's session config, disks, logs, sockets).
set -euo pipefail
NS=${FLANNEL_VAGRANT_NETNS:-flannel-vagrant}
# Short: libvirt puts UNIX sockets (the guest agent channel) under XDG_CONFIG_HOME, and they are limited to 107 bytes.
LAB_HOME=${FLANNEL_VAGRANT_HOME:-/var/tmp/fevg}
[ "$(id -u)" = 0 ] || { echo "lab-ns: run as root" >&2; exit 1; }
if [ "${1:-}" = --delete ]; then
  if [ -e "/run/netns/$NS" ]; then
    # The session daemon (libvirtd, with its qemus) was started in here and outlives `vagrant destroy` for
    # its idle timeout: left running, it would keep the deleted namespace alive, and the next `vagrant up`
    # would get it, with every VM's forwarded ssh port in the old namespace ("Connection refused").
    pids=$(ip netns pids "$NS")
    if [ -n "$pids" ]; then
      echo "lab-ns: stopping what runs in $NS: $(echo $pids)"
      kill $pids 2>/dev/null || true
      for _ in $(seq 50); do [ -z "$(ip netns pids "$NS")" ] && break; sleep 0.2; done
      pids=$(ip netns pids "$NS"); [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    fi
    ip netns del "$NS"; echo "lab-ns: deleted network namespace $NS"
  fi
  exit 0
fi
if [ ! -e "/run/netns/$NS" ]; then
  ip netns add "$NS"
  ip -n "$NS" link set lo up multicast on
fi
mkdir -p "$LAB_HOME/run"; chmod 700 "$LAB_HOME/run"
# vagrant keeps its boxes where root's vagrant does (VAGRANT_HOME), so `vagrant box add` as root is seen here.
export VAGRANT_HOME=${VAGRANT_HOME:-/root/.vagrant.d}
exec ip netns exec "$NS" unshare --user --map-user=65534 --map-group=65534 \
  env HOME="$LAB_HOME" XDG_RUNTIME_DIR="$LAB_HOME/run" XDG_CONFIG_HOME="$LAB_HOME/c" \
      XDG_CACHE_HOME="$LAB_HOME/cache" XDG_DATA_HOME="$LAB_HOME/data" VAGRANT_HOME="$VAGRANT_HOME" \
      LIBVIRT_DEFAULT_URI=qemu:///session "$@"
