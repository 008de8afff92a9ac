"""What the charm derives from its config and relation data: pure, so the tests check it directly.

- `CharmConfig`: the charm's options, checked (network, backend, interface, etcd prefix, ...).
- `EtcdData`: what an etcd charm hands over on the `db` relation (Charmed Kubernetes' etcd:
  connection_string, client_ca/cert/key; the seed's etcd: hostname and port).
- `agent_environment`: the FLANNELD_* settings of the packaged systemd unit's drop-in.
- `locked_change`: the refused change of network or prefix after deployment.
- `status_for_health`: the unit's status from `flannel-ebpf health`'s line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

BACKENDS = ("udp", "vxlan", "host-gw")
DEFAULT_NETWORK = "10.10.0.0/16"
DEFAULT_PREFIX = "/coreos.com/network"
# The agent's phases while it waits for something outside it (etcd, the config, a lease): "waiting".
WAITING_PHASES = ("starting", "waiting-config", "acquiring")


class ConfigError(ValueError):
    """An option the charm cannot run with (the message is the blocked status)."""


@dataclass(frozen=True)
class CharmConfig:
    network: IPv4Network
    subnet_len: int
    backend: str
    iface: str
    etcd_prefix: str
    ip_masq: bool
    lxc_bridge: str

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> CharmConfig:
        try:
            network = IPv4Network(str(raw.get("network", DEFAULT_NETWORK)))
        except ValueError as e:
            raise ConfigError(f"network: {e}") from None
        subnet_len = int(raw.get("subnet-len", 24))
        if not network.prefixlen < subnet_len <= 30:
            raise ConfigError(
                f"subnet-len {subnet_len} must be longer than {network}'s /{network.prefixlen}, at most 30"
            )
        backend = str(raw.get("backend", "udp"))
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r}: one of {', '.join(BACKENDS)}")
        prefix = str(raw.get("etcd-prefix", DEFAULT_PREFIX)).rstrip("/")
        if not prefix.startswith("/") or any(c.isspace() for c in prefix):
            raise ConfigError(f"etcd-prefix {prefix!r} must be an absolute key path without spaces")
        iface = str(raw.get("iface", "")).strip()
        if any(c.isspace() for c in iface):
            raise ConfigError(f"iface {iface!r}: one interface name or IPv4 address")
        bridge = str(raw.get("lxc-bridge", "lxcbr0")).strip()
        if bridge and (len(bridge) > 15 or "/" in bridge or any(c.isspace() for c in bridge)):
            raise ConfigError(f"lxc-bridge {bridge!r} is not an interface name")
        return cls(network, subnet_len, backend, iface, prefix, bool(raw.get("ip-masq", False)), bridge)

    def network_config(self) -> dict[str, Any]:
        """The JSON the leader puts at <prefix>/config when etcd has none."""
        return {"Network": str(self.network), "SubnetLen": self.subnet_len, "Backend": {"Type": self.backend}}


@dataclass(frozen=True)
class EtcdData:
    endpoints: tuple[str, ...]
    ca: str = ""
    cert: str = ""
    key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca or self.cert or self.key)

    @classmethod
    def from_relation(cls, data: Mapping[str, str]) -> EtcdData | None:
        """None until the etcd side said where it listens."""
        raw = data.get("connection_string", "").strip()
        if raw:
            endpoints = tuple(e.strip() for e in raw.split(",") if e.strip())
        elif data.get("hostname") and data.get("port"):  # the seed's etcd charm
            endpoints = (f"http://{data['hostname']}:{data['port']}",)
        else:
            return None
        for e in endpoints:
            if not (e.startswith("http://") or e.startswith("https://")) or any(c.isspace() for c in e):
                raise ConfigError(f"etcd sent an endpoint that is not a URL: {e!r}")
        return cls(endpoints, data.get("client_ca", ""), data.get("client_cert", ""), data.get("client_key", ""))


@dataclass(frozen=True)
class TlsFiles:
    ca: str
    cert: str
    key: str


def agent_environment(config: CharmConfig, etcd: EtcdData, tls: TlsFiles | None) -> dict[str, str]:
    """FLANNELD_* for the unit's drop-in (the packaged unit reads them; a flag on its command line would win)."""
    env = {
        "FLANNELD_ETCD_ENDPOINTS": ",".join(etcd.endpoints),
        "FLANNELD_ETCD_PREFIX": config.etcd_prefix,
        "FLANNELD_IP_MASQ": "true" if config.ip_masq else "false",
    }
    if config.iface:
        env["FLANNELD_IFACE"] = config.iface
    if tls is not None:
        env.update(FLANNELD_ETCD_CAFILE=tls.ca, FLANNELD_ETCD_CERTFILE=tls.cert, FLANNELD_ETCD_KEYFILE=tls.key)
    return env


def render_dropin(env: Mapping[str, str]) -> str:
    lines = ["# Written by the flannel-ebpf charm: change the charm's config, not this file.", "[Service]"]
    for k in sorted(env):
        value = env[k]
        if any(c in value for c in '"\\\n%$'):
            raise ConfigError(f"{k}: {value!r} cannot go into a systemd unit")
        lines.append(f'Environment="{k}={value}"')
    return "\n".join(lines) + "\n"


def locked_change(deployed: Mapping[str, str], config: CharmConfig) -> str | None:
    """Why this config is refused (None: accepted): network and etcd prefix are fixed once deployed, since
    every host's lease and every container address depends on them."""
    wanted = {"network": str(config.network), "etcd-prefix": config.etcd_prefix}
    for name, value in wanted.items():
        before = deployed.get(name)
        if before is not None and before != value:
            return (
                f"{name} cannot change after deployment ({before} -> {value}): leases and container "
                f"addresses depend on it; set it back to {before} (or redeploy)"
            )
    return None


def config_conflict(existing: Any, config: CharmConfig) -> str | None:
    """Why etcd's config is not this charm's (None: it is, or it differs only in what the charm does not set)."""
    if not isinstance(existing, dict):
        return f"etcd's {config.etcd_prefix}/config is not a JSON object"
    if existing.get("Network") != str(config.network):
        return (
            f"etcd's {config.etcd_prefix}/config has Network {existing.get('Network')}, the charm's network "
            f"is {config.network}: set network to {existing.get('Network')} or use another etcd-prefix"
        )
    return None


@dataclass(frozen=True)
class UnitStatus:
    kind: str  # active | waiting | blocked | maintenance
    message: str


def status_for_health(line: str, exit_code: int) -> UnitStatus:
    """`flannel-ebpf health`'s line as the unit's status: active with the ready line, waiting while the
    agent starts or waits for etcd, its config or a lease, blocked with the reason otherwise."""
    line = line.strip().splitlines()[0] if line.strip() else ""
    if exit_code == 0 and line.startswith("ready"):
        return UnitStatus("active", line)
    if not line.startswith("not-ready"):
        return UnitStatus("blocked", f"flannel-ebpf health failed (exit {exit_code}): {line or 'no output'}")
    reason = line.removeprefix("not-ready").strip()
    if reason.startswith("no agent state") or any(reason.startswith(p + ":") for p in WAITING_PHASES):
        return UnitStatus("waiting", line)
    return UnitStatus("blocked", line)


def json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
