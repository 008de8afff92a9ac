"""The containers' bridge of a flannel host, from the lease: lxcbr0 with DHCP for LXC, docker0 for Docker.

Pure computations (standard library only: the charm imports them, and so do the tests), plus `apply_*`
functions that make them real on this host, or in whatever network namespace they run in (the lab runs
`python bridge.py lxc ...` inside a host namespace with `ip netns exec`). The bridge itself is made by
`flannel-ebpf bridge NAME` (it records the bridge, so `flannel-ebpf health` prints the `lxcbr:` form);
this module adds what LXC and Docker need around it:

- LXC: a dnsmasq configuration that hands the containers addresses of the host's subnet (every address
  but the network's, the broadcast and the bridge's own), the gateway and the overlay MTU (DHCP option
  26), and an LXC default configuration whose veths join the bridge with that MTU.
- Docker: the `network` relation's data (subnet and MTU) as `dockerd --bip=<subnet> --mtu=<mtu>` would
  use it; `apply_docker_bridge` configures the bridge from that data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

LXC_BRIDGE = "lxcbr0"
DOCKER_BRIDGE = "docker0"
DHCP_OPTION_MTU = 26  # RFC 2132 interface MTU


class LeaseError(ValueError):
    """The subnet file or the relation data does not describe a lease."""


@dataclass(frozen=True)
class Lease:
    """What flannel wrote in subnet.env: the overlay network, this host's gateway/prefix, the MTU."""

    network: IPv4Network
    subnet: IPv4Interface  # the gateway with the subnet's length: 10.10.16.1/24
    mtu: int
    ipmasq: bool = False

    @classmethod
    def from_subnet_env(cls, text: str) -> Lease:
        env = parse_env(text)
        try:
            lease = cls(
                network=IPv4Network(env["FLANNEL_NETWORK"].split(",")[0].strip()),
                subnet=IPv4Interface(env["FLANNEL_SUBNET"]),
                mtu=int(env["FLANNEL_MTU"]),
                ipmasq=env.get("FLANNEL_IPMASQ", "false") == "true",
            )
        except KeyError as e:
            raise LeaseError(f"the subnet file has no {e.args[0]}") from None
        except ValueError as e:
            raise LeaseError(f"the subnet file is not flannel's: {e}") from None
        return lease.checked()

    @classmethod
    def from_network_relation(cls, data: Mapping[str, str]) -> Lease:
        """The `network` relation's data as this charm sends it (see `network_relation_data`)."""
        try:
            lease = cls(
                network=IPv4Network(data["cidr"]),
                subnet=IPv4Interface(data["subnet"]),
                mtu=int(data["mtu"]),
            )
        except KeyError as e:
            raise LeaseError(f"the relation data has no {e.args[0]}") from None
        except ValueError as e:
            raise LeaseError(f"the relation data is not a lease: {e}") from None
        return lease.checked()

    def checked(self) -> Lease:
        if self.subnet.ip in (self.subnet.network.network_address, self.subnet.network.broadcast_address):
            raise LeaseError(f"{self.subnet} is not a gateway address")
        if self.subnet.network.prefixlen > 30:
            raise LeaseError(f"{self.subnet.network} leaves no address for a container")
        if not 576 <= self.mtu <= 65535:  # DHCP clients refuse an interface MTU below 576 (RFC 2132)
            raise LeaseError(f"MTU {self.mtu} cannot be handed to containers")
        if not self.subnet.network.subnet_of(self.network):
            raise LeaseError(f"{self.subnet.network} is not inside {self.network}")
        return self

    @property
    def gateway(self) -> IPv4Address:
        return self.subnet.ip

    def subnet_env(self) -> str:
        """This lease as flannel writes subnet.env (what `flannel-ebpf bridge` reads)."""
        return (
            f"FLANNEL_NETWORK={self.network}\nFLANNEL_SUBNET={self.subnet}\n"
            f"FLANNEL_MTU={self.mtu}\nFLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}\n"
        )


