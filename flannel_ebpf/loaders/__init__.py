"""Loaders put the programs of bpf/ into the kernel: `bcc` compiles the C sources at start-up, `elf`
(to come) loads objects precompiled by `make bpf`. Both pin the same maps; attaching is shared."""

from __future__ import annotations

from pathlib import Path

from flannel_ebpf.loaders.base import Loader, LoaderError


def make_loader(kind: str, pin_dir: str | Path) -> Loader:
    """`--loader bcc|elf`."""
    if kind == "bcc":
        from flannel_ebpf.loaders.bcc import BccLoader

        return BccLoader(pin_dir)
    if kind == "elf":
        try:
            from flannel_ebpf.loaders.elf import ElfLoader  # type: ignore[import-not-found]
        except ImportError as e:
            raise LoaderError("the ELF loader is not available in this build; use --loader bcc") from e
        return ElfLoader(pin_dir)  # type: ignore[no-any-return]
    raise LoaderError(f"unknown loader {kind!r} (bcc or elf)")


__all__ = ["Loader", "LoaderError", "make_loader"]
