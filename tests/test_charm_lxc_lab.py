"""The seed's LXC walk-through, for real: two lab hosts, the charm on each, real LXC containers on lxcbr0.

`juju add-relation flannel etcd`: the charm's leader seeds 10.10.0.0/16 at /coreos.com/network/config
in the lab's etcd, each unit writes the agent's drop-in; the agents run (the lab starts them with the
drop-in's FLANNELD_* settings, as systemd would) and lease a 10.10.x.0/24 each. update-status then runs
the charm's LXC code path inside each host's namespace: lxcbr0 from the lease (`flannel-ebpf bridge`),
dnsmasq's configuration, LXC's defaults; the unit goes active with health's line, `ready lxcbr:10.10.x.1
subnet:10.10.x.1/24 mtu:1472`. dnsmasq runs in each namespace with the charm's configuration; a real
LXC container per host (`juju add-machine lxc:N`) takes its address by DHCP from its host's subnet, with
the MTU, and the two ping each other across hosts over the eBPF udp path.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from ipaddress import IPv4Interface
from typing import Any

import pytest
from ops import testing

from flannel_ebpf.lab.lxc import LxcContainer, ensure_rootfs, make_container, missing_tools
from flannel_ebpf.lab.netns import Netns, run, stop_process

from .charm_lab import READY_RE, charm_workload, etcd_relation, installed, run_charm, start_agent_from_dropin

pytestmark = pytest.mark.lab


def test_lxc_containers_get_dhcp_addresses_from_their_hosts_flannel_subnet_and_ping_across_hosts(
    lab_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip(f"needs {missing} (scripts/setup.sh installs lxc, mmdebstrap, dnsmasq-base)")
    rootfs = ensure_rootfs()
    lab = lab_factory(hosts=2)  # no network config: the charm's leader puts it there
    hosts = ["h1", "h2"]
    workloads = {h: charm_workload(lab, h) for h in hosts}
    dnsmasq: list[subprocess.Popen[bytes]] = []
    containers: list[LxcContainer] = []
    try:
        # `juju add-relation flannel-ebpf etcd`: config-changed on the leader, relation-changed on the other.
        out, _ = run_charm(workloads["h1"], "config_changed",
                           testing.State(leader=True, relations=[etcd_relation(lab)], stored_states=[installed()]),
                           monkeypatch)  # fmt: skip
        assert out.unit_status.name == "waiting"  # no agent yet
        assert lab.etcd_get("/coreos.com/network/config") == (
            '{"Network": "10.10.0.0/16", "SubnetLen": 24, "Backend": {"Type": "udp"}}')  # fmt: skip
        run_charm(workloads["h2"], "config_changed",
                  testing.State(relations=[etcd_relation(lab)], stored_states=[installed()]), monkeypatch)  # fmt: skip
        for h in hosts:
            env = start_agent_from_dropin(lab, h, workloads[h])
            assert env["FLANNELD_ETCD_ENDPOINTS"] == lab.etcd_endpoint
        lab.wait_all_ready(timeout=60)

        deployed = {"network": "10.10.0.0/16", "etcd-prefix": "/coreos.com/network"}
        lines = {}
        for h in hosts:
            state = testing.State(relations=[etcd_relation(lab)], stored_states=[installed(deployed)])
            out, _ = run_charm(workloads[h], "update_status", state, monkeypatch)
            env = lab.subnet_env(h)
            assert env is not None and str(env.network) == "10.10.0.0/16" and env.mtu == 1472
            want = f"ready lxcbr:{env.subnet.ip} subnet:{env.subnet} mtu:1472"
            assert out.unit_status == testing.ActiveStatus(want), out.unit_status
            # `./health` (juju exec) and the health action print the same line.
            assert lab.agent(h).health().stdout.strip() == want
            _, ctx = run_charm(workloads[h], "health", state, monkeypatch)
            assert ctx.action_results == {"output": want, "ready": "true"}
            assert READY_RE.match(want)
            lines[h] = want
            node = lab.host(h).node
            assert isinstance(node, Netns)
            link = node.ip("-o", "addr", "show", "dev", "lxcbr0").stdout
            assert str(env.subnet) in link
            # dnsmasq as the charm's unit runs it (its ExecStart, the charm's configuration), in the host's
            # namespace instead of under systemd, plus a pid file and a log for the test.
            paths = workloads[h].paths
            unit = (paths.systemd_dir / "flannel-ebpf-dnsmasq.service").read_text()
            exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
            assert f"--conf-file={paths.dnsmasq_conf('lxcbr0')}" in exec_start
            systemctl_log = (paths.systemd_dir.parents[2] / "systemctl.log").read_text().splitlines()
            assert "enable flannel-ebpf-dnsmasq.service" in systemctl_log
            pid_file = lab.dir / f"dnsmasq-{h}.pid"
            log = lab.dir / f"dnsmasq-{h}.log"
            argv = [*shlex.split(exec_start.removeprefix("ExecStart=")), f"--pid-file={pid_file}", "--log-dhcp",
                    f"--log-facility={log}"]  # fmt: skip
            with open(lab.dir / f"dnsmasq-{h}.out", "wb") as out_file:
                proc = node.popen(argv, stdout=out_file, stderr=out_file)
            dnsmasq.append(proc)
            time.sleep(0.5)
            assert proc.poll() is None, (lab.dir / f"dnsmasq-{h}.out").read_text()
        assert lines["h1"] != lines["h2"]

        # `juju add-machine lxc:N`: a container per host, with the LXC defaults the charm wrote.
        for h in hosts:
            node = lab.host(h).node
            assert isinstance(node, Netns)
            net = workloads[h].paths.lxc_default_conf.read_text()
            c = make_container(f"{lab.prefix}{h}c1", lab.dir / "lxc", node, net, rootfs)
            containers.append(c)
            c.start()
        for c, h in zip(containers, hosts, strict=True):
            env = lab.subnet_env(h)
            assert env is not None
            r = c.attach(["dhclient", "-1", "-v", "-lf", "/var/lib/dhcp/dhclient.leases", "-pf", "/run/dhclient.pid",
                          "eth0"], timeout=60, check=False)  # fmt: skip
            log = (lab.dir / f"dnsmasq-{h}.log").read_text(errors="replace")[-3000:]
            assert r.ok, f"dhclient in {c.name}: {r.stderr}\ndnsmasq: {log}"
            addr = IPv4Interface(c.ipv4() or "0.0.0.0/32")
            assert addr.network == env.subnet.network, f"{c.name} got {addr}, not from {env.subnet.network}"
            assert addr.ip != env.subnet.ip
            assert c.mtu() == 1472
            lease = (c.dir / "rootfs" / "var" / "lib" / "dhcp" / "dhclient.leases").read_text()
            assert "option interface-mtu 1472;" in lease  # the MTU came by DHCP (option 26) too
            assert f"option routers {env.subnet.ip};" in lease
        a, b = containers
        b_ip = b.ipv4().split("/")[0]  # type: ignore[union-attr]
        a_ip = a.ipv4().split("/")[0]  # type: ignore[union-attr]
        assert a.attach(["ping", "-c", "3", "-W", "2", b_ip], check=False, timeout=30).ok, "h1's container -> h2's"
        assert b.attach(["ping", "-c", "3", "-W", "2", a_ip], check=False, timeout=30).ok, "h2's container -> h1's"
        # ... over the eBPF udp path: each agent's eBPF programs encapsulated and decapsulated those pings.
        for h in hosts:
            summary = lab.agent_status(h)["summary"]
            assert (summary["backend"], summary["datapath"].get("datapath")) == ("udp", "ebpf"), summary
            assert summary["throughput"]["encap_ok"]["packets"] >= 3, summary["throughput"]
            assert summary["throughput"]["decap_ok"]["packets"] >= 3, summary["throughput"]
    finally:
        for c in containers:
            c.destroy()
        for p in dnsmasq:
            stop_process(p, 5.0, what="dnsmasq")
    # Nothing of this reached the root namespace.
    assert not run(["ip", "link", "show", "lxcbr0"], check=False).ok
