"""The `alloc` backend: only lease a subnet; no data path.

flanneld v0.20.2's alloc backend publishes only the PublicIP: its lease carries no BackendType (so the
value is `{"PublicIP":"…","PublicIPv6":null}`, the same shape as a udp lease). LeaseAttrs.to_json writes
no BackendType for "udp", so publishing backend_type="udp" reproduces that value byte for byte.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from flannel_ebpf.backends.base import Backend
from flannel_ebpf.host.types import ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs


class AllocBackend(Backend):
    type_name = "alloc"

    def __init__(self, backend_config: dict[str, Any], options: Any) -> None:
        super().__init__(backend_config, options)
        self.peers: dict[str, str] = {}

    def overhead(self) -> int:
        return 0

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        # flanneld's alloc sets only PublicIP (no BackendType); see the module docstring
        return LeaseAttrs(public_ip=ext.public_ip, backend_type="udp", backend_data=None)

    def start(self, local: LocalNetwork) -> None:
        logger.info("alloc: holding lease {}; no data path is programmed", local.subnet)

    def sync(self, peers: list[Lease]) -> None:
        self.peers = {str(p.subnet): str(p.public_ip) for p in peers}

    def add_peer(self, lease: Lease) -> None:
        self.peers[str(lease.subnet)] = str(lease.public_ip)

    def remove_peer(self, lease: Lease) -> None:
        self.peers.pop(str(lease.subnet), None)

    def teardown(self, local: LocalNetwork | None) -> None:
        """Nothing in the kernel to remove."""

    def status(self) -> dict[str, Any]:
        # peers are listed for information only: alloc forwards nothing
        return {"type": self.type_name, "peers": dict(sorted(self.peers.items()))}
