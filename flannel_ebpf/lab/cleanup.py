"""Remove what crashed labs left behind: namespaces `fl????-*` (and the processes inside them), bpffs pins
`/sys/fs/bpf/flannel-ebpf-fl????-*`, lab directories `<tmp>/flannel-ebpf-lab-fl????-*`.

Only names matching the lab pattern are touched. A lab whose owner process is still alive (e.g. another
test run) is spared unless its prefix is named or force is set; `demo --keep` gives up ownership, so a
plain `cleanup` removes its lab.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from .lab import LAB_DIR_PREFIX, OWNER_FILE, PIN_DIR_PREFIX, delete_lab_namespaces, remove_lab_pins
from .netns import BPFFS, LAB_NAME_RE, check_prefix, list_netns

_DIR_RE = re.compile(rf"^{re.escape(LAB_DIR_PREFIX)}(fl[0-9a-f]{{4}})-")
_PIN_RE = re.compile(rf"^{re.escape(PIN_DIR_PREFIX)}(fl[0-9a-f]{{4}})-")


@dataclass
class Leftovers:
    prefix: str
    namespaces: list[str] = field(default_factory=list)
    pins: list[Path] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def owner_alive(self) -> int | None:
        """The PID of a live process that owns this lab, if any."""
        for d in self.dirs:
            try:
                pid = int((d / OWNER_FILE).read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            if Path(f"/proc/{pid}").exists():
                return pid
        return None


def find_leftovers(tmp_dir: str | None = None) -> dict[str, Leftovers]:
    found: dict[str, Leftovers] = {}

    def get(prefix: str) -> Leftovers:
        return found.setdefault(prefix, Leftovers(prefix))

    for n in list_netns():
        if m := LAB_NAME_RE.match(n):
            get(m.group(1)).namespaces.append(n)
    if BPFFS.is_dir():
        for p in BPFFS.iterdir():
            if m := _PIN_RE.match(p.name):
                get(m.group(1)).pins.append(p)
    for d in Path(tmp_dir or tempfile.gettempdir()).iterdir():
        if d.is_dir() and (m := _DIR_RE.match(d.name)):
            get(m.group(1)).dirs.append(d)
    return found


def cleanup(prefix: str | None = None, force: bool = False, tmp_dir: str | None = None) -> list[str]:
    """Clean up one lab (`prefix`) or every abandoned one; returns the prefixes cleaned."""
    if prefix is not None:
        check_prefix(prefix)
    cleaned = []
    for p, left in sorted(find_leftovers(tmp_dir).items()):
        if prefix is not None and p != prefix:
            continue
        owner = left.owner_alive()
        if owner is not None and prefix is None and not force:
            logger.info("lab {} is owned by live pid {}: spared (name it with --prefix, or --force)", p, owner)
            continue
        logger.info(
            "cleaning lab {}: {} namespaces, {} pin dirs, {} dirs", p, len(left.namespaces), len(left.pins),
            len(left.dirs),
        )  # fmt: skip
        delete_lab_namespaces(p)
        remove_lab_pins(p)
        for d in left.dirs:
            shutil.rmtree(d, ignore_errors=True)
        cleaned.append(p)
    return cleaned
