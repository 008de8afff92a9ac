#!/usr/bin/env bash
# Provisioning of the lab VMs, run as root. Vagrant runs the first form; the bench runs the others to switch
# a running lab to another backend without rebuilding it.
#   provision.sh etcd|host <lab-ip> <etcd-ip> <udp|vxlan|host-gw> <lab-mac> static|vagrant
#   provision.sh net-config <udp|vxlan|host-gw>               (etcd VM) write the flannel network config
#   provision.sh agent <auto|xdp|tc>                          (host VM) restart the agent with this udp decap,
#                                                             containers made again from the new subnet.env
# etcd: an etcd listening on the lab network, and the network config for the chosen backend.
# host: flannel-ebpf installed from the synced checkout (/vagrant) by the project's own scripts/setup.sh
#       (offline: every package is in the box, the Python ones in vagrant/.wheelhouse), started as the
#       packaged systemd service; then two containers, c1 and c2, made by the real CNI bridge plugin from
#       the conflist `flannel-ebpf cni-config` writes (network namespaces on `flannel-ebpf bridge`'s bridge
#       where the plugins are missing).
set -euo pipefail
NETWORK=${FLANNEL_VAGRANT_NETWORK:-10.5.0.0/16}
AGENT=/opt/flannel-ebpf/bin/flannel-ebpf
CNI_PATH=${FLANNEL_VAGRANT_CNI_PATH:-/usr/lib/cni}  # where the CNI plugins are (none: netns on a bridge)
CONFLIST=/etc/cni/net.d/10-flannel.conflist
log() { echo "provision[$(hostname)]: $*"; }

lab_address() {  # <ip> <mac>: the lab NIC (a qemu multicast socket) is ours to configure: matched by its MAC
  printf '[Match]\nMACAddress=%s\n\n[Network]\nAddress=%s/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' \
    "$2" "$1" > /etc/systemd/network/10-flannel-lab.network
  networkctl reload
  for _ in $(seq 50); do ip -4 -o addr | grep -q " $1/" && break; sleep 0.2; done
  ip -4 -o addr | grep -q " $1/" || { log "lab address $1 did not come up"; ip addr; exit 1; }
}

etcd_server() {  # <ip>
  cat > /etc/default/etcd <<ENV
ETCD_NAME=lab
ETCD_DATA_DIR=/var/lib/etcd/lab
ETCD_LISTEN_CLIENT_URLS=http://$1:2379,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://$1:2379
ETCD_LISTEN_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:2380
ETCD_INITIAL_CLUSTER=lab=http://127.0.0.1:2380
ENV
  systemctl enable etcd >/dev/null 2>&1
  systemctl restart etcd
  for _ in $(seq 100); do etcdctl --endpoints "http://$1:2379" endpoint health >/dev/null 2>&1 && break; sleep 0.2; done
}

net_config() {  # <backend>, to the etcd of this VM
  case $1 in
    udp | vxlan | host-gw) ;;
    *) log "unknown backend $1"; exit 1 ;;
  esac
  etcdctl --endpoints http://127.0.0.1:2379 put /coreos.com/network/config \
    "{\"Network\": \"$NETWORK\", \"Backend\": {\"Type\": \"$1\"}}" >/dev/null
  log "network config: $(etcdctl --endpoints http://127.0.0.1:2379 get --print-value-only /coreos.com/network/config)"
}

install_agent() {  # <lab-ip> <etcd-ip>
  cd /vagrant
  local t0; t0=$(date +%s)
  # Debian's pyroute2 (0.7) in the VMs, the newest on the host (`make test`): both stay exercised.
  FLANNEL_EBPF_SETUP_EXTRAS="" FLANNEL_EBPF_SETUP_VAGRANT=0 FLANNEL_EBPF_SETUP_PYROUTE2=system PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/vagrant/vagrant/.wheelhouse bash scripts/setup.sh
  make -s bpf
  ln -sfn /vagrant/.venv /opt/flannel-ebpf
  log "set-up done in $(( $(date +%s) - t0 )) s: $($AGENT --version)"
  install -m 0644 packaging/systemd/flannel-ebpf.service /etc/systemd/system/flannel-ebpf.service
  cat > /etc/default/flanneld <<ENV
FLANNELD_ETCD_ENDPOINTS=http://$2:2379
FLANNELD_IFACE=$1
FLANNELD_IP_MASQ=true
ENV
  systemctl daemon-reload
  systemctl enable flannel-ebpf >/dev/null 2>&1
}

