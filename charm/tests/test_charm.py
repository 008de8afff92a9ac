"""The charm under the Operator Framework's own test harness (ops.testing: Context and State).

Each event and relation with the data the real charms send: Charmed Kubernetes' etcd (connection_string,
client_ca/cert/key) and the seed's etcd (hostname, port) on `db`; docker on `network` and `docker-host`;
kubernetes-worker on `cni`. The leader seeds a real etcd; statuses come from the real `flannel-ebpf
health` (or, for a ready agent, its line as the lab test gets it from a running agent).
"""

from __future__ import annotations

import json
import stat
from typing import Any

import pytest
import yaml
from conftest import CHARM_DIR, READY_LINE, FakeHost
from ops import testing

from charm import FlannelEbpfCharm
from flannel_ebpf.lab.etcd import EtcdServer

INSTALLED = testing.StoredState(owner_path="FlannelEbpfCharm", content={"installed": "0.1.0", "deployed": {}})
CONFIG_DEFAULT = {"network": "10.10.0.0/16", "etcd-prefix": "/coreos.com/network"}
CA, CERT, KEY = (
    f"-----BEGIN {k}-----\nMIIB{k}\n-----END {k}-----" for k in ("CERTIFICATE", "CERTIFICATE", "PRIVATE KEY")
)


def ctx() -> testing.Context[FlannelEbpfCharm]:
    return testing.Context(FlannelEbpfCharm)


def deployed(**content: Any) -> testing.StoredState:
    return testing.StoredState(
        owner_path="FlannelEbpfCharm", content={"installed": "0.1.0", "deployed": {**CONFIG_DEFAULT, **content}}
    )


def ck8s_etcd(endpoint: str, tls: bool = False) -> testing.Relation:
    """The db relation as Charmed Kubernetes' etcd fills it (interface etcd)."""
    data = {"connection_string": endpoint, "version": "3.4.22"}
    if tls:
        data.update(client_ca=CA, client_cert=CERT, client_key=KEY)
    return testing.Relation("db", "etcd", remote_app_name="etcd", remote_units_data={0: data})


def ours(data: Any) -> dict[str, str]:
    """A unit's relation data less what juju itself puts there (addresses)."""
    return {k: v for k, v in data.items() if k not in ("egress-subnets", "ingress-address", "private-address")}


def stored(state: testing.State) -> dict[str, Any]:
    return dict(next(s for s in state.stored_states if s.owner_path == "FlannelEbpfCharm").content)


# ---------------------------------------------------------------- install, config


def test_install_puts_the_packaged_unit_in_place_and_waits_for_etcd(host: FakeHost) -> None:
    out = ctx().run(ctx().on.install(), testing.State())
    unit = host.paths.systemd_dir / "flannel-ebpf.service"
    assert unit.read_text() == (host.charm_dir / "files" / "flannel-ebpf.service").read_text()
    assert "daemon-reload" in host.systemctl_calls()
    assert stored(out)["installed"] == "0.1.0"
    assert out.unit_status == testing.WaitingStatus("waiting for etcd: relate db to etcd")


def test_install_without_a_wheel_in_the_charm_is_blocked(host: FakeHost) -> None:
    for w in (host.charm_dir / "wheels").iterdir():
        w.unlink()
    out = ctx().run(ctx().on.install(), testing.State())
    assert out.unit_status.name == "blocked"
    assert "no flannel-ebpf wheel" in out.unit_status.message


def test_config_changed_with_an_unknown_backend_is_blocked(host: FakeHost) -> None:
    out = ctx().run(ctx().on.config_changed(), testing.State(config={"backend": "gre"}, stored_states=[INSTALLED]))
    assert out.unit_status == testing.BlockedStatus("backend 'gre': one of udp, vxlan, host-gw")


@pytest.mark.parametrize(
    ("option", "before", "after"),
    [("network", "10.10.0.0/16", "10.20.0.0/16"), ("etcd-prefix", "/coreos.com/network", "/other/network")],
)
def test_config_changed_network_or_prefix_after_deployment_is_refused(
    host: FakeHost, etcd: EtcdServer, option: str, before: str, after: str
) -> None:
    state = testing.State(
        leader=True, config={option: after}, relations=[ck8s_etcd(etcd.endpoint)], stored_states=[deployed()]
    )
    out = ctx().run(ctx().on.config_changed(), state)
    assert out.unit_status.name == "blocked"
    assert out.unit_status.message.startswith(f"{option} cannot change after deployment ({before} -> {after})")
    assert f"set it back to {before}" in out.unit_status.message
    # Nothing moved: no drop-in, no restart, and etcd got no config under either prefix.
    assert not host.paths.dropin.exists()
    assert not any("restart" in c for c in host.systemctl_calls())
    assert etcd.ctl("get", "", "--from-key", "--keys-only").strip() == ""
    # Set back, it is accepted again.
    state = testing.State(
        leader=True, config={option: before}, relations=[ck8s_etcd(etcd.endpoint)], stored_states=[deployed()]
    )
    back = ctx().run(ctx().on.config_changed(), state)
    assert back.unit_status.name == "waiting"
    assert host.paths.dropin.exists()


