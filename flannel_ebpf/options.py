"""The agent's options: what `flannel-ebpf up` was told (flags and FLANNELD_* variables, read by
flannel_ebpf.cli), one AgentOptions for the agent and, in multi-network mode, one per network
(for_network). The options also say where a network's leases come from (registry()): etcd v3, etcd's v2
store, or a --remote lease server.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from flannel_ebpf.host.types import BackendOptions
from flannel_ebpf.subnet.manager import LeaseOptions
from flannel_ebpf.subnet.registry import SubnetRegistry
from flannel_ebpf.subnet.store import EtcdTLS, LeaseSource


@dataclass
class AgentOptions:
    etcd_endpoints: list[str]
    etcd_prefix: str = "/coreos.com/network"
    etcd_tls: EtcdTLS = field(default_factory=EtcdTLS)
    etcd_username: str = ""
    etcd_password: str = ""
    etcd_api: str = "v3"  # v2: leases in etcd's v2 store, as flanneld v0.5 keeps them (etcd_v2_store)
    subnet_len_rule: str = "auto"  # the default SubnetLen's era: v0.5, v0.20, auto (v0.5 with etcd_api v2)
    ifaces: list[str] = field(default_factory=list)
    iface_regexes: list[str] = field(default_factory=list)
    iface_can_reach: str = ""  # pick the interface the kernel routes this address via (flanneld's flag)
    net_config_path: str = ""  # read the network config from this file, not from etcd (leases stay there)
    public_ip: str = ""
    subnet_file: str = "/run/flannel/subnet.env"
    state_dir: str = "/run/flannel-ebpf"
    ip_masq: bool = False
    iptables_forward_rules: bool = True
    iptables_resync: float = 5.0
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    resync_interval: float = 10.0  # full reconcile of the data path (flanneld re-checks host-gw every 10 s)
    lease: LeaseOptions = field(default_factory=LeaseOptions)
    backend: BackendOptions = field(default_factory=BackendOptions)

    networks: list[str] = field(default_factory=list)  # --networks: multi-network mode (empty: classic)
    subnet_dir: str = "/run/flannel/networks"  # multi-network mode: <subnet_dir>/<name>.env
    # client/server mode: --listen serves the lease API (flannel_ebpf/remote/server.py), --remote
    # takes leases from such a server instead of etcd; --remote-*file secure that link
    listen: str = ""
    remote: str = ""
    remote_tls: EtcdTLS = field(default_factory=EtcdTLS)
    listen_trust_any_client: bool = False  # the server lets any client write any PublicIP's leases
    remote_network: str = ""  # the network's name on the server ("": the default network)

    def registry(self) -> LeaseSource:
        """This network's lease source: etcd, or with --remote the server."""
        if self.remote:
            from flannel_ebpf.remote.client import RemoteRegistry

            return RemoteRegistry(self.remote, network=self.remote_network, tls=self.remote_tls)
        return self.registry_for_prefix(self.etcd_prefix)

    def registry_for_prefix(self, prefix: str) -> SubnetRegistry:
        tls = self.etcd_tls if self.etcd_tls.enabled else None
        if self.etcd_api == "v2":
            from flannel_ebpf.subnet.etcd_v2_store import EtcdV2Registry

            # duck-typed: the lease server uses the same methods (and for_prefix) of either store
            v2 = EtcdV2Registry(self.etcd_endpoints, prefix, tls, self.etcd_username, self.etcd_password)
            return v2  # type: ignore[return-value]
        return SubnetRegistry(
            self.etcd_endpoints, prefix, tls=tls, username=self.etcd_username, password=self.etcd_password
        )

    @property
    def effective_subnet_len_rule(self) -> str:
        """The era whose default SubnetLen applies: the flag, or (auto) the era the store implies."""
        if self.subnet_len_rule != "auto":
            return self.subnet_len_rule
        return "v0.5" if self.etcd_api == "v2" and not self.remote else "v0.20"

    def for_network(self, name: str) -> AgentOptions:
        """One network's options in multi-network mode, as flanneld v0.5 laid them out: config and leases
        under `<prefix>/<name>/`, env file `<subnet_dir>/<name>.env`; and flannel-ebpf's own per-network
        places: state `<state_dir>/networks/<name>/`, eBPF pins `<bpf_pin_dir>/<name>/`."""
        state_dir = network_state_dir(self.state_dir, name)
        return dataclasses.replace(
            self,
            etcd_prefix=f"{self.etcd_prefix.rstrip('/')}/{name}",
            subnet_file=os.path.join(self.subnet_dir, f"{name}.env"),
            state_dir=state_dir,
            networks=[],
            remote_network=name,
            backend=dataclasses.replace(
                self.backend,
                state_dir=state_dir,
                bpf_pin_dir=os.path.join(self.backend.bpf_pin_dir, name),
                network_name=name,
            ),
        )


#: where each network of a multi-network agent keeps its state, under --state-dir
NETWORKS_STATE_SUBDIR = "networks"


def network_state_dir(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, NETWORKS_STATE_SUBDIR, name)


#: makes the lease source of one network (SubnetRegistry, or with --remote a RemoteRegistry)
RegistryFactory = Callable[[], LeaseSource]
