"""flannel-ebpf: a drop-in replacement for flanneld whose udp backend runs in eBPF."""

from __future__ import annotations


def package_version() -> str:
    """The installed distribution's version (`flannel-ebpf --version`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flannel-ebpf")
    except PackageNotFoundError:  # a checkout that was never pip-installed
        return "0+unknown"
