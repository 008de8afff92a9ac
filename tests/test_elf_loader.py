"""The ELF loader (loaders/elf.py): the objects `make bpf` builds, parsed and linked without the kernel;
defects refused in one line; every program loaded by both loaders and run on the same crafted packets with
BPF_PROG_TEST_RUN (and through a real TUN for encap), byte for byte and counter for counter; pins made by
one loader adopted by the other.

Kernel work runs in a private mount namespace with a bpffs of its own (`unshare -m`, or `ip netns exec`
in the harness of test_bpf_programs.py): no pin outlives the test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from flannel_ebpf.datapath import layout
from flannel_ebpf.loaders import make_loader, resolve_loader
from flannel_ebpf.loaders.base import LoaderError
from flannel_ebpf.loaders.elf import (
    BPF_PSEUDO_CALL,
    BPF_PSEUDO_MAP_FD,
    INSN,
    OP_CALL,
    OP_LD_IMM64,
    R_BPF_64_64,
    ElfLoader,
    link_program,
    object_path,
    objects_problem,
    program_type,
    read_object,
)
from tests.packets import eth, icmp, inner_echo, ipv4, udp, with_ttl
from tests.test_bpf_programs import (
    PEER,
    STRANGER,
    decap,
    encap,
    overlay_frame,
    routed_to_bridge,
    run_cases,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.bpf
needs_objects = pytest.mark.skipif(
    objects_problem() is not None, reason=f"precompiled objects unusable: {objects_problem()}"
)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None,
    reason="needs root, iproute2 and unshare (loads eBPF programs)",
)
#: the section each program's object puts it in
SECTIONS = {
    layout.PROG_ENCAP: "tc",
    layout.PROG_ENCAP_UNDERLAY: "tc",
    layout.PROG_DECAP_XDP: "xdp.frags",
    layout.PROG_DECAP_TC: "tc",
    layout.PROG_DELIVER: "tc",
    layout.PROG_PROBE_DECAP: "tc",
}


def copy_objects(tmp_path: Path) -> Path:
    """A copy of the bpf/ directory (sources, headers, objects, stamp) to spoil at will."""
    target = tmp_path / "bpf"
    shutil.copytree(layout.BPF_SOURCE_DIR, target)
    return target


def one_line_error(exc: pytest.ExceptionInfo[LoaderError]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, repr(text)
    return text


def in_private_bpffs(code: str, timeout: float = 120) -> Any:
    """Run Python `code` as root in a mount namespace of its own with a fresh bpffs on /sys/fs/bpf;
    returns the JSON it prints last."""
    prelude = "import json, subprocess; subprocess.run(['mount', '-t', 'bpf', 'bpf', '/sys/fs/bpf'], check=True)\n"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", prelude + code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# without the kernel


@needs_objects
@pytest.mark.parametrize("program", layout.PROGRAM_NAMES)
def test_objects_parse_and_link(program: str) -> None:
    obj = read_object(object_path(program))
    assert obj.license == "GPL"
    assert {s.name: s for s in layout.ALL_MAPS} == obj.maps  # every map, defined as the agent expects
    function = obj.program(program)
    assert obj.section_types[function.section] == SECTIONS[program]
    assert program_type(SECTIONS[program])[0] in (3, 6)
    fds = {spec.name: 100 + i for i, spec in enumerate(layout.ALL_MAPS)}
    insns = link_program(obj, program, fds)
    assert len(insns) % INSN == 0 and len(insns) >= len(function.insns)
    # every map reference became an ld_imm64 of a map fd, one per relocation the object holds
    with object_path(program).open("rb") as f:
        elf = ELFFile(f)
        map_relocs = sum(
            1
            for section in elf.iter_sections()
            if section.name.startswith(".rel") and not section.name.startswith((".rel.debug", ".rel.BTF"))
            for rel in section.iter_relocations()
            if rel["r_info_type"] == R_BPF_64_64
        )
    count = len(insns) // INSN
    map_refs, calls = 0, 0
    for i in range(count):
        op, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * INSN)
        if op == OP_LD_IMM64 and regs >> 4 == BPF_PSEUDO_MAP_FD:
            assert imm in fds.values()
            map_refs += 1
        if op == OP_CALL and regs >> 4 == BPF_PSEUDO_CALL:
            calls += 1
            assert 0 <= i + imm + 1 < count  # lands inside the linked program
    subprograms = len(insns) > len(function.insns)
    assert calls > 0 if subprograms else calls == 0
    # the encap program's map references in .text (the ICMP bucket) are linked in with its subprograms
    assert map_refs <= map_relocs and (map_refs > 0) == (program != layout.PROG_PROBE_DECAP)
    if program == layout.PROG_ENCAP:
        assert subprograms and map_refs == map_relocs


@needs_objects
def test_truncated_and_corrupt_objects_give_one_line(tmp_path: Path) -> None:
    directory = copy_objects(tmp_path)
    target = directory / "udp_encap.o"
    good = target.read_bytes()
    spoiled = {
        "truncated": good[: len(good) // 2],
        "header only": good[:64],
        "empty": b"",
        "not ELF": b"#!/bin/sh\necho hello\n" * 50,
        "section table garbage": good[:0x28] + b"\xff" * 8 + good[0x30:],
        "not for BPF": good[:0x12] + struct.pack("<H", 62) + good[0x14:],  # e_machine x86-64
    }
    for what, data in spoiled.items():
        target.write_bytes(data)
        loader = ElfLoader(tmp_path / "pins", object_dir=directory)  # refused before any pin is touched
        with pytest.raises(LoaderError) as exc:
            loader.load([layout.PROG_ENCAP])
        line = one_line_error(exc)
        assert "udp_encap.o" in line, (what, line)
        assert not (tmp_path / "pins").exists()
        print(f"{what}: {line}")
    target.unlink()
    with pytest.raises(LoaderError) as exc:
        ElfLoader(tmp_path / "pins", object_dir=directory).load([layout.PROG_ENCAP])
    assert "make bpf" in one_line_error(exc)


def test_auto_takes_objects_built_from_the_sources_beside_them(tmp_path: Path) -> None:
    if objects_problem() is not None:
        assert resolve_loader("auto") == "bcc"
        pytest.skip(f"objects unusable here: {objects_problem()}")
    assert resolve_loader("auto") == "elf" and resolve_loader("bcc") == "bcc"
    directory = copy_objects(tmp_path)
    assert objects_problem(directory=directory) is None
    header = directory / "lib" / "flannel.h"
    header.write_text(header.read_text() + "\n/* edited */\n")
    assert "flannel.h changed" in (objects_problem(directory=directory) or "")
    (directory / "sources.sha256").unlink()
    assert "sources.sha256 is missing" in (objects_problem(directory=directory) or "")
    (directory / "udp_encap.o").unlink()
    assert "udp_encap.o" in (objects_problem([layout.PROG_ENCAP], directory=directory) or "")
    with pytest.raises(LoaderError):
        make_loader("tcc", "/nonexistent")


# --------------------------------------------------------------------------------------------------
# in the kernel


def _patched_map_sizes(directory: Path, name: str, max_entries: int) -> None:
    """Every object's definition of map `name` with another max_entries (what other sources would give)."""
    for obj in directory.glob("*.o"):
        data = bytearray(obj.read_bytes())
        with obj.open("rb") as f:
            elf = ELFFile(f)
            maps = elf.get_section_by_name("maps")
            symbol = next(s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name == name)
            at = maps["sh_offset"] + symbol["st_value"] + 12  # struct bpf_elf_map.max_elem
        struct.pack_into("<I", data, at, max_entries)
        obj.write_bytes(bytes(data))


