"""The loader interface: "load these programs, attach program X here, give me map Y, detach".

A loader owns the program fds it loaded (closing them is harmless once attached: the kernel keeps an
attached program alive). Maps are always pinned under `pin_dir`, named as in datapath.layout, so that
a restarted agent, `status` and `down` find them whichever loader made them.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from loguru import logger

from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.datapath.maps import pinned_map_mismatch
from flannel_ebpf.loaders import attach


def filesystem_of(path: Path) -> str | None:
    """The type of the filesystem `path` is (or would be) on, from /proc/self/mounts."""
    target = str(path.resolve()) if path.exists() else str(path.absolute())
    best, fstype = "", None
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].replace("\\040", " ")
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, fstype = point, fields[2]
    return fstype


class LoaderError(RuntimeError):
    """Programs could not be compiled, loaded or attached; the message is for the operator."""


@dataclass(frozen=True)
class Attachment:
    """One program at one hook."""

    program: str
    ifindex: int
    hook: str  # "tc-egress" | "tc-ingress" | "xdp"
    prog_id: int
    xdp_mode: str | None = None  # "native" | "generic" for XDP


def foreign_xdp_refusal(ifindex: int, foreign: str) -> str:
    """The one line that says why we do not attach over another tool's XDP program."""
    return (
        f"{attach.ifname(ifindex)} already has another tool's XDP program {foreign}: not replacing it; "
        f"remove it, decapsulate with --udp-decap tc, or pass --xdp-replace-foreign"
    )


class Loader(ABC):
    name: ClassVar[str] = ""

    def __init__(self, pin_dir: str | Path, policy: attach.HostPolicy | None = None) -> None:
        self.pin_dir = Path(pin_dir)
        self.policy = policy if policy is not None else attach.HostPolicy()
        self._fds: dict[str, int] = {}  # program name -> fd, filled by load()

    @abstractmethod
    def load(self, programs: Sequence[str]) -> None:
        """Load these programs (names from datapath.layout.PROGRAM_NAMES); their maps are pinned under
        pin_dir, adopting pins that are already there (live maps keep their entries)."""

    def program_fd(self, program: str) -> int:
        """The fd of a loaded program."""
        try:
            return self._fds[program]
        except KeyError:
            raise LoaderError(f"program {program} was not loaded") from None

    def close(self) -> None:  # noqa: B027 - loaders without resources need nothing
        """Release fds; attached programs and pinned maps stay."""

    # --- maps ----------------------------------------------------------------------------------
    def prepare_pins(self) -> None:
        """Create the pin dir; unpin maps whose layout these programs cannot use (an upgrade)."""
        fstype = filesystem_of(self.pin_dir)
        if fstype != "bpf":
            raise LoaderError(
                f"--bpf-pin-dir {self.pin_dir} is on {fstype or 'no filesystem'}, not bpffs: mount it "
                f"(`mount -t bpf bpf /sys/fs/bpf`). Note that `ip netns exec` remounts /sys, hiding the "
                f"host's bpffs: pins made there vanish with the command"
            )
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        for spec in layout.ALL_MAPS:
            why = pinned_map_mismatch(self.pin_dir, spec)
            if why:
                logger.warning("replacing an incompatible pinned map: {}", why)
                with contextlib.suppress(FileNotFoundError):
                    layout.pin_path(self.pin_dir, spec).unlink()

    def map_fd(self, spec: layout.MapSpec) -> int:
        """A new fd on a pinned map (the caller closes it)."""
        return bpfsys.obj_get(layout.pin_path(self.pin_dir, spec))

    # --- attach ----------------------------------------------------------------------------------
    def prog_id(self, program: str) -> int:
        return bpfsys.prog_info(self.program_fd(program)).prog_id

    def attach_tc(self, program: str, ifindex: int, direction: str) -> Attachment:
        """Direct-action filter at clsact ingress/egress; replaces ours in place if present."""
        try:
            attach.tc_attach(ifindex, direction, self.program_fd(program), program, self.policy.clsact_record)
        except attach.AttachError as e:
            raise LoaderError(str(e)) from e
        return Attachment(program, ifindex, f"tc-{direction}", self.prog_id(program))

    def attach_xdp(
        self, program: str, ifindex: int, mode: str = "auto", replace_foreign: bool | None = None
    ) -> Attachment:
        """XDP in mode native | generic | auto (native, else generic); reports the mode in use.

        Our own program (same kernel name) is swapped atomically. Another tool's program is never
        replaced unless `replace_foreign` (default: this loader's policy, from --xdp-replace-foreign): the
        attach is refused with one line naming it (name, id, mode)."""
        if replace_foreign is None:
            replace_foreign = self.policy.replace_foreign_xdp
        try:
            current = attach.xdp_query(ifindex)
            foreign = self.foreign_xdp(ifindex, program)
            if foreign is not None:
                if not replace_foreign:
                    raise LoaderError(foreign_xdp_refusal(ifindex, foreign))
                logger.warning(
                    "replacing another tool's XDP program {} on {} (as asked)", foreign, attach.ifname(ifindex)
                )
            expected = current[0] if current is not None else 0
            used = attach.xdp_attach(ifindex, self.program_fd(program), mode, expected_id=expected)
        except attach.AttachError as e:
            raise LoaderError(str(e)) from e
        return Attachment(program, ifindex, "xdp", self.prog_id(program), used)

    @staticmethod
    def foreign_xdp(ifindex: int, program: str) -> str | None:
        """Another tool's XDP program on the device, as `name (id N, mode)` (None: none there, or ours)."""
        current = attach.xdp_query(ifindex)
        if current is None:
            return None
        info = bpfsys.prog_info_by_id(current[0])
        name = info.name if info is not None else ""
        if layout.is_our_program(name, program):
            return None
        return f"{name or '(unnamed)'} (id {current[0]}, {current[1]})"

    @staticmethod
    def detach_tc(ifindex: int, direction: str, program: str) -> bool:
        return attach.tc_detach(ifindex, direction, program) > 0

    @staticmethod
    def detach_xdp(ifindex: int, program: str | None = None) -> bool:
        """Remove the device's XDP program, only if it is `program` (by kernel name) when given."""
        current = attach.xdp_query(ifindex)
        if current is None:
            return False
        if program is not None:
            info = bpfsys.prog_info_by_id(current[0])
            if info is None or not layout.is_our_program(info.name, program):
                return False
        return attach.xdp_detach(ifindex)
