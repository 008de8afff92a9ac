"""The bcc loader: compiles bpf/*.c with bcc (LLVM in-process) at start-up. For development (`--loader
bcc`); hosts run the ELF loader (loaders/elf.py) on precompiled objects, which needs no LLVM nor headers.

The sources are compiled as one text (their shared maps are defined once, in bpf/lib/flannel.h, and
our headers are pasted in: see _inline_local_includes), with -DFLANNEL_BCC and the pin directory;
bcc's BPF_TABLE_PINNED adopts pins that exist and pins new maps otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.loaders.attach import HostPolicy
from flannel_ebpf.loaders.base import Loader, LoaderError


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what C code (bcc, LLVM, the verifier log) writes to fd 2 while inside the block."""
    out: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def _inline_local_includes(path: Path, seen: set[Path]) -> str:
    """The source with our own `#include "..."` files pasted in (each once), `#line` marks kept.

    bcc rewrites map calls (`fl_peers.lookup(&key)`) only in its main file, and takes as programs only
    the functions defined there, so everything of ours must be one text; system headers stay includes.
    """
    path = path.resolve()
    if path in seen:
        return ""
    seen.add(path)
    out = [f'#line 1 "{path}"\n']
    for number, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
        match = _LOCAL_INCLUDE.match(line)
        if match:
            out.append(_inline_local_includes(path.parent / match.group(1), seen))
            out.append(f'#line {number + 1} "{path}"\n')
        else:
            out.append(line)
    return "".join(out)


def kernel_headers_problem() -> str | None:
    """Why bcc cannot compile here (None when the kernel headers are where it looks)."""
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if (build / "include").is_dir() or (build / "Makefile").exists():
        return None
    return (
        f"bcc needs the running kernel's headers at {build}, and there are none. Install them "
        f"(Debian/Ubuntu: linux-headers-{release}, or linux-headers-amd64 when this kernel has no package "
        f"of its own) and, if the versions differ, link them: "
        f"`ln -sfn /usr/src/linux-headers-<ver>-amd64 {build}` and "
        f"`ln -sfn /usr/src/linux-headers-<ver>-common /lib/modules/{release}/source`. "
        f"Or use the ELF loader, which needs neither bcc nor headers: `--loader elf` (the default when "
        f"precompiled objects are installed with the package, or after `make bpf` in a checkout)."
    )


class BccLoader(Loader):
    name = "bcc"

    def __init__(self, pin_dir: str | Path, policy: HostPolicy | None = None) -> None:
        super().__init__(pin_dir, policy)
        self._bpf: Any = None
        self._own_fds: list[int] = []  # loaded by us, not by bcc: closed by us

    def load(self, programs: Sequence[str]) -> None:
        problem = kernel_headers_problem()
        if problem:
            raise LoaderError(problem)
        try:
            from bcc import BPF  # Debian's python3-bpfcc (never PyPI's unrelated "bcc")
        except ImportError as e:
            raise LoaderError(
                "bcc's Python module is missing: install Debian's python3-bpfcc and run with the system "
                "python3 (or a venv made with --system-site-packages)"
            ) from e
        self.prepare_pins()
        seen: set[Path] = set()
        text = "".join(
            _inline_local_includes(layout.BPF_SOURCE_DIR / layout.PROGRAM_SOURCES[p], seen) for p in programs
        )
        cflags = [
            "-DFLANNEL_BCC=1",
            f'-DFLANNEL_PIN_DIR="{self.pin_dir}"',
            f"-I{layout.BPF_SOURCE_DIR}",
            "-Wno-unused-function",
        ]
        with _captured_stderr() as log:
            try:
                self._bpf = BPF(text=text, cflags=cflags)
                compiled = True
            except Exception:
                compiled = False
        if not compiled:
            raise LoaderError(f"bcc could not compile {', '.join(programs)}:\n{''.join(log).strip()}")
        for program in programs:
            if program == layout.PROG_DECAP_XDP:
                self._fds[program] = self._load_xdp_frags(program)
                continue
            with _captured_stderr() as log:
                try:
                    fn = self._bpf.load_func(program, BPF.SCHED_CLS)
                    error = None
                except Exception as e:
                    error = e
            if error is not None:
                # bcc retries a failed load with the verifier log on and prints it: show it all.
                raise LoaderError(f"the kernel refused {program}: {error}\n{''.join(log).strip()}")
            self._fds[program] = fn.fd
        logger.debug("bcc loaded {} with maps pinned under {}", ", ".join(programs), self.pin_dir)

    def _load_xdp_frags(self, program: str) -> int:
        """The XDP program with BPF_F_XDP_HAS_FRAGS (what the section name xdp.frags asks of an ELF
        loader): bcc's load_func cannot pass program flags, so its compiled code (map fds already in
        place) is loaded with bpf(2) directly."""
        from bcc import lib  # the same libbcc the BPF object uses

        name = program.encode()
        start, size = lib.bpf_function_start(self._bpf.module, name), lib.bpf_function_size(self._bpf.module, name)
        if not start:
            raise LoaderError(f"bcc compiled no function {program}")
        try:
            fd = bpfsys.prog_load(
                bpfsys.BPF_PROG_TYPE_XDP, ctypes.string_at(start, size), program, prog_flags=bpfsys.BPF_F_XDP_HAS_FRAGS
            )
        except bpfsys.BpfError as e:
            raise LoaderError(f"the kernel refused {program}: {e}") from e
        self._own_fds.append(fd)
        return fd

    def close(self) -> None:
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
        self._bpf = None
        for fd in self._own_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._own_fds.clear()
        self._fds.clear()