@needs_root
@needs_objects
def test_objects_built_for_other_map_sizes_are_refused_and_the_pins_stay(tmp_path: Path) -> None:
    directory = copy_objects(tmp_path)
    _patched_map_sizes(directory, "fl_peers", 1024)
    out = in_private_bpffs(
        f"""
from ipaddress import IPv4Address, IPv4Network
from flannel_ebpf.datapath import layout
from flannel_ebpf.datapath.maps import DatapathMaps
from flannel_ebpf.loaders.base import LoaderError
from flannel_ebpf.loaders.elf import ElfLoader
pins = "/sys/fs/bpf/t"
good = ElfLoader(pins)
good.load([layout.PROG_ENCAP])
good.close()
with DatapathMaps(pins) as maps:
    maps.set_peer(IPv4Network("10.9.2.0/24"), IPv4Address("192.168.9.2"))
try:
    ElfLoader(pins, object_dir={str(directory)!r}).load([layout.PROG_ENCAP, layout.PROG_DECAP_TC])
    error = None
except LoaderError as e:
    error = str(e)
with DatapathMaps(pins) as maps:
    peers = {{str(k): str(v) for k, v in maps.read_peers().items()}}
print(json.dumps({{"error": error, "peers": peers}}))
"""
    )
    error = out["error"]
    print(error)
    assert error and "\n" not in error
    assert "fl_peers" in error and "1024" in error and "65536" in error and "make bpf" in error
    assert out["peers"] == {"10.9.2.0/24": "192.168.9.2"}  # the live map was neither replaced nor emptied