def parse_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines (quotes removed, comments and `export ` skipped), as a shell reads subnet.env."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip().removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        if not sep or not key or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def dhcp_ranges(subnet: IPv4Interface) -> list[tuple[IPv4Address, IPv4Address]]:
    """The subnet's host addresses less the gateway, as contiguous (first, last) ranges."""
    hosts = subnet.network.hosts()
    first, last = next(hosts), subnet.network.broadcast_address - 1
    gw = subnet.ip
    ranges = []
    if first < gw:
        ranges.append((first, gw - 1))
    if gw < last:
        ranges.append((max(first, gw + 1), last))
    return ranges


def dnsmasq_conf(
    bridge: str, lease: Lease, *, lease_file: str, pid_file: str = "", dns: bool = True, lease_time: str = "1h"
) -> str:
    """dnsmasq's configuration for the LXC containers on `bridge`: DHCP from the host's flannel subnet,
    the bridge as their router (and DNS server when `dns`), the overlay MTU. Bound to the bridge alone, so
    it never answers on the underlay."""
    netmask = lease.subnet.network.netmask
    lines = [
        "# flannel-ebpf: DHCP for the containers on the bridge, from this host's flannel subnet",
        f"interface={bridge}",
        "bind-interfaces",
        "except-interface=lo",
        "no-resolv" if not dns else "",
        f"port={53 if dns else 0}",
        f"dhcp-leasefile={lease_file}",
        f"pid-file={pid_file}" if pid_file else "",
        "dhcp-authoritative",
        *(f"dhcp-range={a},{b},{netmask},{lease_time}" for a, b in dhcp_ranges(lease.subnet)),
        f"dhcp-option=option:router,{lease.gateway}",
        f"dhcp-option={DHCP_OPTION_MTU},{lease.mtu}",
    ]
    if dns:
        lines.append(f"dhcp-option=option:dns-server,{lease.gateway}")
    return "\n".join(line for line in lines if line) + "\n"


def lxc_default_conf(bridge: str, mtu: int) -> str:
    """/etc/lxc/default.conf: new containers get a veth on the bridge with the overlay MTU."""
    return (
        "# flannel-ebpf: containers join the flannel bridge; addresses by DHCP from the host's subnet\n"
        "lxc.net.0.type = veth\n"
        f"lxc.net.0.link = {bridge}\n"
        "lxc.net.0.flags = up\n"
        f"lxc.net.0.mtu = {mtu}\n"
    )


def lxc_net_defaults() -> str:
    """/etc/default/lxc-net: Debian's lxc-net must not make its own lxcbr0 (10.0.3.1) nor its dnsmasq."""
    return '# flannel-ebpf owns lxcbr0 and its DHCP (see the flannel-ebpf charm)\nUSE_LXC_BRIDGE="false"\n'


def network_relation_data(lease: Lease) -> dict[str, str]:
    """What the `network` relation hands the docker charm: enough for `dockerd --bip --mtu`. Both the seed's
    keys (flannel-subnet, flannel-mtu) and the sdn-plugin interface's (subnet, mtu, cidr)."""
    return {
        "subnet": str(lease.subnet),
        "mtu": str(lease.mtu),
        "cidr": str(lease.network),
        "flannel-subnet": str(lease.subnet),
        "flannel-mtu": str(lease.mtu),
    }


def docker_options(lease: Lease) -> list[str]:
    """dockerd's flags for this lease (what the docker charm does with the relation data)."""
    return [f"--bip={lease.subnet}", f"--mtu={lease.mtu}"]


# ---------------------------------------------------------------- applying (on the host or in a lab namespace)


