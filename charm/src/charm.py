#!/usr/bin/env python3
"""flannel-ebpf as a juju charm: a subordinate that puts its principal's host on the flannel overlay.

Every event ends in `_reconcile`, which drives the host towards what config and relations say:
etcd from `db`, FLANNELD_* in the packaged unit's drop-in, the network config seeded by the leader, then
(once the agent holds a lease) the containers' side: lxcbr0 with DHCP for LXC hosts, the subnet and MTU
on `network` for the docker charm, the CIDR and the CNI config file on `cni` for Kubernetes workers.
The unit's status is `flannel-ebpf health`'s line.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import bridge
import ops
from settings import (
    CharmConfig,
    ConfigError,
    EtcdData,
    UnitStatus,
    agent_environment,
    config_conflict,
    locked_change,
    status_for_health,
)
from workload import Workload, WorkloadError

logger = logging.getLogger(__name__)

STATUS_TYPES: dict[str, type[ops.StatusBase]] = {
    "active": ops.ActiveStatus,
    "waiting": ops.WaitingStatus,
    "blocked": ops.BlockedStatus,
    "maintenance": ops.MaintenanceStatus,
}


class FlannelEbpfCharm(ops.CharmBase):
    _stored = ops.StoredState()

    #: how long one hook waits for the agent to be ready before reporting what it is waiting for
    ready_wait = 20.0

    def __init__(self, framework: ops.Framework) -> None:
        super().__init__(framework)
        self._stored.set_default(deployed={}, installed="")
        self.workload = self.make_workload(Path(self.charm_dir))
        observe = framework.observe
        observe(self.on.install, self._on_install)
        observe(self.on.upgrade_charm, self._on_install)
        observe(self.on.stop, self._on_stop)
        observe(self.on.health_action, self._on_health_action)
        for event in (
            self.on.config_changed,
            self.on.update_status,
            self.on.leader_elected,
            self.on.start,
        ):
            observe(event, self._reconcile)
        for name in ("db", "docker-host", "host", "network", "cni"):
            rel = self.on[name]
            for event in (rel.relation_joined, rel.relation_changed, rel.relation_departed, rel.relation_broken):
                observe(event, self._reconcile)

    @staticmethod
    def make_workload(charm_dir: Path) -> Workload:
        return Workload(charm_dir)

    # ------------------------------------------------------------ events

    def _on_install(self, event: ops.EventBase) -> None:
        self.unit.status = ops.MaintenanceStatus("installing flannel-ebpf from the charm's wheel")
        try:
            self._stored.installed = self.workload.install()
        except WorkloadError as e:
            self.unit.status = ops.BlockedStatus(f"install: {e}")
            return
        self._reconcile(event)

    def _on_stop(self, _event: ops.EventBase) -> None:
        self.workload.stop(remove_datapath=True)

    def _on_health_action(self, event: ops.ActionEvent) -> None:
        code, line = self.workload.health()
        event.log(line)
        event.set_results({"output": line, "ready": "true" if code == 0 and line.startswith("ready") else "false"})

    # ------------------------------------------------------------ reconciling

    def _reconcile(self, event: ops.EventBase) -> None:
        try:
            status = self._converge(event)
        except WorkloadError as e:
            status = UnitStatus("blocked", str(e))
        except ConfigError as e:
            status = UnitStatus("blocked", str(e))
        self.unit.status = STATUS_TYPES[status.kind](status.message)

    def _etcd(self, broken: ops.Relation | None) -> EtcdData | None:
        rel = self.model.get_relation("db")
        if rel is None or rel is broken:
            return None
        bags: list[Any] = [rel.data[rel.app]] if rel.app is not None else []
        bags += [rel.data[u] for u in sorted(rel.units, key=lambda u: u.name)]
        for bag in bags:
            data = EtcdData.from_relation(dict(bag))
            if data is not None:
                return data
        return None

    def _related(self, name: str, broken: ops.Relation | None) -> ops.Relation | None:
        rel = self.model.get_relation(name)
        return None if rel is None or rel is broken else rel

    def _converge(self, event: ops.EventBase) -> UnitStatus:
        if not self._stored.installed:
            return UnitStatus("waiting", "waiting for the install hook")
        config = CharmConfig.parse(self.config)
        refused = locked_change(self._stored.deployed, config)
        if refused:
            return UnitStatus("blocked", refused)
        broken = event.relation if isinstance(event, ops.RelationBrokenEvent) else None
        etcd = self._etcd(broken)
        if etcd is None:
            if self.model.get_relation("db") is None or isinstance(event, ops.RelationBrokenEvent):
                self.workload.stop()
                return UnitStatus("waiting", "waiting for etcd: relate db to etcd")
            return UnitStatus("waiting", "waiting for etcd's endpoints on the db relation")
        tls = self.workload.write_etcd_tls(etcd)

        if self.unit.is_leader():
            seeded = self.workload.seed_network_config(etcd, tls, config.etcd_prefix, config.network_config())
            if seeded.get("result") == "error":
                return UnitStatus("waiting", f"waiting for etcd: {seeded.get('error', '')}"[:300])
            if seeded.get("result") == "different":
                conflict = config_conflict(seeded.get("existing"), config)
                if conflict:
                    return UnitStatus("blocked", conflict)
        if not self._stored.deployed:
            self._stored.deployed = {"network": str(config.network), "etcd-prefix": config.etcd_prefix}

        changed = self.workload.write_environment(agent_environment(config, etcd, tls))
        self.workload.start(restart=changed)
        code, line = self._wait_health()
        status = status_for_health(line, code)
        if status.kind != "active":
            return status
        lease = self.workload.subnet_env()
        if lease is None:
            return UnitStatus("waiting", f"waiting for {self.workload.paths.subnet_file}")
        return self._containers(lease, broken, status)

    def _wait_health(self) -> tuple[int, str]:
        deadline = time.monotonic() + self.ready_wait
        while True:
            code, line = self.workload.health()
            if status_for_health(line, code).kind != "waiting" or time.monotonic() >= deadline:
                return code, line
            time.sleep(1.0)

    def _containers(self, lease: bridge.Lease, broken: ops.Relation | None, status: UnitStatus) -> UnitStatus:
        """The containers' side, from the lease: what each related runtime needs."""
        docker = self._related("network", broken)
        if docker is not None:
            docker.data[self.unit].update(bridge.network_relation_data(lease))
        cni = self._related("cni", broken)
        if cni is not None:
            conf = self.workload.write_cni_config()
            cni.data[self.unit].update({"cidr": str(lease.network), "cni-conf-file": conf})
        config = CharmConfig.parse(self.config)
        if docker is None and cni is None and config.lxc_bridge:
            try:
                self.workload.configure_lxc(config.lxc_bridge)
            except bridge.LeaseError as e:
                return UnitStatus("blocked", f"{config.lxc_bridge}: {e}")
            # health now prints the bridge's form: `ready lxcbr:10.10.16.1 subnet:10.10.16.1/24 mtu:1472`
            code, line = self.workload.health()
            status = status_for_health(line, code)
        return status


if __name__ == "__main__":  # pragma: no cover
    ops.main(FlannelEbpfCharm)