containers_del() {
  for c in c1 c2; do
    if [ -e "/run/netns/$c" ] && [ -x "$CNI_PATH/bridge" ] && [ -f "$CONFLIST" ]; then
      cni bridge DEL "$c" >/dev/null 2>&1 || true
    fi
    ip netns del "$c" 2>/dev/null || true
    ip link del "veth-$c" 2>/dev/null || true
  done
  ip link del cni0 2>/dev/null || true  # made again with the new MTU
  rm -f /run/flannel-ebpf/bridge.json   # `flannel-ebpf bridge`'s record of it, which `health` checks
  rm -rf /var/lib/cni/networks/cbr0
}

cni() {  # <plugin> ADD|DEL <container>: one plugin of the conflist, invoked as a runtime invokes it
  local conf
  conf=$(python3 -c 'import json, sys
l = json.load(open(sys.argv[1])); p = next(p for p in l["plugins"] if p["type"] == sys.argv[2])
p.update(name=l["name"], cniVersion=l["cniVersion"]); print(json.dumps(p))' "$CONFLIST" "$1")
  CNI_COMMAND=$2 CNI_CONTAINERID=$3 CNI_NETNS=/var/run/netns/$3 CNI_IFNAME=eth0 CNI_PATH=$CNI_PATH \
    "$CNI_PATH/$1" <<< "$conf"
}

containers_add() {
  # shellcheck disable=SC1091
  . /run/flannel/subnet.env
  if [ -x "$CNI_PATH/bridge" ] && [ -x "$CNI_PATH/host-local" ]; then
    $AGENT cni-config --no-portmap -o "$CONFLIST" >/dev/null
    for c in c1 c2; do
      ip netns add "$c"
      ip -n "$c" link set lo up
      cni bridge ADD "$c" >/dev/null
    done
    log "containers c1, c2 by the CNI bridge plugin on cni0 ($FLANNEL_SUBNET, mtu $FLANNEL_MTU)"
    return
  fi
  $AGENT bridge cni0 >/dev/null
  local base=${FLANNEL_SUBNET%.*} plen=${FLANNEL_SUBNET#*/}
  for n in 1 2; do
    c=c$n
    ip netns add "$c"
    ip link add "veth-$c" mtu "$FLANNEL_MTU" type veth peer name eth0 netns "$c"
    ip link set "veth-$c" master cni0 up
    ip -n "$c" addr add "$base.1$n/$plen" dev eth0
    ip -n "$c" link set lo up
    ip -n "$c" link set eth0 mtu "$FLANNEL_MTU" up
    ip -n "$c" route add default via "${FLANNEL_SUBNET%/*}"
  done
  log "containers c1 $base.11, c2 $base.12 on cni0 ($FLANNEL_SUBNET, mtu $FLANNEL_MTU; no CNI plugins)"
}

agent() {  # <udp-decap>: (re)start the agent, then the containers
  containers_del
  if systemctl is-active -q flannel-ebpf; then
    systemctl stop flannel-ebpf
    $AGENT down >/dev/null  # the old backend's devices, routes and programs: the new one starts clean
  fi
  sed -i '/^FLANNELD_UDP_DECAP=/d' /etc/default/flanneld
  echo "FLANNELD_UDP_DECAP=$1" >> /etc/default/flanneld
  # Type=notify: returns once the agent holds its lease, wrote subnet.env and programmed its peers.
  systemctl start flannel-ebpf
  containers_add
  $AGENT health
}

case $1 in
  net-config) net_config "$2" ;;
  agent) agent "$2" ;;
  etcd | host)
    role=$1 ip=$2 etcd_ip=$3 backend=$4 mac=$5 netmode=$6
    [ "$netmode" = static ] && lab_address "$ip" "$mac"
    log "lab address $ip on $(ip -4 -o addr | awk -v a="$ip" 'index($4, a"/")==1 {print $2}')"
    if [ "$role" = etcd ]; then
      etcd_server "$ip"
      net_config "$backend"
    else
      install_agent "$ip" "$etcd_ip"
      agent auto
    fi
    ;;
  *) echo "usage: provision.sh etcd|host ... | net-config <backend> | agent <udp-decap>" >&2; exit 2 ;;
esac
