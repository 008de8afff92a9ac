#!/usr/bin/env bash
# Provisioning of one lab VM (run by vagrant as root, from the Vagrantfile):
#   provision.sh etcd|host <lab-ip> <etcd-ip> <udp|vxlan|host-gw> <lab-mac> static|vagrant
# etcd: an etcd listening on the lab network, and the flannel network config for the chosen backend.
# host: flannel-ebpf installed from the synced checkout (/vagrant) by the project's own scripts/setup.sh
#       (offline: every package is in the box, the Python ones in vagrant/.wheelhouse), started as the
#       packaged systemd service; then two "containers" (network namespaces on the bridge that
#       `flannel-ebpf bridge` makes from subnet.env): c1 and c2, the lease's .11 and .12.
set -euo pipefail
role=$1 ip=$2 etcd_ip=$3 backend=$4 mac=$5 netmode=$6
NETWORK=${FLANNEL_VAGRANT_NETWORK:-10.5.0.0/16}
log() { echo "provision[$role $ip]: $*"; }

if [ "$netmode" = static ]; then
  # The lab NIC (qemu multicast socket) is ours to configure: match it by its MAC.
  printf '[Match]\nMACAddress=%s\n\n[Network]\nAddress=%s/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' \
    "$mac" "$ip" > /etc/systemd/network/10-flannel-lab.network
  networkctl reload
  for _ in $(seq 50); do ip -4 -o addr | grep -q " $ip/" && break; sleep 0.2; done
  ip -4 -o addr | grep -q " $ip/" || { log "lab address $ip did not come up"; ip addr; exit 1; }
fi
log "lab address $ip on $(ip -4 -o addr | awk -v a="$ip" 'index($4, a"/")==1 {print $2}')"

if [ "$role" = etcd ]; then
  cat > /etc/default/etcd <<ENV
ETCD_NAME=lab
ETCD_DATA_DIR=/var/lib/etcd/lab
ETCD_LISTEN_CLIENT_URLS=http://$ip:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$ip:2379
ETCD_LISTEN_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_CLUSTER=lab=http://127.0.0.1:2380
ENV
  systemctl enable etcd >/dev/null 2>&1
  systemctl restart etcd
  for _ in $(seq 100); do etcdctl --endpoints "http://$ip:2379" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
  case $backend in
    udp) be='{"Type": "udp"}' ;;
    vxlan) be='{"Type": "vxlan"}' ;;
    host-gw) be='{"Type": "host-gw"}' ;;
    *) log "unknown backend $backend"; exit 1 ;;
  esac
  etcdctl --endpoints "http://$ip:2379" put /coreos.com/network/config "{\"Network\": \"$NETWORK\", \"Backend\": $be}" >/dev/null
  log "etcd ready; config: $(etcdctl --endpoints "http://$ip:2379" get --print-value-only /coreos.com/network/config)"
  exit 0
fi

# host: the project's own set-up, offline.
cd /vagrant
t0=$(date +%s)
FLANNEL_EBPF_SETUP_EXTRAS="" FLANNEL_EBPF_SETUP_VAGRANT=0 PIP_NO_INDEX=1 PIP_FIND_LINKS=/vagrant/vagrant/.wheelhouse \
  bash scripts/setup.sh
make -s bpf
ln -sfn /vagrant/.venv /opt/flannel-ebpf
log "set-up done in $(( $(date +%s) - t0 )) s: $(/opt/flannel-ebpf/bin/flannel-ebpf --version)"

install -m 0644 packaging/systemd/flannel-ebpf.service /etc/systemd/system/flannel-ebpf.service
cat > /etc/default/flanneld <<ENV
FLANNELD_ETCD_ENDPOINTS=http://$etcd_ip:2379
FLANNELD_IFACE=$ip
FLANNELD_IP_MASQ=true
ENV
systemctl daemon-reload
systemctl enable flannel-ebpf >/dev/null 2>&1
# Type=notify: returns once the agent holds its lease, wrote subnet.env and programmed its peers.
systemctl restart flannel-ebpf
/opt/flannel-ebpf/bin/flannel-ebpf health

# Containers: network namespaces on the bridge made from subnet.env.
/opt/flannel-ebpf/bin/flannel-ebpf bridge cni0 >/dev/null
# shellcheck disable=SC1091
. /run/flannel/subnet.env
base=${FLANNEL_SUBNET%.*}; plen=${FLANNEL_SUBNET#*/}
for n in 1 2; do
  c=c$n
  ip netns del "$c" 2>/dev/null || true
  ip link del "veth-$c" 2>/dev/null || true
  ip netns add "$c"
  ip link add "veth-$c" mtu "$FLANNEL_MTU" type veth peer name eth0 netns "$c"
  ip link set "veth-$c" master cni0 up
  ip -n "$c" addr add "$base.1$n/$plen" dev eth0
  ip -n "$c" link set lo up
  ip -n "$c" link set eth0 mtu "$FLANNEL_MTU" up
  ip -n "$c" route add default via "${FLANNEL_SUBNET%/*}"
done
log "containers c1 $base.11, c2 $base.12 on cni0 ($FLANNEL_SUBNET, mtu $FLANNEL_MTU)"