# ---------------------------------------------------------------- db (etcd)


def test_db_changed_from_charmed_kubernetes_etcd_seeds_the_config_and_starts_the_agent(
    host: FakeHost, etcd: EtcdServer
) -> None:
    rel = ck8s_etcd(etcd.endpoint)
    out = ctx().run(
        ctx().on.relation_changed(rel), testing.State(leader=True, relations=[rel], stored_states=[INSTALLED])
    )
    assert json.loads(etcd.ctl("get", "/coreos.com/network/config", "--print-value-only")) == {
        "Network": "10.10.0.0/16", "SubnetLen": 24, "Backend": {"Type": "udp"}}  # fmt: skip
    dropin = host.paths.dropin.read_text()
    assert f'Environment="FLANNELD_ETCD_ENDPOINTS={etcd.endpoint}"' in dropin
    assert 'Environment="FLANNELD_ETCD_PREFIX=/coreos.com/network"' in dropin
    assert "CAFILE" not in dropin
    assert [c for c in host.systemctl_calls() if "flannel-ebpf.service" in c or c == "daemon-reload"][-3:] == [
        "daemon-reload",
        "enable flannel-ebpf.service",
        "restart flannel-ebpf.service",
    ]
    # No agent runs in a unit test: the real `flannel-ebpf health` says so, and the unit waits.
    assert out.unit_status.name == "waiting"
    assert out.unit_status.message.startswith("not-ready no agent state in")
    assert stored(out)["deployed"] == CONFIG_DEFAULT


def test_db_changed_keeps_an_existing_config_of_the_same_network(host: FakeHost, etcd: EtcdServer) -> None:
    existing = {"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan"}}
    etcd.ctl("put", "/coreos.com/network/config", json.dumps(existing))
    rel = ck8s_etcd(etcd.endpoint)
    out = ctx().run(
        ctx().on.relation_changed(rel), testing.State(leader=True, relations=[rel], stored_states=[INSTALLED])
    )
    assert json.loads(etcd.ctl("get", "/coreos.com/network/config", "--print-value-only")) == existing
    assert out.unit_status.name == "waiting"


def test_db_changed_with_another_network_in_etcd_is_blocked_and_never_overwrites(
    host: FakeHost, etcd: EtcdServer
) -> None:
    etcd.ctl("put", "/coreos.com/network/config", '{"Network": "10.5.0.0/16"}')
    rel = ck8s_etcd(etcd.endpoint)
    out = ctx().run(
        ctx().on.relation_changed(rel), testing.State(leader=True, relations=[rel], stored_states=[INSTALLED])
    )
    assert out.unit_status.name == "blocked"
    assert "has Network 10.5.0.0/16, the charm's network is 10.10.0.0/16" in out.unit_status.message
    assert json.loads(etcd.ctl("get", "/coreos.com/network/config", "--print-value-only")) == {"Network": "10.5.0.0/16"}
    assert not host.paths.dropin.exists()


def test_db_changed_from_the_seed_etcd_charm_hostname_and_port(host: FakeHost, etcd: EtcdServer) -> None:
    hostport = etcd.endpoint.removeprefix("http://")
    h, p = hostport.rsplit(":", 1)
    rel = testing.Relation("db", "etcd", remote_app_name="etcd", remote_units_data={0: {"hostname": h, "port": p}})
    out = ctx().run(ctx().on.relation_changed(rel), testing.State(relations=[rel], stored_states=[INSTALLED]))
    assert f'Environment="FLANNELD_ETCD_ENDPOINTS=http://{h}:{p}"' in host.paths.dropin.read_text()
    # Not the leader: it leaves the config to the leader.
    assert etcd.ctl("get", "/coreos.com/network/config", "--print-value-only").strip() == ""
    assert out.unit_status.name == "waiting"