@needs_root
@needs_objects
def test_pins_made_by_one_loader_are_adopted_by_the_other() -> None:
    out = in_private_bpffs(
        """
import os
from ipaddress import IPv4Address, IPv4Network
from flannel_ebpf.datapath import bpfsys, layout
from flannel_ebpf.datapath.maps import DatapathMaps
from flannel_ebpf.loaders import make_loader
pins = "/sys/fs/bpf/t"

def map_ids():
    ids = {}
    for spec in layout.ALL_MAPS:
        fd = bpfsys.obj_get(layout.pin_path(pins, spec))
        ids[spec.name] = [bpfsys.map_info(fd).map_id, bpfsys.map_info(fd).name]
        os.close(fd)
    return ids

rounds = []
for i, kind in enumerate(["bcc", "elf", "bcc", "elf"]):
    loader = make_loader(kind, pins)
    loader.load(list(layout.PROGRAM_NAMES))
    names = {p: bpfsys.prog_info(loader.program_fd(p)).name for p in layout.PROGRAM_NAMES}
    loader.close()
    with DatapathMaps(pins) as maps:
        peers = len(maps.read_peers())
        maps.set_peer(IPv4Network(f"10.9.{i}.0/24"), IPv4Address("192.168.9.2"))
    rounds.append({"loader": loader.name, "ids": map_ids(), "peers": peers, "names": names})
print(json.dumps(rounds))
""",
        timeout=300,
    )
    assert [r["loader"] for r in out] == ["bcc", "elf", "bcc", "elf"]
    assert all(r["ids"] == out[0]["ids"] for r in out)  # the very same maps, whichever loader came next
    assert [r["peers"] for r in out] == [0, 1, 2, 3]  # entries written under one loader seen under the next
    assert {name for _, name in out[0]["ids"].values()} == {s.name for s in layout.ALL_MAPS}  # kernel names
    assert out[0]["names"] == out[1]["names"]  # same kernel program names: attach/detach find them
    assert all(layout.is_our_program(n, p) for p, n in out[1]["names"].items())


