"""Backends: one module each, behind `base.Backend`. Imported lazily: bcc is slow to import and only the
eBPF udp path needs it."""

from __future__ import annotations

from typing import Any

from flannel_ebpf.backends.base import Backend, BackendError
from flannel_ebpf.host.types import BackendOptions


def backend_class(backend_type: str, options: BackendOptions) -> type[Backend]:
    if backend_type == "host-gw":
        from flannel_ebpf.backends.hostgw import HostGwBackend

        return HostGwBackend
    if backend_type == "vxlan":
        from flannel_ebpf.backends.vxlan import VxlanBackend

        return VxlanBackend
    if backend_type == "alloc":
        from flannel_ebpf.backends.alloc import AllocBackend

        return AllocBackend
    if backend_type == "aws-vpc":
        from flannel_ebpf.backends.awsvpc import AwsVpcBackend

        return AwsVpcBackend
    if backend_type == "gce":
        from flannel_ebpf.backends.gce import GceBackend

        return GceBackend
    if backend_type == "udp":
        if options.udp_datapath == "tun":
            from flannel_ebpf.backends.udp_tun import UdpTunBackend

            return UdpTunBackend
        if options.udp_datapath == "ebpf":
            from flannel_ebpf.backends.udp_ebpf import UdpEbpfBackend

            return UdpEbpfBackend
        raise BackendError(f"unknown --udp-datapath {options.udp_datapath!r} (ebpf or tun)")
    raise BackendError(f"unknown backend type {backend_type!r}")


def make_backend(backend_type: str, backend_config: dict[str, Any], options: BackendOptions) -> Backend:
    return backend_class(backend_type, options)(backend_config, options)