def test_db_changed_with_client_certificates_writes_them_for_the_agent(host: FakeHost) -> None:
    rel = ck8s_etcd("https://10.0.0.1:2379,https://10.0.0.2:2379", tls=True)
    ctx().run(ctx().on.relation_changed(rel), testing.State(relations=[rel], stored_states=[INSTALLED]))
    etc = host.paths.etc_dir
    assert (etc / "etcd-ca.pem").read_text() == CA + "\n"
    assert (etc / "etcd-client.pem").read_text() == CERT + "\n"
    assert (etc / "etcd-client-key.pem").read_text() == KEY + "\n"
    assert stat.S_IMODE((etc / "etcd-client-key.pem").stat().st_mode) == 0o600
    dropin = host.paths.dropin.read_text()
    assert 'Environment="FLANNELD_ETCD_ENDPOINTS=https://10.0.0.1:2379,https://10.0.0.2:2379"' in dropin
    assert f'Environment="FLANNELD_ETCD_CAFILE={etc / "etcd-ca.pem"}"' in dropin
    assert f'Environment="FLANNELD_ETCD_CERTFILE={etc / "etcd-client.pem"}"' in dropin
    assert f'Environment="FLANNELD_ETCD_KEYFILE={etc / "etcd-client-key.pem"}"' in dropin


def test_db_joined_before_etcd_sent_its_endpoints_waits(host: FakeHost) -> None:
    rel = testing.Relation("db", "etcd", remote_app_name="etcd", remote_units_data={0: {}})
    out = ctx().run(
        ctx().on.relation_joined(rel, remote_unit=0), testing.State(relations=[rel], stored_states=[INSTALLED])
    )
    assert out.unit_status == testing.WaitingStatus("waiting for etcd's endpoints on the db relation")
    assert not host.paths.dropin.exists()


def test_db_broken_stops_the_agent_and_waits(host: FakeHost) -> None:
    rel = ck8s_etcd("http://10.0.0.1:2379")
    out = ctx().run(ctx().on.relation_broken(rel), testing.State(relations=[rel], stored_states=[deployed()]))
    assert "disable --now flannel-ebpf.service" in host.systemctl_calls()
    assert host.cli_calls() == []  # the data path stays: containers keep reaching the peers they know
    assert out.unit_status == testing.WaitingStatus("waiting for etcd: relate db to etcd")


# ---------------------------------------------------------------- update-status and the health action


def test_update_status_is_active_with_the_ready_line(host: FakeHost) -> None:
    host.agent_says(READY_LINE)
    host.lease()
    state = testing.State(
        config={"lxc-bridge": ""}, relations=[ck8s_etcd("http://10.0.0.1:2379")], stored_states=[deployed()]
    )
    out = ctx().run(ctx().on.update_status(), state)
    assert out.unit_status == testing.ActiveStatus(READY_LINE)


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (
            "not-ready waiting-config: no network config at /coreos.com/network/config at http://10.0.0.1:2379",
            "waiting",
        ),
        ("not-ready acquiring: acquiring a subnet lease", "waiting"),
        ("not-ready conflict: 10.10.16.0/24 is held by 10.0.0.7", "blocked"),
        ("not-ready bridge lxcbr0 lost its address 10.10.16.1/24: run `flannel-ebpf bridge lxcbr0` again", "blocked"),
    ],
)
def test_update_status_not_ready(host: FakeHost, line: str, kind: str) -> None:
    host.agent_says(line, 1)
    state = testing.State(relations=[ck8s_etcd("http://10.0.0.1:2379")], stored_states=[deployed()])
    out = ctx().run(ctx().on.update_status(), state)
    assert (out.unit_status.name, out.unit_status.message) == (kind, line)


def test_health_action_prints_the_ready_line(host: FakeHost) -> None:
    host.agent_says(READY_LINE)
    c = ctx()
    c.run(c.on.action("health"), testing.State(stored_states=[deployed()]))
    assert c.action_results == {"output": READY_LINE, "ready": "true"}


def test_health_action_without_an_agent_says_not_ready(host: FakeHost) -> None:
    c = ctx()
    c.run(c.on.action("health"), testing.State(stored_states=[deployed()]))
    assert c.action_results is not None
    assert c.action_results["ready"] == "false"
    assert (
        c.action_results["output"]
        == f"not-ready no agent state in {host.paths.state_dir} (is flannel-ebpf up running?)"
    )


# ---------------------------------------------------------------- the container runtimes' relations


def docker_network() -> testing.SubordinateRelation:
    # The docker charm sends nothing flannel needs on `network` (it reads what flannel sends).
    return testing.SubordinateRelation("network", "sdn-plugin", remote_app_name="docker", remote_unit_data={})


