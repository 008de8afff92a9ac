"""The ELF loader: loads the objects `make bpf` precompiled with clang, with bpf(2) alone.

No bcc, no LLVM, no kernel headers: pyelftools reads the objects, datapath.bpfsys makes the calls.
What it understands is what plain clang makes of bpf/*.c (see bpf/lib/compat.h):
- program sections (SHF_EXECINSTR): "tc" (SCHED_CLS), "xdp" and "xdp.frags" (XDP, the latter with
  BPF_F_XDP_HAS_FRAGS); each global STT_FUNC symbol in one is a program, named by its symbol;
- static functions clang did not inline (in .text): appended to each program that calls them,
  transitively, with the BPF-to-BPF call offsets rewritten;
- the `license` section;
- the legacy `maps` section: one iproute2 `struct bpf_elf_map` (nine u32) per map symbol;
- R_BPF_64_64 relocations on ld_imm64 against a map: src_reg = BPF_PSEUDO_MAP_FD, imm = the map's fd.
Global data (.data, .rodata, .bss) and BTF-defined maps are refused with one line.

Maps are those of datapath.layout: an object whose definitions differ (built from other sources) is
refused before anything changes; pinned maps that match are adopted (their entries are live), others
are replaced as the bcc loader does (Loader.prepare_pins), new ones are created and pinned under the
same names, so that an agent restarted with the other loader adopts them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection
from loguru import logger

from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.datapath.maps import pinned_map_mismatch
from flannel_ebpf.loaders.attach import HostPolicy
from flannel_ebpf.loaders.base import Loader, LoaderError

EM_BPF = 247
R_BPF_64_64 = 1  # ld_imm64 of a symbol's address (maps)
R_BPF_64_32 = 10  # a call's 32-bit immediate (BPF-to-BPF calls)
INSN = 8
OP_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW
OP_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_CALL = 1
MAP_DEF = struct.Struct("=IIIII")  # the first five u32 of struct bpf_elf_map: type, key, value, max, flags
MAP_DEF_SIZE = 36  # struct bpf_elf_map: nine u32
#: written by `make bpf` next to the objects: the sha256 of the sources they were built from
SOURCES_STAMP = "sources.sha256"


def object_path(program: str, directory: Path | None = None) -> Path:
    """The object `make bpf` builds for a program (one object per C source)."""
    source = layout.PROGRAM_SOURCES[program]
    return (directory or layout.BPF_SOURCE_DIR) / (source.removesuffix(".c") + ".o")


def objects_problem(programs: Iterable[str] = layout.PROGRAM_NAMES, directory: Path | None = None) -> str | None:
    """Why the precompiled objects cannot be used for these programs (None: present and built from
    exactly the sources next to them, as `make bpf` records in sources.sha256)."""
    directory = directory or layout.BPF_SOURCE_DIR
    missing = [object_path(p, directory).name for p in programs if not object_path(p, directory).is_file()]
    if missing:
        return f"no precompiled objects in {directory} ({', '.join(missing)}): run `make bpf`"
    stamp = directory / SOURCES_STAMP
    try:
        lines = stamp.read_text().splitlines()
    except OSError:
        return f"{stamp} is missing: the objects' sources are unknown; run `make bpf`"
    recorded: dict[str, str] = {}
    for line in lines:
        digest, _, name = line.partition("  ")
        if digest and name:
            recorded[name.strip()] = digest.strip()
    for program in programs:
        if layout.PROGRAM_SOURCES[program] not in recorded:
            return f"{stamp} does not cover {layout.PROGRAM_SOURCES[program]}: run `make bpf`"
    for name, digest in recorded.items():
        try:
            now = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        except OSError:
            return f"{directory / name} (a source of the objects) is missing"
        if now != digest:
            return f"{directory / name} changed since the objects were built: run `make bpf`"
    return None


# --------------------------------------------------------------------------------------------------
# reading an object


@dataclass
class Function:
    """One function of an executable section: a program (global) or a subprogram (static)."""

    name: str
    section: int  # section index
    offset: int  # byte offset in the section
    insns: bytearray
    is_program: bool
    #: byte offset in the function -> (symbol name, symbol section index, symbol value, relocation type)
    relocs: dict[int, tuple[str, int, int, int]] = field(default_factory=dict)


@dataclass
class ElfObject:
    """What the loader needs from one object file."""

    path: Path
    license: str
    maps: dict[str, layout.MapSpec]  # map symbol name -> its definition
    map_offsets: dict[int, str]  # offset in the maps section -> map symbol name
    maps_section: int | None
    functions: list[Function]
    section_types: dict[int, str]  # executable section index -> its name

    def function_at(self, section: int, offset: int) -> Function | None:
        return next((f for f in self.functions if f.section == section and f.offset == offset), None)

    def program(self, name: str) -> Function:
        for function in self.functions:
            if function.is_program and function.name == name:
                return function
        raise LoaderError(f"{self.path}: no program {name} in it (programs: {', '.join(self.program_names())})")

    def program_names(self) -> list[str]:
        return [f.name for f in self.functions if f.is_program]


def read_object(path: Path) -> ElfObject:
    """Parse one object; any defect is one LoaderError line naming the file."""
    try:
        with path.open("rb") as f:
            return _read(path, ELFFile(f))
    except LoaderError:
        raise
    except FileNotFoundError:
        raise LoaderError(f"{path}: no such object: run `make bpf`") from None
    except (ELFError, OSError) as e:
        raise LoaderError(f"{path}: not a readable eBPF object (corrupt or truncated?): {e}") from None
    except Exception as e:  # pyelftools meets a damaged file with all kinds of errors
        raise LoaderError(
            f"{path}: not a readable eBPF object (corrupt or truncated?): {type(e).__name__}: {e}"
        ) from None


def _read(path: Path, elf: ELFFile) -> ElfObject:
    if elf["e_machine"] not in ("EM_BPF", EM_BPF) or elf.elfclass != 64 or not elf.little_endian:
        raise LoaderError(f"{path}: not a little-endian 64-bit eBPF object (machine {elf['e_machine']})")
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        raise LoaderError(f"{path}: no symbol table")
    symbols = list(symtab.iter_symbols())
    sections = list(elf.iter_sections())
    exec_sections = {
        i: s.name
        for i, s in enumerate(sections)
        if s["sh_type"] == "SHT_PROGBITS" and s["sh_flags"] & SH_FLAGS.SHF_EXECINSTR
    }
    license_section = elf.get_section_by_name("license")
    if license_section is None:
        raise LoaderError(f"{path}: no license section")
    license_text = license_section.data().split(b"\0", 1)[0].decode(errors="replace")
    maps_section = elf.get_section_by_name("maps")
    maps_index = next((i for i, s in enumerate(sections) if s.name == "maps"), None)
    maps: dict[str, layout.MapSpec] = {}
    map_offsets: dict[int, str] = {}
    if maps_section is not None:
        data = maps_section.data()
        if len(data) != maps_section["sh_size"]:
            raise LoaderError(f"{path}: the maps section is truncated")
        for sym in symbols:
            if sym["st_shndx"] != maps_index or sym["st_info"]["type"] != "STT_OBJECT":
                continue
            offset = sym["st_value"]
            if offset + MAP_DEF.size > len(data):
                raise LoaderError(f"{path}: map {sym.name} lies outside the maps section")
            mtype, key, value, max_entries, flags = MAP_DEF.unpack_from(data, offset)
            maps[sym.name] = layout.MapSpec(sym.name, mtype, key, value, max_entries, flags)
            map_offsets[offset] = sym.name
    for other in (".maps", ".data", ".rodata", ".bss"):
        section = elf.get_section_by_name(other)
        if section is not None and section["sh_size"]:
            raise LoaderError(f"{path}: has a {other} section, which this loader does not handle (no global data)")

    functions: list[Function] = []
    for index, name in exec_sections.items():
        section = sections[index]
        data = section.data()
        if len(data) != section["sh_size"] or len(data) % INSN:
            raise LoaderError(f"{path}: section {name} is truncated")
        funcs = sorted(
            (s for s in symbols if s["st_shndx"] == index and s["st_info"]["type"] == "STT_FUNC"),
            key=lambda s: s["st_value"],
        )
        if not funcs and data:  # no symbols: the whole section is one program
            functions.append(Function(name, index, 0, bytearray(data), True))
        for sym in funcs:
            start, size = sym["st_value"], sym["st_size"]
            if size <= 0 or start + size > len(data) or start % INSN or size % INSN:
                raise LoaderError(f"{path}: function {sym.name} lies outside section {name}")
            is_program = sym["st_info"]["bind"] == "STB_GLOBAL" and name != ".text"
            functions.append(Function(sym.name, index, start, bytearray(data[start : start + size]), is_program))
    for section in sections:
        if not isinstance(section, RelocationSection) or section["sh_info"] not in exec_sections:
            continue
        target = section["sh_info"]
        for rel in section.iter_relocations():
            offset, sym = rel["r_offset"], symbols[rel["r_info_sym"]]
            owner = next(
                (f for f in functions if f.section == target and f.offset <= offset < f.offset + len(f.insns)), None
            )
            if owner is None:
                raise LoaderError(f"{path}: a relocation at {exec_sections[target]}+{offset} is outside every function")
            owner.relocs[offset - owner.offset] = (sym.name, sym["st_shndx"], sym["st_value"], rel["r_info_type"])
    return ElfObject(path, license_text, maps, map_offsets, maps_index, functions, exec_sections)


def program_type(section: str) -> tuple[int, int]:
    """(BPF_PROG_TYPE_*, prog_flags) for a program section name."""
    if section in ("tc", "classifier") or section.startswith(("tc/", "classifier/")):
        return bpfsys.BPF_PROG_TYPE_SCHED_CLS, 0
    if section == "xdp.frags" or section.startswith("xdp.frags/"):
        return bpfsys.BPF_PROG_TYPE_XDP, bpfsys.BPF_F_XDP_HAS_FRAGS
    if section == "xdp" or section.startswith("xdp/"):
        return bpfsys.BPF_PROG_TYPE_XDP, 0
    raise LoaderError(f"section {section!r}: unknown program type (tc, xdp, xdp.frags)")


# --------------------------------------------------------------------------------------------------
# linking one program


def link_program(obj: ElfObject, name: str, map_fds: dict[str, int]) -> bytes:
    """The instructions of program `name` ready for BPF_PROG_LOAD: the subprograms it calls appended,
    calls and map references resolved."""
    main = obj.program(name)
    layout_order: list[Function] = [main]
    base: dict[int, int] = {id(main): 0}  # function -> its first instruction in the linked program
    calls: list[tuple[Function, int, Function]] = []  # (caller, insn index in caller, callee)
    queue = [main]
    while queue:
        function = queue.pop(0)
        for index in range(len(function.insns) // INSN):
            opcode, regs = function.insns[index * INSN], function.insns[index * INSN + 1]
            if opcode != OP_CALL or regs >> 4 != BPF_PSEUDO_CALL:
                continue
            (imm,) = struct.unpack_from("<i", function.insns, index * INSN + 4)
            reloc = function.relocs.get(index * INSN)
            if reloc is not None:
                sym_name, sym_section, sym_value, _ = reloc
                section, target = sym_section, sym_value + (imm + 1) * INSN
            else:  # a call inside one section needs no relocation
                section, target = function.section, function.offset + (index + imm + 1) * INSN
            callee = obj.function_at(section, target)
            if callee is None:
                raise LoaderError(f"{obj.path}: {function.name} calls into the middle of a function")
            if id(callee) not in base:
                base[id(callee)] = sum(len(f.insns) for f in layout_order) // INSN
                layout_order.append(callee)
                queue.append(callee)
            calls.append((function, index, callee))
    code = {id(f): bytearray(f.insns) for f in layout_order}
    for caller, index, callee in calls:
        new_imm = base[id(callee)] - (base[id(caller)] + index + 1)
        struct.pack_into("<i", code[id(caller)], index * INSN + 4, new_imm)
    for function in layout_order:
        insns = code[id(function)]
        for offset, (sym_name, sym_section, sym_value, rtype) in function.relocs.items():
            if rtype == R_BPF_64_32 and sym_section in obj.section_types:
                continue  # a call: done above
            if rtype != R_BPF_64_64 or sym_section != obj.maps_section:
                raise LoaderError(
                    f"{obj.path}: {function.name} refers to {sym_name or 'a section'} (relocation type {rtype}): "
                    f"only maps in the `maps` section are supported"
                )
            if insns[offset] != OP_LD_IMM64 or offset + 2 * INSN > len(insns):
                raise LoaderError(f"{obj.path}: a map relocation in {function.name} is not on an ld_imm64")
            (imm,) = struct.unpack_from("<i", insns, offset + 4)
            map_name = obj.map_offsets.get(sym_value + imm) if sym_name not in obj.maps else sym_name
            if map_name is None or map_name not in map_fds:
                raise LoaderError(f"{obj.path}: {function.name} refers to an unknown map {sym_name!r}")
            insns[offset + 1] = (insns[offset + 1] & 0x0F) | (BPF_PSEUDO_MAP_FD << 4)
            struct.pack_into("<i", insns, offset + 4, map_fds[map_name])
            struct.pack_into("<i", insns, offset + INSN + 4, 0)
    return b"".join(bytes(code[id(f)]) for f in layout_order)


# --------------------------------------------------------------------------------------------------
# the loader


class ElfLoader(Loader):
    name = "elf"

    def __init__(
        self, pin_dir: str | Path, object_dir: str | Path | None = None, policy: HostPolicy | None = None
    ) -> None:
        super().__init__(pin_dir, policy)
        self.object_dir = Path(object_dir) if object_dir is not None else layout.BPF_SOURCE_DIR
        self._map_fds: dict[str, int] = {}

    def load(self, programs: Sequence[str]) -> None:
        stale = objects_problem(programs, self.object_dir)
        if stale and "no precompiled objects" not in stale:
            logger.warning("elf loader: {} (loading the objects as they are)", stale)
        objects: dict[Path, ElfObject] = {}
        for program in programs:
            path = object_path(program, self.object_dir)
            if path not in objects:
                objects[path] = read_object(path)
        self._check_map_definitions(objects.values())
        self.prepare_pins()
        try:
            for spec in layout.ALL_MAPS:
                self._map_fds[spec.name] = self._adopt_or_create(spec)
            for program in programs:
                obj = objects[object_path(program, self.object_dir)]
                function = obj.program(program)
                prog_type, prog_flags = program_type(obj.section_types[function.section])
                insns = link_program(obj, program, self._map_fds)
                try:
                    self._fds[program] = bpfsys.prog_load(
                        prog_type, insns, program, license=obj.license, prog_flags=prog_flags
                    )
                except bpfsys.BpfError as e:
                    raise LoaderError(f"the kernel refused {program} from {obj.path}: {e}") from None
        except BaseException:
            self.close()
            raise
        logger.debug("elf loaded {} from {}, maps pinned under {}", ", ".join(programs), self.object_dir, self.pin_dir)

    def _check_map_definitions(self, objects: Iterable[ElfObject]) -> None:
        """Every object must define our maps exactly as this agent (datapath.layout) and the pins do."""
        wanted = {spec.name: spec for spec in layout.ALL_MAPS}
        for obj in objects:
            for name, spec in obj.maps.items():
                want = wanted.get(name)
                if want is None:
                    raise LoaderError(
                        f"{obj.path} defines a map {name} this agent does not know: rebuild it (`make bpf`)"
                    )
                if spec != want:
                    pinned = layout.pin_path(self.pin_dir, want)
                    held = _pinned_shape(pinned)
                    raise LoaderError(
                        f"{obj.path} was built for other map sizes than this agent: {name} (type, key, value, "
                        f"max, flags) is {_shape(spec)} in it, {_shape(want)} here"
                        + (f" and in the pin {pinned}" if held == _shape(want) else "")
                        + (f", {held} in the pin {pinned}" if held not in (None, _shape(want)) else "")
                        + "; rebuild the objects (`make bpf`) or reinstall the package; nothing was changed"
                    )
            missing = [n for n in wanted if n not in obj.maps]
            if missing:
                raise LoaderError(f"{obj.path} defines no {', '.join(missing)}: rebuild it (`make bpf`)")

    def _adopt_or_create(self, spec: layout.MapSpec) -> int:
        path = layout.pin_path(self.pin_dir, spec)
        for _ in range(3):
            if path.exists():
                why = pinned_map_mismatch(self.pin_dir, spec)
                if why:
                    raise LoaderError(f"cannot adopt the pinned map: {why}")
                return bpfsys.obj_get(path)
            try:
                fd = bpfsys.map_create(
                    spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags, spec.name
                )
            except bpfsys.BpfError as e:
                raise LoaderError(f"cannot create map {spec.name}: {e}") from None
            try:
                bpfsys.obj_pin(fd, path)
                return fd
            except bpfsys.BpfError as e:
                os.close(fd)
                if e.errno != errno.EEXIST:  # else pinned meanwhile: adopt that one
                    raise LoaderError(f"cannot pin map {spec.name} at {path}: {e}") from None
        raise LoaderError(f"cannot pin map {spec.name} at {path}: it keeps changing")

    def close(self) -> None:
        for fd in [*self._fds.values(), *self._map_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._map_fds.clear()


def _shape(spec: layout.MapSpec) -> tuple[int, int, int, int, int]:
    return (spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)


def _pinned_shape(path: Path) -> tuple[int, int, int, int, int] | None:
    try:
        fd = bpfsys.obj_get(path)
    except OSError:
        return None
    try:
        info = bpfsys.map_info(fd)
    finally:
        os.close(fd)
    return (info.map_type, info.key_size, info.value_size, info.max_entries, info.flags)
