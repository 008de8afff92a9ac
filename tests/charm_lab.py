"""The juju charm (charm/) on a lab host: its Workload with every command run inside the host's namespace.

`charm_workload(lab, host)` gives the charm's own Workload whose `flannel-ebpf` and `python` are the
lab's CLI run in the host's namespace (with the bpffs view the lab's agents have), whose files are the
lab host's (subnet.env, state dir) or under the lab directory (/etc stand-ins), and whose systemctl is a
recorder: the lab, not systemd, runs the agents (`start_agent_from_dropin` starts them with the
FLANNELD_* settings of the drop-in the charm wrote). `run_charm` runs one event through ops.testing.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from ops import testing

from flannel_ebpf.lab.agent import REPO_ROOT, cli_command, cli_env
from flannel_ebpf.lab.lab import Lab
from flannel_ebpf.lab.netns import Netns

sys.path.insert(0, str(REPO_ROOT / "charm" / "src"))

from workload import Paths, Workload

from charm import FlannelEbpfCharm

CHARM_DIR = REPO_ROOT / "charm"
READY_RE = re.compile(r"^ready (?P<label>[a-z]+):(?P<gw>[\d.]+) subnet:(?P<subnet>[\d./]+) mtu:(?P<mtu>\d+)$")


def _script(path: Path, argv: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in cli_env().items() if k in ("PYTHONPATH", "PYTHONUNBUFFERED"))
    path.write_text(f'#!/bin/sh\nexec env {env} {shlex.join(argv)} "$@"\n')
    path.chmod(0o755)


def charm_workload(lab: Lab, host: str) -> Workload:
    h = lab.host(host)
    node = h.node
    assert isinstance(node, Netns)
    root = lab.dir / "charm" / host
    paths = Paths(
        venv=root / "opt" / "flannel-ebpf",
        systemd_dir=root / "etc" / "systemd" / "system",
        etc_dir=root / "etc" / "flannel-ebpf",
        state_dir=h.state_dir,
        subnet_file=h.subnet_file,
        cni_conf=root / "etc" / "cni" / "net.d" / "10-flannel.conflist",
        lxc_default_conf=root / "etc" / "lxc" / "default.conf",
        lxc_net_defaults=root / "etc" / "default" / "lxc-net",
        dnsmasq_lease_file=root / "var" / "lib" / "misc" / "flannel-ebpf-dnsmasq.leases",
    )
    _script(paths.flannel_ebpf, node.wrap(cli_command(), share_bpffs=True))
    _script(paths.python, node.wrap([sys.executable]))
    log = root / "systemctl.log"
    systemctl = root / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    systemctl.chmod(0o755)
    return Workload(CHARM_DIR, paths, systemctl=(str(systemctl),))


def etcd_relation(lab: Lab) -> testing.Relation:
    """`db` as Charmed Kubernetes' etcd fills it, pointing at the lab's etcd."""
    data = {"connection_string": lab.etcd_endpoint, "version": "3.4"}
    return testing.Relation("db", "etcd", remote_app_name="etcd", remote_units_data={0: data})


def run_charm(workload: Workload, event: str, state: testing.State, monkeypatch: Any) -> tuple[testing.State, Any]:
    """One event through the Operator Framework's harness, with this host's Workload."""
    monkeypatch.setattr(FlannelEbpfCharm, "make_workload", staticmethod(lambda _dir: workload))
    ctx = testing.Context(FlannelEbpfCharm)
    ev = ctx.on.action("health") if event == "health" else getattr(ctx.on, event)()
    out = ctx.run(ev, state)
    return out, ctx


def installed(deployed: dict[str, str] | None = None) -> testing.StoredState:
    return testing.StoredState(
        owner_path="FlannelEbpfCharm", content={"installed": "0.1.0", "deployed": deployed or {}}
    )


def dropin_env(workload: Workload) -> dict[str, str]:
    """The FLANNELD_* settings of the drop-in the charm wrote, as systemd would hand them to the agent."""
    env = {}
    for line in workload.paths.dropin.read_text().splitlines():
        m = re.fullmatch(r'Environment="(FLANNELD_[A-Z_]+)=(.*)"', line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


def start_agent_from_dropin(lab: Lab, host: str, workload: Workload) -> dict[str, str]:
    env = dropin_env(workload)
    lab.start_agent(host, env=env)
    return env