@pytest.mark.parametrize("event", ["joined", "changed"])
def test_network_relation_hands_docker_the_subnet_and_mtu(host: FakeHost, event: str) -> None:
    host.agent_says("ready eth0 subnet:10.10.16.0/24 mtu:1472")
    host.lease()
    rel = docker_network()
    c = ctx()
    ev = c.on.relation_joined(rel, remote_unit=0) if event == "joined" else c.on.relation_changed(rel)
    state = testing.State(relations=[ck8s_etcd("http://10.0.0.1:2379"), rel], stored_states=[deployed()])
    out = c.run(ev, state)
    assert ours(out.get_relation(rel.id).local_unit_data) == {
        "subnet": "10.10.16.1/24", "mtu": "1472", "cidr": "10.10.0.0/16",
        "flannel-subnet": "10.10.16.1/24", "flannel-mtu": "1472",
    }  # fmt: skip
    # docker owns the bridge here: no lxcbr0, no dnsmasq.
    assert not host.paths.lxc_default_conf.exists()
    assert not any("dnsmasq" in c for c in host.systemctl_calls())
    assert out.unit_status == testing.ActiveStatus("ready eth0 subnet:10.10.16.0/24 mtu:1472")


def test_docker_host_relation_joined_reconciles(host: FakeHost) -> None:
    rel = testing.SubordinateRelation("docker-host", "juju-info", remote_app_name="docker")
    out = ctx().run(
        ctx().on.relation_joined(rel, remote_unit=0), testing.State(relations=[rel], stored_states=[INSTALLED])
    )
    assert out.unit_status == testing.WaitingStatus("waiting for etcd: relate db to etcd")


def test_network_relation_broken_leaves_the_relation_alone(host: FakeHost) -> None:
    host.agent_says(READY_LINE)
    host.lease()
    rel = docker_network()
    state = testing.State(
        config={"lxc-bridge": ""}, relations=[ck8s_etcd("http://10.0.0.1:2379"), rel], stored_states=[deployed()]
    )
    out = ctx().run(ctx().on.relation_broken(rel), state)
    assert ours(out.get_relation(rel.id).local_unit_data) == {}
    assert out.unit_status == testing.ActiveStatus(READY_LINE)


def test_cni_relation_hands_kubernetes_the_cidr_and_the_conflist(host: FakeHost) -> None:
    host.agent_says("ready eth0 subnet:10.10.16.0/24 mtu:1472")
    host.lease()
    rel = testing.SubordinateRelation(
        "cni", "kubernetes-cni", remote_app_name="kubernetes-worker", remote_unit_data={"kubeconfig-hash": "5f1c3a"}
    )
    out = ctx().run(ctx().on.relation_changed(rel), testing.State(
        relations=[ck8s_etcd("http://10.0.0.1:2379"), rel], stored_states=[deployed()]))  # fmt: skip
    assert ours(out.get_relation(rel.id).local_unit_data) == {
        "cidr": "10.10.0.0/16",
        "cni-conf-file": "10-flannel.conflist",
    }
    # written by the real `flannel-ebpf cni-config`
    conflist = json.loads(host.paths.cni_conf.read_text())
    bridge = conflist["plugins"][0]
    assert (bridge["type"], bridge["bridge"], bridge["mtu"]) == ("bridge", "cni0", 1472)
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.10.16.0/24"}]]
    assert not host.paths.lxc_default_conf.exists()


def test_stop_stops_the_agent_and_dnsmasq(host: FakeHost) -> None:
    ctx().run(ctx().on.stop(), testing.State(stored_states=[deployed()]))
    calls = host.systemctl_calls()
    assert "disable --now flannel-ebpf-dnsmasq.service" in calls
    assert "disable --now flannel-ebpf.service" in calls
    # The unit goes away: its data path too.
    assert host.cli_calls() == [f"down --state-dir {host.paths.state_dir}"]


def test_metadata_declares_the_seed_relations() -> None:
    meta = yaml.safe_load((CHARM_DIR / "charmcraft.yaml").read_text())
    assert meta["subordinate"] is True
    req = meta["requires"]
    assert req["db"]["interface"] == "etcd"
    assert (req["docker-host"]["interface"], req["docker-host"]["scope"]) == ("juju-info", "container")
    assert req["network"]["scope"] == "container"
    assert (req["cni"]["interface"], req["cni"]["scope"]) == ("kubernetes-cni", "container")
    config = meta["config"]["options"]
    assert (config["network"]["default"], config["backend"]["default"]) == ("10.10.0.0/16", "udp")
    assert "health" in meta["actions"]
