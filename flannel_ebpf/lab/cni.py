"""Containers made by the real CNI plugins, invoked as a container runtime (containerd, CRI-O) invokes them.

What libcni does for a conflist, done here with subprocesses:
- every plugin is an executable `<CNI_PATH>/<type>`, run in the host's network namespace with
  CNI_COMMAND (ADD/DEL), CNI_CONTAINERID, CNI_NETNS (`/var/run/netns/<container ns>`), CNI_IFNAME,
  CNI_PATH in its environment and its configuration as JSON on stdin; a result (or an error) as JSON on
  stdout;
- each plugin's configuration is its entry of `plugins` plus the list's `name` and `cniVersion`, and on
  ADD the previous plugin's result as `prevResult`; ADD runs the list in order, DEL in reverse order, with
  the ADD result as `prevResult` from CNI 0.4.0 on (before that, DEL got none);
- the runtime also brings up `lo` with the `loopback` plugin, a network of its own.

One deliberate difference: host-local's `dataDir` is set to a directory of the lab's (runtimes leave it
at /var/lib/cni/networks), so nothing the lab allocates outlives it outside its own directory. The
results libcni caches in /var/lib/cni/results are kept in memory instead.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from loguru import logger

from .containers import Container
from .netns import Netns, create_netns
from .topology import Host

#: where distributions put the plugins: Debian/Ubuntu's containernetworking-plugins, upstream releases,
#: Fedora/RHEL. FLANNEL_EBPF_CNI_PATH overrides.
CNI_PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin", "/usr/libexec/cni")
NEEDED_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
LOOPBACK_NETWORK = "cni-loopback"  # the name containerd gives its loopback network


class CniError(RuntimeError):
    """A plugin failed: its CNI error (code, msg, details) or its stderr."""


def find_plugin_dir(needed: tuple[str, ...] = NEEDED_PLUGINS) -> Path | None:
    """The first directory holding every plugin in `needed` (None if there is none)."""
    candidates = [os.environ["FLANNEL_EBPF_CNI_PATH"]] if os.environ.get("FLANNEL_EBPF_CNI_PATH") else []
    for d in (*candidates, *CNI_PLUGIN_DIRS):
        path = Path(d)
        if all(os.access(path / p, os.X_OK) for p in needed):
            return path
    return None


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


@dataclass
class CniRuntime:
    """One host's runtime: a conflist and the plugins, invoked in the host's network namespace."""

    host: Host
    conflist: dict[str, Any]
    plugin_dir: Path
    data_dir: Path  # host-local's dataDir (instead of /var/lib/cni/networks)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # container id -> ADD result (libcni's cache)

    @property
    def version(self) -> str:
        return str(self.conflist["cniVersion"])

    def plugin_conf(self, plugin: dict[str, Any], prev_result: dict[str, Any] | None) -> dict[str, Any]:
        conf = copy.deepcopy(plugin)
        conf["name"] = self.conflist["name"]
        conf["cniVersion"] = self.version
        ipam = conf.get("ipam")
        if isinstance(ipam, dict) and ipam.get("type") == "host-local":
            ipam["dataDir"] = str(self.data_dir)
        if prev_result is not None:
            conf["prevResult"] = prev_result
        return conf

    def invoke(
        self, command: str, conf: dict[str, Any], container_id: str, netns: Netns, ifname: str
    ) -> dict[str, Any]:
        plugin = self.plugin_dir / conf["type"]
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": f"/var/run/netns/{netns.name}",
            "CNI_IFNAME": ifname,
            "CNI_PATH": str(self.plugin_dir),
            # the plugins call iptables (ipMasq, portmap) and nothing else from PATH
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        r = self.host.exec([str(plugin)], input=json.dumps(conf), env=env, check=False, timeout=30)
        if not r.ok:
            raise CniError(f"{conf['type']} {command} for {container_id} on {self.host.name}: "
                           f"{r.stdout.strip() or r.stderr.strip() or r.returncode}")  # fmt: skip
        logger.debug("cni {} {} {}: {}", conf["type"], command, container_id, r.stdout.strip()[:200])
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def add(self, container_id: str, netns: Netns, ifname: str = "eth0") -> dict[str, Any]:
        """`lo` up (loopback), then the conflist's plugins in order; returns the last result."""
        loopback = {"cniVersion": self.version, "name": LOOPBACK_NETWORK, "type": "loopback"}
        self.invoke("ADD", loopback, container_id, netns, "lo")
        result: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            result = self.invoke("ADD", self.plugin_conf(plugin, result), container_id, netns, ifname)
        assert result is not None
        self.results[container_id] = result
        return result

    def delete(self, container_id: str, netns: Netns, ifname: str = "eth0") -> None:
        """The conflist's plugins in reverse order, then loopback, as a runtime tears a sandbox down."""
        cached = self.results.pop(container_id, None)
        prev = cached if _version(self.version) >= (0, 4, 0) else None
        for plugin in reversed(self.conflist["plugins"]):
            self.invoke("DEL", self.plugin_conf(plugin, prev), container_id, netns, ifname)
        loopback = {"cniVersion": self.version, "name": LOOPBACK_NETWORK, "type": "loopback"}
        self.invoke("DEL", loopback, container_id, netns, "lo")


def container_from_result(name: str, host: Host, ns: Netns, result: dict[str, Any], mtu: int, bridge: str) -> Container:
    """A lab Container from a CNI result: its address and gateway, and the host side of its veth."""
    ip4 = next(i for i in result["ips"] if IPv4Interface(i["address"]).version == 4)
    host_veth = next(i["name"] for i in result["interfaces"] if not i.get("sandbox") and i["name"] != bridge)
    return Container(name, host, ns, IPv4Interface(ip4["address"]).ip, IPv4Address(ip4["gateway"]), mtu, host_veth)


def add_container(runtime: CniRuntime, name: str) -> Container:
    """A container namespace on the runtime's host, networked by the plugins (ADD)."""
    node = runtime.host.node
    assert isinstance(node, Netns)
    prefix = node.name.rsplit("-", 1)[0]
    ns = create_netns(f"{prefix}-{name}", node.scratch_dir)
    result = runtime.add(name, ns)
    bridge = next(p for p in runtime.conflist["plugins"] if p["type"] == "bridge")
    return container_from_result(name, runtime.host, ns, result, int(bridge["mtu"]), bridge.get("bridge", "cni0"))


def allocations(data_dir: Path, network: str) -> list[str]:
    """The addresses host-local holds for `network` (one file per address; `last_reserved_ip.*` and
    `lock` are its bookkeeping)."""
    d = data_dir / network
    if not d.is_dir():
        return []
    names = []
    for p in d.iterdir():
        try:
            IPv4Address(p.name)
        except ValueError:
            continue
        names.append(p.name)
    return sorted(names)


def remove_data_dir(data_dir: Path) -> None:
    shutil.rmtree(data_dir, ignore_errors=True)