def crafted_cases() -> list[dict[str, Any]]:
    """Every program on packets that take each of its paths (no timing-dependent case)."""
    local = inner_echo(dst="10.60.1.2", src="10.60.2.2")
    forwarded = with_ttl(local, 63)
    cases: list[dict[str, Any]] = [
        encap(inner_echo()),
        decap(layout.PROG_DECAP_XDP, overlay_frame(local)),
        decap(layout.PROG_PROBE_DECAP, overlay_frame(local)),
        {"configure": True},
        encap(inner_echo()),
        encap(inner_echo(dst="10.60.2.77", size=900)),
        encap(inner_echo(dst="10.60.9.9")),
        encap(inner_echo(ttl=1)),
        encap(inner_echo(size=1480, df=True)),
        encap(inner_echo(size=1480)),
        encap(b"\x60" + bytes(39), ether_type=0x86DD),
        encap(inner_echo(src="224.0.0.5", dst="10.60.9.9")),
    ]
    for prog in (layout.PROG_DECAP_XDP, layout.PROG_DECAP_TC):
        cases += [
            decap(prog, overlay_frame(local)),
            decap(prog, eth(ipv4(PEER, "192.168.60.1", 17, udp(53, b"dns?")))),
            decap(prog, overlay_frame(local, src=STRANGER)),
            decap(prog, overlay_frame(inner_echo(dst="10.60.2.2"))),
            decap(prog, overlay_frame(inner_echo(dst="10.60.1.2", src="10.60.9.9"))),
            decap(prog, overlay_frame(local, options=b"\x01\x01\x01\x00")),
            decap(prog, overlay_frame(local, bad_csum=True)),
            decap(prog, overlay_frame(with_ttl(local, 1))),
            decap(prog, overlay_frame(local, frag=0x2000)),
            decap(prog, eth(ipv4(PEER, "192.168.60.1", 1, icmp()))),
        ]
    cases += [
        decap(layout.PROG_DECAP_XDP, overlay_frame(inner_echo(dst="10.60.1.2", src="10.60.2.2", size=7000))),
        {"endpoint": True},
        routed_to_bridge(forwarded),
        routed_to_bridge(forwarded, from_underlay=False),
        routed_to_bridge(with_ttl(inner_echo(dst="10.60.1.3", src="10.60.2.2"), 63)),
        routed_to_bridge(forwarded, dst_mac="02:00:00:00:00:99"),
        {"configure": True, "deliver_peer": True},
        decap(layout.PROG_DECAP_TC, overlay_frame(local)),
        decap(layout.PROG_DECAP_TC, overlay_frame(inner_echo(dst="10.60.1.3", src="10.60.2.2"))),
        {"configure": True, "allow_foreign_source": True},
        decap(layout.PROG_DECAP_XDP, overlay_frame(inner_echo(dst="10.60.1.2", src="172.16.5.5"))),
        decap(layout.PROG_PROBE_DECAP, overlay_frame(local)),
    ]
    return cases


@pytest.fixture
def prog_netns() -> Any:
    """A factory of namespaces as test_bpf_programs.py's harness expects them (a TUN flannel0, a veth pair
    u0/u1; the harness configures them, so one per run); all deleted at the end."""
    made: list[str] = []

    def make() -> str:
        name = f"feb{secrets.token_hex(2)}-elf"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        for cmd in (
            ["ip", "-n", name, "tuntap", "add", "dev", "flannel0", "mode", "tun"],
            ["ip", "-n", name, "link", "set", "flannel0", "up"],
            ["ip", "-n", name, "link", "add", "u0", "mtu", "1500", "address", "02:00:00:00:0e:01",
             "type", "veth", "peer", "name", "u1", "address", "02:00:00:00:0e:02"],  # fixed: same bytes out
            ["ip", "-n", name, "link", "set", "u0", "up"],
            ["ip", "-n", name, "link", "set", "u1", "up"],
        ):  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        return name

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


@needs_root
@needs_objects
def test_both_loaders_give_identical_bytes_and_counters(prog_netns: Any) -> None:
    cases = crafted_cases()
    by_loader = {kind: run_cases(prog_netns(), cases, loader=kind) for kind in ("bcc", "elf", "auto")}
    bcc, elf = by_loader["bcc"], by_loader["elf"]
    assert len(bcc) == len(elf) == sum(1 for c in cases if not (c.get("configure") or c.get("endpoint")))
    for i, (a, b) in enumerate(zip(bcc, elf, strict=True)):
        assert a == b, f"case {i}: bcc {a} != elf {b}"
    assert by_loader["auto"] == elf
    # the comparison means something: packets went out encapsulated, decapsulated, handed off, dropped
    assert bcc[3]["sent"] and bcc[0]["counters"]["encap_no_config"] == 1
    assert bcc[2]["retval"] in (0, 1) and bcc[1]["counters"]["decap_no_config"] == 1
    last = bcc[-1]["counters"]
    exercised = {k for k, v in last.items() if v}
    assert {"encap_ok", "encap_no_peer_icmp", "decap_ok", "decap_not_member", "deliver_port", "deliver_peer"} <= (
        exercised
    )
    print(f"{len(bcc)} runs identical under bcc and elf; reasons seen: {sorted(exercised)}")
