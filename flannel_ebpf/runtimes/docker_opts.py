"""`flannel-ebpf docker-opts`: dockerd's options from subnet.env, as flannel's mk-docker-opts.sh makes them.

Behaviour kept from that script (v0.20.2), so that units and scripts written for it keep working:
- Options `-f` (subnet file), `-d` (output, default /run/docker_opts.env), `-i` (one variable per
  option), `-c` (all options in one variable), `-k` (that variable's name, default DOCKER_OPTS), `-m` (no
  `--ip-masq`). Neither `-i` nor `-c`: both.
- Variables: DOCKER_OPT_BIP="--bip=$FLANNEL_SUBNET", DOCKER_OPT_MTU="--mtu=$FLANNEL_MTU",
  DOCKER_OPT_IPMASQ="--ip-masq=<the opposite of FLANNEL_IPMASQ>" (when flannel masquerades, Docker must
  not). Each one only when its subnet.env variable is set; FLANNEL_IPMASQ other than true/false is an
  error. DOCKER_OPT_* variables already in the environment (or set by the subnet file, which the script
  sources) come along, and every one is written in the order of its name, as `set` lists them.
- The combined variable starts with the value that variable already has in the environment, then each
  option after a space: `DOCKER_OPTS=" --bip=10.5.34.1/24 --ip-masq=true --mtu=1472"` (the leading
  space is the script's; dockerd does not mind).
- After writing, a route to this host's own subnet via a gateway (another host's lease, a stale
  host-gw route) is reported and the exit code is 1.

Deliberately different: a missing or unreadable subnet file is an error (the script wrote an empty
file, and dockerd then started without the overlay), and the file is replaced atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

DEFAULT_OUTPUT = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"
OPT_PREFIX = "DOCKER_OPT_"


class DockerOptsError(ValueError):
    """The subnet file says something the options cannot be made from."""


@dataclass(frozen=True)
class DockerOptsOptions:
    individual: bool = False  # -i
    combined: bool = False  # -c
    key: str = DEFAULT_KEY  # -k
    ip_masq: bool = True  # False with -m

    def effective(self) -> tuple[bool, bool]:
        """(individual, combined): asking for neither means both."""
        if not self.individual and not self.combined:
            return True, True
        return self.individual, self.combined


def options_from_env(subnet_env: Mapping[str, str], ip_masq: bool = True) -> dict[str, str]:
    """The DOCKER_OPT_* variables this subnet file yields."""
    opts: dict[str, str] = {}
    if subnet_env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={subnet_env['FLANNEL_SUBNET']}"
    if subnet_env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={subnet_env['FLANNEL_MTU']}"
    masq = subnet_env.get("FLANNEL_IPMASQ", "")
    if masq and ip_masq:
        if masq not in ("true", "false"):
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq}")
        opts["DOCKER_OPT_IPMASQ"] = f"--ip-masq={'false' if masq == 'true' else 'true'}"
    return opts


def render(subnet_env: Mapping[str, str], options: DockerOptsOptions, environ: Mapping[str, str]) -> str:
    """The docker options file. `environ`: the caller's environment (DOCKER_OPT_* and the combined key)."""
    variables = {**environ, **subnet_env}  # the script sources the subnet file into its environment
    opts = {k: v for k, v in variables.items() if k.startswith(OPT_PREFIX)}
    opts.update(options_from_env(variables, options.ip_masq))
    individual, combined_wanted = options.effective()
    combined = variables.get(options.key, "")
    if combined:
        combined += " "
    lines = []
    for name in sorted(opts):
        if individual:
            lines.append(f'{name}="{opts[name]}"')
        combined += f" {opts[name]}"
    if combined_wanted:
        lines.append(f'{options.key}="{combined}"')
    return "".join(line + "\n" for line in lines)


def parse_subnet_env(text: str) -> dict[str, str]:
    """KEY=VALUE lines as a shell would assign them (surrounding quotes removed; comments skipped)."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key or key.startswith("#") or not key.replace("_", "").isalnum():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key] = value
    return values


def own_subnet(subnet_env: Mapping[str, str]) -> IPv4Network | None:
    """FLANNEL_SUBNET's network (10.5.34.1/24 -> 10.5.34.0/24), if it is an IPv4 interface address."""
    try:
        return IPv4Interface(subnet_env.get("FLANNEL_SUBNET", "")).network
    except ValueError:
        return None


@dataclass(frozen=True)
class Route:
    dst: IPv4Network
    gateway: IPv4Address | None
    dev: str = ""


def conflicting_routes(subnet: IPv4Network, routes: Iterable[Route]) -> list[Route]:
    """Routes to this host's own subnet through a gateway: its containers would be sent elsewhere."""
    return [r for r in routes if r.dst == subnet and r.gateway is not None]


def main_table_routes() -> list[Route]:
    """The IPv4 routes of this network namespace's main table (read only)."""
    from pyroute2 import IPRoute

    routes = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for r in ipr.get_routes(family=2, table=254):
            dst = r.get_attr("RTA_DST") or "0.0.0.0"
            gw = r.get_attr("RTA_GATEWAY")
            routes.append(
                Route(
                    IPv4Network(f"{dst}/{r['dst_len']}", strict=False),
                    IPv4Address(gw) if gw else None,
                    names.get(r.get_attr("RTA_OIF"), ""),
                )
            )
    return routes
