"""Build hook (the metadata is in pyproject.toml): the wheel and the sdist carry the eBPF sources and the
objects `make bpf` compiles with clang, so that an installed agent loads them with the ELF loader and needs
no compiler, bcc or kernel headers. The objects are built here, at build time, and never committed.

In the wheel they sit in the package, flannel_ebpf/bpf/ (datapath.layout.BPF_SOURCE_DIR finds them there).
An editable install (`pip install -e .`) uses the checkout's bpf/ directly and builds nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = Path(__file__).resolve().parent
BPF = ROOT / "bpf"


def make_bpf() -> None:
    """`make bpf`: compiles what is missing or stale (nothing when an sdist brought current objects)."""
    try:
        subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "bpf"], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"building the eBPF objects failed ({e}): needs make and clang (Debian: apt-get install make clang)")


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        make_bpf()
        target = Path(self.build_lib) / "flannel_ebpf" / "bpf"
        shutil.rmtree(target, ignore_errors=True)
        (target / "lib").mkdir(parents=True)
        files = [*BPF.glob("*.c"), *BPF.glob("*.o"), BPF / "sources.sha256", *(BPF / "lib").glob("*.h")]
        for path in files:
            shutil.copy2(path, target / path.relative_to(BPF))


class SdistWithBpf(sdist):
    def run(self) -> None:
        make_bpf()  # MANIFEST.in takes the objects along
        super().run()


setup(cmdclass={"build_py": BuildPyWithBpf, "sdist": SdistWithBpf})
