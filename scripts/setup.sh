#!/usr/bin/env bash
# Prepare this host for flannel-ebpf: system packages, kernel headers for bcc, bpffs, the venv.
# Idempotent; run as root on Debian 12 or Ubuntu (amd64). Says what it changes.
set -euo pipefail
cd "$(dirname "$0")/.."

# bcc's Python module is Debian's python3-bpfcc (PyPI's "bcc" is an unrelated package: never install it).
# containernetworking-plugins: the CNI bridge/host-local/loopback/portmap plugins (/usr/lib/cni) for the CNI
# lab test; python3-aiohttp: client/server mode's HTTP (the venv sees it: --system-site-packages);
# systemd: systemd-analyze verifies the shipped unit (installing it in a container starts nothing).
PACKAGES=(python3-bpfcc bpfcc-tools python3-venv python3-pip python3-pyroute2 python3-aiohttp
          etcd-server etcd-client iperf3 iproute2 iputils-ping iptables ethtool tcpdump clang llvm libbpf-dev
          openssl containernetworking-plugins systemd)
# The Vagrant lab (vagrant/): `vagrant validate` runs in `make test`. No recommends: vagrant-libvirt recommends
# nfs-kernel-server and libguestfs-tools, which the lab does not use (and an NFS server would start).
# Neither package starts a daemon or creates a network: libvirtd and qemu come with `make vagrant-box`'s own set-up.
VAGRANT_PACKAGES=(vagrant vagrant-libvirt)
# The metrics test's real Prometheus and promtool (the test runs its own; none is started here). No recommends:
# they add node-exporter, a daemon the tests do not use.
# The charm's LXC lab test (tests/test_charm_lxc_lab.py): LXC, a root file system built with mmdebstrap from the
# apt mirror, dnsmasq for the containers' DHCP, dhclient inside them. No recommends: lxc recommends
# lxc-templates, debootstrap, uidmap and a firewall; nothing here may start lxc-net (its lxcbr0 and dnsmasq
# would land in the root namespace): the policy-rc.d below refuses, and the check after the install says so.
NORECOMMENDS_PACKAGES=(prometheus lxc mmdebstrap dnsmasq-base isc-dhcp-client)
# vagrant/build-box.sh puts the same packages into the lab's box (its VMs have no internet access).
if [ "${1:-}" = --print-packages ]; then echo "${PACKAGES[*]}"; exit 0; fi
[ "$(id -u)" = 0 ] || { echo "setup: run as root (it installs packages and mounts bpffs)" >&2; exit 1; }
# FLANNEL_EBPF_SETUP_EXTRAS: the pip extras installed with the package (default "dev": tests, lint, bench
# plots); the lab's VMs use "" (the agent alone, from a wheelhouse: PIP_NO_INDEX, PIP_FIND_LINKS).
SETUP_EXTRAS=${FLANNEL_EBPF_SETUP_EXTRAS-dev}
# FLANNEL_EBPF_SETUP_VAGRANT=0 (the lab's VMs): no vagrant.
[ "${FLANNEL_EBPF_SETUP_VAGRANT:-1}" = 1 ] || VAGRANT_PACKAGES=()
KREL=$(uname -r)
missing=()
for p in "${PACKAGES[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
vmissing=()
for p in "${VAGRANT_PACKAGES[@]}" "${NORECOMMENDS_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || vmissing+=("$p")
done
# Kernel headers: the running kernel's own if the distribution has them, else Debian's generic ones.
headers=""
if [ ! -e "/lib/modules/$KREL/build" ]; then
  if ls /usr/src/linux-headers-*-common >/dev/null 2>&1; then :; else headers=1; fi
fi
if [ ${#missing[@]} -gt 0 ] || [ ${#vmissing[@]} -gt 0 ] || [ -n "$headers" ]; then
  echo "setup: installing ${missing[*]:-} ${vmissing[*]:-} ${headers:+kernel headers}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Installing etcd-server must not start a system etcd on this host: the lab runs its own.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d.flannel-ebpf; chmod +x /usr/sbin/policy-rc.d.flannel-ebpf
  [ -e /usr/sbin/policy-rc.d ] || { cp /usr/sbin/policy-rc.d.flannel-ebpf /usr/sbin/policy-rc.d; own_policy=1; }
  [ ${#missing[@]} -gt 0 ] && apt-get install -y -qq "${missing[@]}" >/dev/null
  [ ${#vmissing[@]} -gt 0 ] && apt-get install -y -qq --no-install-recommends "${vmissing[@]}" >/dev/null
  if [ -n "$headers" ]; then
    apt-get install -y -qq "linux-headers-$KREL" >/dev/null 2>&1 || apt-get install -y -qq linux-headers-amd64 >/dev/null
  fi
  # Where policy-rc.d was not honoured (no invoke-rc.d): stop a system Prometheus the install started, by PID.
  # (The package's service runs as the user prometheus; the lab's own Prometheus runs as root.)
  for pid in $(pgrep -x -u prometheus prometheus 2>/dev/null || true); do
    kill "$pid" && echo "setup: stopped the system Prometheus (pid $pid) that installing it started"
  done
  [ -n "${own_policy:-}" ] && rm -f /usr/sbin/policy-rc.d
  rm -f /usr/sbin/policy-rc.d.flannel-ebpf
  # lxc-net must not have run: no lxcbr0 in this (the root) namespace, no dnsmasq of lxc-net's.
  if ip link show lxcbr0 >/dev/null 2>&1 || pgrep -x -u lxc-dnsmasq dnsmasq >/dev/null 2>&1; then
    echo "setup: installing lxc started lxc-net (lxcbr0 or its dnsmasq in the root namespace): stop it" \
      "(systemctl stop lxc-net, or: ip link del lxcbr0) and set USE_LXC_BRIDGE=\"false\" in /etc/default/lxc-net" >&2
    exit 1
  fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Kernels without packaged headers (this lab's VM kernel)
# get the distribution's generic headers linked there: good enough for our programs, which use only stable UAPI.
if [ ! -e "/lib/modules/$KREL/build" ]; then
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  source=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  if [ -z "$build" ]; then
    echo "setup: no kernel headers for $KREL and no generic ones under /usr/src: bcc cannot compile" >&2; exit 1
  fi
  mkdir -p "/lib/modules/$KREL"
  ln -sfn "$build" "/lib/modules/$KREL/build"
  [ -n "$source" ] && ln -sfn "$source" "/lib/modules/$KREL/source"
  echo "setup: kernel $KREL has no headers; linked /lib/modules/$KREL/build -> $build (and source -> ${source:-none})"
fi

if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
  echo "setup: mounted bpffs at /sys/fs/bpf"
fi

# The venv uses the system interpreter (bcc lives in its dist-packages), with system site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
  echo "setup: created .venv with /usr/bin/python3 and system site-packages"
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".${SETUP_EXTRAS:+[$SETUP_EXTRAS]}"
# pyroute2: Debian's (0.7) satisfies the requirement, so pip would keep it; the venv gets the newest release
# so that `make test` (and CI) runs against it. FLANNEL_EBPF_SETUP_PYROUTE2=system keeps Debian's.
if [ "${FLANNEL_EBPF_SETUP_PYROUTE2:-newest}" != system ]; then
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pyroute2
fi
echo "setup: ready (bcc $(.venv/bin/python -c 'import bcc, aetcd, pyroute2; print(bcc.__version__)'))"
