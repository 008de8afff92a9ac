"""Another tool on the same host: its XDP program and tc filter (tests/foreign_progs.c), loaded with
iproute2 into a namespace, and how to see what is attached there (ids, names, clsact qdiscs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from flannel_ebpf.lab.netns import Netns

SOURCE = Path(__file__).resolve().parent / "foreign_progs.c"
#: IPv4 total lengths the foreign programs drop: `ping -s <size>` makes size + 28
XDP_MARK = 1000
TC_MARK = 1001
XDP_MARK_PING = XDP_MARK - 28
TC_MARK_PING = TC_MARK - 28


def compile_foreign(out_dir: Path, defines: dict[str, str] | None = None, name: str = "foreign_progs.o") -> Path:
    """clang -target bpf, as `make bpf` does; skips the test when clang is missing."""
    if shutil.which("clang") is None:
        pytest.skip("needs clang for the foreign test programs")
    out = out_dir / name
    flags = [f"-D{k}={v}" for k, v in (defines or {}).items()]
    subprocess.run(
        ["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu", *flags,
         "-c", str(SOURCE), "-o", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class XdpProg:
    prog_id: int
    name: str
    mode: int  # IFLA_XDP_ATTACHED: 1 native, 2 generic


def xdp_prog(ns: Netns, dev: str) -> XdpProg | None:
    link = json.loads(ns.ip("-j", "-d", "link", "show", "dev", dev).stdout)[0]
    xdp = link.get("xdp")
    if not xdp or "prog" not in xdp:
        return None
    return XdpProg(xdp["prog"]["id"], xdp["prog"]["name"], xdp.get("mode", 0))


@dataclass(frozen=True)
class TcProg:
    pref: int
    bpf_name: str  # TCA_BPF_NAME (iproute2: `<object>:[<section>]`; ours: the program's name)
    prog_id: int
    prog_name: str


def tc_filters(ns: Netns, dev: str, direction: str = "ingress") -> list[TcProg]:
    """Every filter at a clsact hook (bpf ones with their program; others with id 0)."""
    r = ns.exec(["tc", "-j", "filter", "show", "dev", dev, direction], check=False)
    if not r.ok or not r.stdout.strip():
        return []
    result = []
    for f in json.loads(r.stdout):
        opts = f.get("options")
        if opts is None:
            continue  # the per-priority chain head
        prog = opts.get("prog") or {}
        result.append(
            TcProg(f.get("pref", 0), opts.get("bpf_name", f.get("kind", "")), prog.get("id", 0), prog.get("name", ""))
        )
    return result


def has_clsact(ns: Netns, dev: str) -> bool:
    qdiscs = json.loads(ns.exec(["tc", "-j", "qdisc", "show", "dev", dev]).stdout or "[]")
    return any(q.get("kind") == "clsact" for q in qdiscs)


def attach_foreign_xdp(ns: Netns, dev: str, obj: Path) -> XdpProg:
    ns.ip("link", "set", "dev", dev, "xdp", "obj", str(obj), "sec", "xdp")
    prog = xdp_prog(ns, dev)
    assert prog is not None and prog.name == "foreign_xdp", prog
    return prog


def attach_foreign_tc(ns: Netns, dev: str, obj: Path, pref: int, direction: str = "ingress") -> TcProg:
    """Another tool's clsact (if none yet) and its direct-action filter at priority `pref`."""
    if not has_clsact(ns, dev):
        ns.exec(["tc", "qdisc", "add", "dev", dev, "clsact"])
    ns.exec(["tc", "filter", "add", "dev", dev, direction, "prio", str(pref), "bpf", "da", "obj", str(obj),
             "sec", "tc"])  # fmt: skip
    found = [f for f in tc_filters(ns, dev, direction) if f.pref == pref and f.prog_name == "foreign_tc"]
    assert len(found) == 1, tc_filters(ns, dev, direction)
    return found[0]
