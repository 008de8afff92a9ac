"""Loaders put the programs of bpf/ into the kernel: `elf` loads the objects `make bpf` precompiled
(bpf(2) only: no bcc, LLVM or kernel headers), `bcc` compiles the C sources at start-up (development).
Both pin the same maps under the same names, so an agent restarted with the other one adopts them;
attaching is shared (loaders.base)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from loguru import logger

from flannel_ebpf.datapath import layout
from flannel_ebpf.loaders.attach import HostPolicy
from flannel_ebpf.loaders.base import Loader, LoaderError

LOADERS = ("auto", "elf", "bcc")


def resolve_loader(kind: str, programs: Iterable[str] = layout.PROGRAM_NAMES) -> str:
    """`auto`: elf when precompiled objects built from the sources next to them are present, else bcc."""
    if kind != "auto":
        return kind
    from flannel_ebpf.loaders.elf import objects_problem

    problem = objects_problem(programs)
    if problem is None:
        return "elf"
    logger.info("loader: bcc, since the ELF loader cannot be used: {}", problem)
    return "bcc"


def make_loader(
    kind: str,
    pin_dir: str | Path,
    programs: Iterable[str] = layout.PROGRAM_NAMES,
    policy: HostPolicy | None = None,
) -> Loader:
    """`--loader auto|elf|bcc`; `policy`: how the loader treats hooks shared with other tools."""
    if kind not in LOADERS:
        raise LoaderError(f"unknown loader {kind!r} ({', '.join(LOADERS)})")
    kind = resolve_loader(kind, programs)
    if kind == "elf":
        from flannel_ebpf.loaders.elf import ElfLoader

        return ElfLoader(pin_dir, policy=policy)
    from flannel_ebpf.loaders.bcc import BccLoader

    return BccLoader(pin_dir, policy)


__all__ = ["LOADERS", "HostPolicy", "Loader", "LoaderError", "make_loader", "resolve_loader"]