def run_bridge_command(flannel_ebpf: Sequence[str], bridge: str, subnet_file: str, state_dir: str) -> str:
    """`flannel-ebpf bridge NAME`: the bridge holds the lease's gateway, has its MTU and is up; recorded
    in `state_dir` so that `flannel-ebpf health` checks it. Returns its one-line summary."""
    r = subprocess.run(
        [*flannel_ebpf, "bridge", bridge, "--subnet-file", subnet_file, "--state-dir", state_dir],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        raise LeaseError((r.stderr or r.stdout).strip() or f"flannel-ebpf bridge exited with {r.returncode}")
    return r.stdout.strip()


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Atomically replace `path` with `text`; False (and nothing written) when it already holds it."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


@dataclass(frozen=True)
class LxcBridgeResult:
    lease: Lease
    bridge_summary: str
    dnsmasq_conf: Path
    dnsmasq_changed: bool


def apply_lxc_bridge(
    flannel_ebpf: Sequence[str],
    *,
    subnet_file: str,
    state_dir: str,
    dnsmasq_conf_path: str,
    lease_file: str,
    bridge: str = LXC_BRIDGE,
    pid_file: str = "",
    dns: bool = True,
) -> LxcBridgeResult:
    """An LXC host's bridge from subnet.env: the bridge (address, MTU, up) and dnsmasq's configuration.
    Starting dnsmasq is the caller's (the charm: a systemd unit; the lab: a process in the namespace)."""
    lease = Lease.from_subnet_env(Path(subnet_file).read_text())
    summary = run_bridge_command(flannel_ebpf, bridge, subnet_file, state_dir)
    conf = Path(dnsmasq_conf_path)
    changed = write_if_changed(conf, dnsmasq_conf(bridge, lease, lease_file=lease_file, pid_file=pid_file, dns=dns))
    return LxcBridgeResult(lease, summary, conf, changed)


def apply_docker_bridge(
    flannel_ebpf: Sequence[str], relation_data: Mapping[str, str], *, state_dir: str, bridge: str = DOCKER_BRIDGE
) -> tuple[Lease, str]:
    """The docker side of the `network` relation: docker0 as `dockerd --bip=<subnet> --mtu=<mtu>` makes it,
    from the relation data alone (the docker host need not read flannel's files)."""
    lease = Lease.from_network_relation(relation_data)
    os.makedirs(state_dir, exist_ok=True)
    env_file = Path(state_dir) / f"{bridge}-from-relation.env"
    write_if_changed(env_file, lease.subnet_env())
    return lease, run_bridge_command(flannel_ebpf, bridge, str(env_file), state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    """`python bridge.py lxc|docker ...`: the same functions, run where the bridge lives (a lab namespace)."""
    p = argparse.ArgumentParser(prog="bridge.py", description=__doc__.splitlines()[0])
    p.add_argument("--flannel-ebpf", default="flannel-ebpf", help="the flannel-ebpf command (split on spaces)")
    p.add_argument("--state-dir", required=True)
    sub = p.add_subparsers(dest="mode", required=True)
    lxc = sub.add_parser("lxc", help="lxcbr0 and dnsmasq's configuration from subnet.env")
    lxc.add_argument("--subnet-file", required=True)
    lxc.add_argument("--bridge", default=LXC_BRIDGE)
    lxc.add_argument("--dnsmasq-conf", required=True)
    lxc.add_argument("--lease-file", required=True)
    lxc.add_argument("--pid-file", default="")
    lxc.add_argument("--no-dns", action="store_true")
    docker = sub.add_parser("docker", help="docker0 from the network relation's data (JSON)")
    docker.add_argument("--relation-data", required=True, help="JSON object, or @FILE")
    docker.add_argument("--bridge", default=DOCKER_BRIDGE)
    args = p.parse_args(argv)
    command = args.flannel_ebpf.split()
    try:
        if args.mode == "lxc":
            result = apply_lxc_bridge(
                command,
                subnet_file=args.subnet_file,
                state_dir=args.state_dir,
                dnsmasq_conf_path=args.dnsmasq_conf,
                lease_file=args.lease_file,
                bridge=args.bridge,
                pid_file=args.pid_file,
                dns=not args.no_dns,
            )
            print(json.dumps({"bridge": result.bridge_summary, "dnsmasq_conf": str(result.dnsmasq_conf)}))
        else:
            raw = args.relation_data
            text = Path(raw[1:]).read_text() if raw.startswith("@") else raw
            lease, summary = apply_docker_bridge(
                command, json.loads(text), state_dir=args.state_dir, bridge=args.bridge
            )
            print(json.dumps({"bridge": summary, "dockerd": docker_options(lease)}))
    except (LeaseError, OSError, json.JSONDecodeError) as e:
        print(f"bridge.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
