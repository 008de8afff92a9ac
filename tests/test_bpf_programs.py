"""The eBPF programs of bpf/ on crafted packets, with BPF_PROG_TEST_RUN (no traffic, no peers).

The programs are loaded by the bcc loader inside a namespace of our own (`ip netns exec`, which also
gives a private mount namespace: a private bpffs holds the pins and disappears with it).

Decapsulation runs under BPF_PROG_TEST_RUN. Encapsulation cannot: test_run always hands a tc program
an Ethernet frame, while on flannel0 (a TUN) it sees a bare IPv4 packet. So the encap program is
attached to a real TUN `flannel0` in the namespace, packets are written to it with a packet socket
(which goes through tc egress, byte for byte as given), and what comes out is captured: encapsulated
frames on the far end of the underlay veth u0/u1 (MTU 1500), ICMP errors on flannel0's ingress.
The harness (this file run with --harness) returns each case's output and counters; checks are here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from flannel_ebpf.datapath.layout import ALL_MAPS, BPF_SOURCE_DIR, PROGRAM_SOURCES, Reason

try:
    from tests.packets import csum, eth, icmp, inner_echo, ipv4, udp, with_ttl
except ImportError:  # run as a script (`--harness`) inside a namespace: tests/ is sys.path[0]
    from packets import csum, eth, icmp, inner_echo, ipv4, udp, with_ttl  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
OWN, PEER, STRANGER = "192.168.60.1", "192.168.60.2", "192.168.60.9"
NETWORK, LOCAL_SUBNET, PEER_SUBNET = "10.60.0.0/16", "10.60.1.0/24", "10.60.2.0/24"
PEER2, PEER2_SUBNET = "192.168.60.3", "10.60.3.0/24"  # a second member, for configs that ask for it
PORT = 8285
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
TC_ACT_UNSPEC = 0xFFFFFFFF  # -1 as the u32 retval of a test run
#: a local container on the bridge (fl_endpoints), and the bridge's own MAC
ENDPOINT_IP, ENDPOINT_MAC, ENDPOINT_PORT, BRIDGE_MAC = "10.60.1.2", "02:00:00:00:00:02", 77, "02:00:00:00:0b:0b"
XDP_DROP, XDP_PASS = 1, 2
#: how `make bpf` compiles the objects the ELF loader (and iproute2) load
CLANG_BPF = ["clang", "-target", "bpf", "-O2", "-g", "-Wall", "-Werror", "-I/usr/include/x86_64-linux-gnu"]
#: the decap drop reasons, in the order of the crafted cases below
DECAP_DROPS = [
    "decap_not_member",
    "decap_not_local",
    "decap_foreign_source",
    "decap_ip_options",
    "decap_malformed",
    "decap_ttl_expired",
]
#: the encap program's ICMP rate limit (icmp_reply.h): per CPU, 1000 per second, burst 50
ICMP_BURST, ICMP_PER_MS = 50, 1

pytestmark = pytest.mark.bpf
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (loads eBPF programs)"
)


# --------------------------------------------------------------------------------------------------
# packets


def overlay_frame(
    inner: bytes, src: str = PEER, dport: int = PORT, frag: int = 0, options: bytes = b"", bad_csum: bool = False
) -> bytes:
    return eth(ipv4(src, OWN, 17, udp(dport, inner), frag=frag, options=options, bad_csum=bad_csum))


# --------------------------------------------------------------------------------------------------
# the harness: runs inside the namespace


def _harness() -> None:
    """stdin: {"cases": [{"prog", "packet", "l3"}...]} -> stdout: results with counters after each."""
    from ipaddress import IPv4Network

    from pyroute2 import IPRoute

    from flannel_ebpf.datapath import bpfsys, layout
    from flannel_ebpf.datapath.maps import DatapathMaps
    from flannel_ebpf.loaders import make_loader

    request = json.loads(sys.stdin.read())
    # One CPU: tc egress runs in the sender's context, so every packet meets the same per-CPU ICMP bucket.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)  # private to this mount ns
    pin_dir = "/sys/fs/bpf/test"
    loader = make_loader(request.get("loader", "bcc"), pin_dir)  # bcc unless asked (test_elf_loader.py)
    loader.load(list(layout.PROGRAM_NAMES))
    with IPRoute() as ipr:
        tun = ipr.link_lookup(ifname="flannel0")[0]
        underlay = ipr.link_lookup(ifname="u0")[0]
        far_end = ipr.link_lookup(ifname="u1")[0]
        far_mac = ipr.get_links(far_end)[0].get_attr("IFLA_ADDRESS")
        ipr.addr("add", index=underlay, address=OWN, prefixlen=24)
        for neighbour in (PEER, PEER2):  # permanent: no ARP
            ipr.neigh("add", dst=neighbour, lladdr=far_mac, ifindex=underlay, state=0x80)
        ipr.route("add", dst="10.60.1.0/24", type="blackhole")  # where our ICMP errors end
    Path("/proc/sys/net/ipv4/conf/flannel0/accept_local").write_text("1")
    loader.attach_tc(layout.PROG_ENCAP, tun, "egress")
    sniff_far = _packet_socket(far_end)
    sniff_tun = _packet_socket(tun)
    sender = _packet_socket(tun)
    results: list[dict[str, Any]] = []
    with DatapathMaps(pin_dir) as maps:
        for case in request["cases"]:
            if case.get("endpoint"):
                maps.set_endpoint(IPv4Address(ENDPOINT_IP), layout.Endpoint(ENDPOINT_PORT, ENDPOINT_MAC, BRIDGE_MAC))
                continue
            if case.get("configure"):
                maps.write_config(
                    layout.DatapathConfig(
                        own_ip=IPv4Address(OWN),
                        tun_addr=IPv4Address("10.60.1.0"),
                        local_subnet=IPv4Network(LOCAL_SUBNET),
                        network=IPv4Network(NETWORK),
                        underlay_ifindex=underlay,
                        underlay_mtu=1500,
                        port=PORT,
                        deliver_peer=case.get("deliver_peer", False),
                        allow_foreign_source=case.get("allow_foreign_source", False),
                    )
                )
                for subnet, public_ip in case.get("peers", [[PEER_SUBNET, PEER]]):
                    maps.set_peer(IPv4Network(subnet), IPv4Address(public_ip))
                    maps.set_member(IPv4Address(public_ip), 1)
                continue
            if case.get("batch"):  # many packets through one program: verdicts, output, counters once
                results.append(_run_batch(case, loader, sender, sniff_far, sniff_tun, maps))
                continue
            packet = bytes.fromhex(case["packet"])
            if case.get("burst"):  # the same packet written n times, as fast as possible
                start = time.monotonic_ns()
                for _ in range(case["burst"]):
                    with contextlib.suppress(BlockingIOError, OSError):  # ENOBUFS for each TC_ACT_SHOT
                        sender.sendto(packet, ("flannel0", 0x0800))
                elapsed = time.monotonic_ns() - start
                replies = 0
                while _capture(sniff_tun, lambda f: len(f) > 20 and f[9] == 1 and f[20] == 3, incoming_only=True):
                    replies += 1
                result = {"retval": None, "data": "", "elapsed_ns": elapsed, "replies": replies}
            elif case["prog"] == layout.PROG_ENCAP:
                try:
                    sender.sendto(packet, ("flannel0", case.get("proto", 0x0800)))
                except OSError as e:  # a TC_ACT_SHOT verdict reaches the sender as ENOBUFS
                    if e.errno != errno.ENOBUFS:
                        raise
                far = _capture(sniff_far, lambda f: len(f) > 37 and f[12:14] == b"\x08\x00" and f[23] == 17)
                back = _capture(sniff_tun, lambda f: len(f) > 20 and f[9] == 1 and f[20] == 3, incoming_only=True)
                result = {"retval": None, "data": (far or back or b"").hex(), "sent": bool(far), "icmp": bool(back)}
            else:
                ctx = None
                if case.get("from_underlay"):  # struct __sk_buff with ingress_ifindex (offset 36) set
                    ctx = bytearray(192)
                    struct.pack_into("=I", ctx, 36, underlay)
                fd = loader.program_fd(case["prog"])
                run = bpfsys.prog_test_run(fd, packet, bytes(ctx) if ctx else None, out_size=len(packet) + 64)
                result = {"retval": run.retval, "data": run.data.hex()}
            result["counters"] = {r.label: c.packets for r, c in maps.read_counters().items()}
            results.append(result)
    loader.close()
    print(json.dumps(results))


def _run_batch(case: dict[str, Any], loader: Any, sender: Any, far: Any, tun: Any, maps: Any) -> dict[str, Any]:
    """Decap: every frame test-run, with its verdict and output. Encap: every packet written to flannel0,
    then everything that came out captured (encapsulated frames at the far end, ICMP errors on flannel0)."""
    from flannel_ebpf.datapath import bpfsys, layout

    out: dict[str, Any] = {}
    if case["prog"] == layout.PROG_ENCAP:
        start = time.monotonic_ns()
        for packet, proto in case["batch"]:
            try:
                sender.sendto(bytes.fromhex(packet), ("flannel0", proto))
            except OSError as e:  # ENOBUFS for each TC_ACT_SHOT; EINVAL for what the kernel refuses
                if e.errno not in (errno.ENOBUFS, errno.EINVAL):
                    raise
        out["elapsed_ns"] = time.monotonic_ns() - start
        frames, replies = [], []
        while (f := _capture(far, lambda f: len(f) >= 42 and f[12:14] == b"\x08\x00" and f[23] == 17)) is not None:
            frames.append(f.hex())
        while (f := _capture(tun, lambda f: len(f) > 20 and f[9] == 1, incoming_only=True)) is not None:
            replies.append(f.hex())
        out.update(frames=frames, replies=replies)
    else:
        fd = loader.program_fd(case["prog"])
        runs = []
        for frame in case["batch"]:
            packet = bytes.fromhex(frame)
            try:
                run = bpfsys.prog_test_run(fd, packet, None, out_size=len(packet) + 64)
            except OSError as e:  # the kernel refused the input (the test decides whether it may)
                runs.append([None, e.errno])
                continue
            runs.append([run.retval, run.data.hex()])
        out["runs"] = runs
    out["counters"] = {r.label: c.packets for r, c in maps.read_counters().items()}
    return out


def _packet_socket(ifindex: int) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    sock.bind((socket.if_indextoname(ifindex), 0x0003))
    sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: a fuzz batch's output is queued whole
    sock.settimeout(0.3)
    return sock


def _capture(sock: socket.socket, wanted: Any, incoming_only: bool = False) -> bytes | None:
    """The first frame `wanted` accepts within the socket timeout; earlier ones are skipped."""
    while True:
        try:
            frame, addr = sock.recvfrom(65536)
        except TimeoutError:
            return None
        if incoming_only and addr[2] == socket.PACKET_OUTGOING:
            continue
        if wanted(frame):
            return frame


@pytest.fixture(scope="module")
def netns() -> Any:
    name = f"feb{secrets.token_hex(2)}-prog"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            ["ip", "-n", name, "tuntap", "add", "dev", "flannel0", "mode", "tun"],
            ["ip", "-n", name, "link", "set", "flannel0", "up"],
            ["ip", "-n", name, "link", "add", "u0", "mtu", "1500", "type", "veth", "peer", "name", "u1"],
            ["ip", "-n", name, "link", "set", "u0", "up"],
            ["ip", "-n", name, "link", "set", "u1", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run_cases(netns: str, cases: list[dict[str, Any]], loader: str = "bcc") -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(Path(__file__).resolve()), "--harness"],
        input=json.dumps({"cases": cases, "loader": loader}),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def encap(packet: bytes, ether_type: int = 0x0800) -> dict[str, Any]:
    """Written to flannel0 as is; ether_type becomes skb->protocol."""
    return {"prog": "flannel_encap", "packet": packet.hex(), "proto": ether_type}


def decap(prog: str, frame: bytes) -> dict[str, Any]:
    return {"prog": prog, "packet": frame.hex()}


def routed_to_bridge(inner: bytes, dst_mac: str = ENDPOINT_MAC, from_underlay: bool = True) -> dict[str, Any]:
    """A frame the host routes out of the container bridge (tc egress there: the hand-off)."""
    frame = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(BRIDGE_MAC.replace(":", "")) + b"\x08\x00" + inner
    return {"prog": "flannel_br_out", "packet": frame.hex(), "from_underlay": from_underlay}


# --------------------------------------------------------------------------------------------------
# tests


def test_reasons_and_layout_match_the_c_header() -> None:
    header = (BPF_SOURCE_DIR / "lib" / "flannel.h").read_text()
    in_c = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"FL_((?:ENCAP|UL|DECAP|DELIVER)_[A-Z0-9_]+) = (\d+)", header)
    }
    assert in_c == {r.name: r.value for r in Reason}
    for spec in ALL_MAPS:
        assert re.search(rf"FL_MAP\([^;]*\b{spec.name}\b", header), spec.name


@pytest.mark.skipif(shutil.which("clang") is None, reason="needs clang")
def test_plain_clang_builds_objects_for_the_elf_loader(tmp_path: Path) -> None:
    from elftools.elf.elffile import ELFFile

    expected_section = {
        "udp_encap.c": "tc",
        "udp_encap_underlay.c": "tc",
        "udp_decap_xdp.c": "xdp.frags",
        "udp_decap_tc.c": "tc",
        "udp_deliver_tc.c": "tc",
        "probe_decap.c": "tc",
    }
    for source in PROGRAM_SOURCES.values():
        obj = tmp_path / source.replace(".c", ".o")
        subprocess.run(
            [*CLANG_BPF, "-c", str(BPF_SOURCE_DIR / source), "-o", str(obj)],
            check=True,
            timeout=60,
        )
        with obj.open("rb") as f:
            elf = ELFFile(f)
            sections = {s.name for s in elf.iter_sections()}
            assert {expected_section[source], "maps", "license"} <= sections, sections
            assert not sections & {".data", ".bss", ".rodata"}, "no global data"
            maps = elf.get_section_by_name("maps")
            assert maps.data_size == 4 * 9 * len(ALL_MAPS)  # four struct fl_map_def (iproute2's layout)


@needs_root
def test_programs_on_crafted_packets(netns: str) -> None:
    echo = inner_echo()
    big_df = inner_echo(size=1480, df=True)
    big = inner_echo(size=1480)
    local_echo = inner_echo(dst="10.60.1.2", src="10.60.2.2")
    cases: list[dict[str, Any]] = [
        encap(echo),  # 0: before the agent filled the config
        decap("flannel_xdp_in", overlay_frame(local_echo)),  # 1
        {"configure": True},
        encap(echo),  # 2: encapsulated
        encap(inner_echo(dst="10.60.9.9")),  # 3: no peer -> ICMP net unreachable
        encap(ipv4("10.60.1.2", "10.60.9.9", 1, icmp(kind=3, code=1))),  # 4: no ICMP about ICMP errors
        encap(inner_echo(ttl=1)),  # 5
        encap(big_df),  # 6: too big, DF -> frag needed
        encap(big),  # 7: too big, no DF -> dropped
        encap(b"\x60" + bytes(39), ether_type=0x86DD),  # 8: IPv6
        encap(b"\x44" + echo[1:]),  # 9: ihl 4
    ]
    for prog in ("flannel_xdp_in", "flannel_tc_in"):
        cases += [
            decap(prog, overlay_frame(local_echo)),  # ok
            decap(prog, eth(ipv4(PEER, OWN, 17, udp(53, b"dns?")))),  # other traffic
            decap(prog, overlay_frame(local_echo, src=STRANGER)),  # not a member
            decap(prog, overlay_frame(inner_echo(dst="10.60.2.2"))),  # not our subnet
            decap(prog, overlay_frame(inner_echo(dst="10.60.1.2", src="10.60.9.9"))),  # source leased by nobody
            decap(prog, overlay_frame(local_echo, options=b"\x01\x01\x01\x00")),  # IP options
            decap(prog, overlay_frame(local_echo, bad_csum=True)),  # bad outer checksum
            decap(prog, overlay_frame(inner_echo(dst="10.60.1.2", src="10.60.2.2", ttl=1))),  # TTL
        ]
    delivery = len(cases) - 1  # results index of the first delivery case ("endpoint" yields no result)
    forwarded = with_ttl(local_echo, 63)
    cases += [
        {"endpoint": True},
        routed_to_bridge(forwarded),  # handed to the port
        routed_to_bridge(forwarded, from_underlay=False),  # the host's own traffic: the bridge's
        routed_to_bridge(with_ttl(inner_echo(dst="10.60.1.3", src="10.60.2.2"), 63)),  # no endpoint
        routed_to_bridge(forwarded, dst_mac="02:00:00:00:00:99"),  # the host resolved another MAC
        # A jumbo frame: test runs hand an xdp.frags program everything past the first page as fragments
        # (multi-buffer XDP, as on a NIC with a 9000 MTU). Skb test runs stop at a page, and tc reads
        # skb->len anyway.
        decap("flannel_xdp_in", overlay_frame(inner_echo(dst="10.60.1.2", src="10.60.2.2", size=7000))),
        {"configure": True, "deliver_peer": True},
        decap("flannel_tc_in", overlay_frame(local_echo)),  # peer mode: straight into the container
        decap("flannel_tc_in", overlay_frame(inner_echo(dst="10.60.1.3", src="10.60.2.2"))),  # unknown: stack
    ]
    # Inner sources: a member may only speak for the subnets it leases (unless --udp-allow-foreign-source).
    # Fragments: every one goes to the kernel untouched; counted when UDP from a member to us.
    # ICMP errors: never to a source that is no unicast host; at most ICMP_BURST at once, then 1 per ms.
    policy = sum(1 for c in cases if not (c.get("configure") or c.get("endpoint")))  # results index
    own_subnet_src = inner_echo(dst="10.60.1.2", src="10.60.1.7")  # "from" our own subnet, by a peer
    foreign = inner_echo(dst="10.60.1.2", src="172.16.5.5")  # from a network routed into the overlay
    first_fragment = overlay_frame(local_echo, frag=0x2000)
    later_fragment = eth(ipv4(PEER, OWN, 17, b"rest of a datagram", frag=0x0010))
    later_from_stranger = eth(ipv4(STRANGER, OWN, 17, b"rest of a datagram", frag=0x0010))
    bad_sources = ["224.0.0.5", "127.0.0.1", "240.0.0.1", "255.255.255.255", "0.0.0.0", "0.1.2.3"]
    cases += [
        {"configure": True},
        *[
            decap(prog, overlay_frame(p))
            for prog in ("flannel_xdp_in", "flannel_tc_in")
            for p in (own_subnet_src, foreign)
        ],
        *[decap(prog, f) for prog in ("flannel_xdp_in", "flannel_tc_in") for f in (first_fragment, later_fragment)],
        decap("flannel_tc_in", later_from_stranger),
        *[encap(inner_echo(src=src, dst="10.60.9.9")) for src in bad_sources],  # no peer: ICMP due, not sent
        encap(
            inner_echo(src="10.60.1.2", dst="10.60.9.9", size=1480, df=True)[:12]
            + IPv4Address("224.1.1.1").packed
            + inner_echo(dst="10.60.2.2", size=1480, df=True)[16:]
        ),  # too big, multicast source
        encap(inner_echo(src="169.254.3.3", dst="10.60.9.9")),  # link-local: a unicast host, answered
        {"burst": 200, "prog": "flannel_encap", "packet": inner_echo(dst="10.60.9.9").hex()},
        {"configure": True, "allow_foreign_source": True},
        *[decap(prog, overlay_frame(foreign)) for prog in ("flannel_xdp_in", "flannel_tc_in")],
        # the underlay's egress, where the kernel routed a peer's packet straight (--udp-encap underlay)
        decap("flannel_ul_out", eth(echo)),  # a peer's: encapsulated in place
        decap("flannel_ul_out", eth(inner_echo(dst="10.60.9.9"))),  # in the Network, no peer: untouched
        decap("flannel_ul_out", eth(ipv4(OWN, PEER, 17, udp(53, b"dns?")))),  # the host's own: untouched
        decap("flannel_ul_out", eth(b"\x60" + bytes(39), proto=0x86DD)),  # IPv6: untouched
        decap("flannel_ul_out", eth(inner_echo(ttl=1))),  # TTL
    ]
    results = run_cases(netns, cases)

    def delta(i: int) -> dict[str, int]:
        before = results[i - 1]["counters"] if i else dict.fromkeys(results[0]["counters"], 0)
        return {k: v - before[k] for k, v in results[i]["counters"].items() if v != before[k]}

    # no config yet: encap drops, decap leaves the packet alone
    assert not results[0]["sent"] and delta(0) == {"encap_no_config": 1}
    assert results[1]["retval"] == XDP_PASS and delta(1) == {"decap_no_config": 1}

    # encapsulation, byte for byte
    r = results[2]
    assert r["sent"] and delta(2) == {"encap_ok": 1}
    out = bytes.fromhex(r["data"])
    assert out[12:14] == b"\x08\x00" and out[0:6] != bytes(6)  # redirect_neigh filled in the MACs
    outer, udph, inner = out[14:34], out[34:42], out[42:]
    assert inner == with_ttl(echo, 63)  # TTL decremented, checksum still valid
    assert csum(inner[:20]) == 0
    assert outer[0] == 0x45 and struct.unpack("!H", outer[2:4])[0] == 28 + len(echo)
    assert struct.unpack("!H", outer[6:8])[0] == 0x4000  # DF
    assert outer[8] == 64 and outer[9] == 17
    assert outer[12:16] == IPv4Address(OWN).packed and outer[16:20] == IPv4Address(PEER).packed
    assert csum(outer) == 0
    sport, dport, length, check = struct.unpack("!HHHH", udph)
    assert sport >= 49152 and dport == PORT and length == 8 + len(echo) and check == 0

    def icmp_reply(i: int, code: int) -> tuple[bytes, bytes]:
        res = results[i]
        assert res["icmp"] and not res["sent"], res
        msg = bytes.fromhex(res["data"])
        ip_hdr, icmp_msg = msg[:20], msg[20:]
        assert csum(ip_hdr) == 0 and ip_hdr[9] == 1
        assert ip_hdr[12:16] == IPv4Address("10.60.1.0").packed and ip_hdr[16:20] == IPv4Address("10.60.1.2").packed
        assert icmp_msg[0] == 3 and icmp_msg[1] == code and csum(icmp_msg) == 0
        return icmp_msg, msg

    icmp_msg, _ = icmp_reply(3, 0)
    assert delta(3) == {"encap_no_peer_icmp": 1}
    assert icmp_msg[8:36] == inner_echo(dst="10.60.9.9")[:28]  # the original header + 8 bytes
    assert not (results[4]["sent"] or results[4]["icmp"]) and delta(4) == {"encap_no_peer_drop": 1}
    assert not (results[5]["sent"] or results[5]["icmp"]) and delta(5) == {"encap_ttl_expired": 1}
    icmp_msg, _ = icmp_reply(6, 4)
    assert delta(6) == {"encap_too_big_icmp": 1}
    assert struct.unpack("!H", icmp_msg[6:8])[0] == 1500 - 28  # next-hop MTU
    assert not (results[7]["sent"] or results[7]["icmp"]) and delta(7) == {"encap_too_big_drop": 1}
    assert not (results[8]["sent"] or results[8]["icmp"]) and delta(8) == {"encap_not_ipv4": 1}
    assert not (results[9]["sent"] or results[9]["icmp"]) and delta(9) == {"encap_malformed": 1}

    # decapsulation, XDP then tc
    for first, (passed, dropped) in ((10, (XDP_PASS, XDP_DROP)), (18, (TC_ACT_OK, TC_ACT_SHOT))):
        ok = results[first]
        assert ok["retval"] == passed and delta(first) == {"decap_ok": 1}
        assert bytes.fromhex(ok["data"]) == eth(with_ttl(local_echo, 63))  # Ethernet kept, 28 bytes gone
        other = results[first + 1]
        # other traffic: XDP passes it, tc hands it on to the next filter (TC_ACT_UNSPEC)
        assert other["retval"] == (XDP_PASS if passed == XDP_PASS else TC_ACT_UNSPEC)
        assert delta(first + 1) == {"decap_pass_other": 1}
        assert bytes.fromhex(other["data"]) == eth(ipv4(PEER, OWN, 17, udp(53, b"dns?")))  # untouched
        for offset, reason in enumerate(
            DECAP_DROPS,
            start=2,
        ):
            res = results[first + offset]
            assert res["retval"] == dropped and delta(first + offset) == {reason: 1}, (first + offset, reason)

    # delivery: the hand-off at the bridge's egress, then peer mode in tc decap
    port, own, unknown, other_mac, jumbo, peer, peer_unknown = range(delivery, delivery + 7)
    assert results[jumbo]["retval"] == XDP_PASS and delta(jumbo) == {"decap_ok": 1}  # not "malformed"
    assert len(bytes.fromhex(results[jumbo]["data"])) == 14 + 7000  # all of it, 28 bytes shorter
    assert results[port]["retval"] == TC_ACT_REDIRECT and delta(port) == {"deliver_port": 1}
    assert bytes.fromhex(results[port]["data"])[14:] == forwarded  # untouched: the host already routed it
    assert results[own]["retval"] == TC_ACT_UNSPEC and delta(own) == {"deliver_pass_other": 1}
    assert results[unknown]["retval"] == TC_ACT_UNSPEC and delta(unknown) == {"deliver_no_endpoint": 1}
    assert results[other_mac]["retval"] == TC_ACT_UNSPEC and delta(other_mac) == {"deliver_mac_mismatch": 1}
    assert results[peer]["retval"] == TC_ACT_REDIRECT and delta(peer) == {"decap_ok": 1, "deliver_peer": 1}
    out = bytes.fromhex(results[peer]["data"])
    assert out[:12] == bytes.fromhex((ENDPOINT_MAC + BRIDGE_MAC).replace(":", ""))  # as the bridge would send it
    assert out[14:] == forwarded
    assert results[peer_unknown]["retval"] == TC_ACT_OK
    assert delta(peer_unknown) == {"decap_ok": 1, "deliver_no_endpoint": 1}

    # the inner source must be leased by the outer source: our own subnet and an outside network are not
    i = policy
    for prog_drop in (XDP_DROP, TC_ACT_SHOT):
        for _ in range(2):
            assert results[i]["retval"] == prog_drop and delta(i) == {"decap_foreign_source": 1}, i
            i += 1
    # fragments: untouched to the kernel (XDP_PASS / next tc filter), counted when from a member
    for passed in (XDP_PASS, TC_ACT_UNSPEC):
        for frame in (first_fragment, later_fragment):
            assert results[i]["retval"] == passed and delta(i) == {"decap_fragment": 1}, i
            assert bytes.fromhex(results[i]["data"]) == frame
            i += 1
    assert results[i]["retval"] == TC_ACT_UNSPEC and delta(i) == {"decap_pass_other": 1}
    i += 1
    for src in bad_sources:
        assert not (results[i]["sent"] or results[i]["icmp"]), (src, results[i])
        assert delta(i) == {"encap_icmp_bad_source": 1}, src
        i += 1
    assert not (results[i]["sent"] or results[i]["icmp"]) and delta(i) == {"encap_icmp_bad_source": 1}
    i += 1
    assert results[i]["icmp"] and delta(i) == {"encap_no_peer_icmp": 1}  # link-local
    i += 1
    # the rate limit: the bucket (nearly full) empties, then refills at one message per millisecond
    burst = results[i]
    replies, limited = delta(i).get("encap_no_peer_icmp", 0), delta(i).get("encap_icmp_rate_limited", 0)
    allowed = ICMP_BURST + ICMP_PER_MS * (burst["elapsed_ns"] // 1_000_000 + 1)
    print(f"ICMP burst: 200 packets in {burst['elapsed_ns'] / 1e6:.1f} ms, {replies} answered, {limited} suppressed")
    assert replies + limited == 200 and delta(i).keys() <= {"encap_no_peer_icmp", "encap_icmp_rate_limited"}
    assert ICMP_BURST - 10 <= replies <= allowed and burst["replies"] == replies
    i += 1
    # --udp-allow-foreign-source: flanneld's behaviour, any inner source from a member
    for passed in (XDP_PASS, TC_ACT_OK):
        assert results[i]["retval"] == passed and delta(i) == {"decap_ok": 1}, i
        assert bytes.fromhex(results[i]["data"]) == eth(with_ttl(foreign, 63))
        i += 1

    # encapsulation on the underlay's egress: the Ethernet header the kernel resolved is kept
    r = results[i]
    assert r["retval"] == TC_ACT_OK and delta(i) == {"encap_ok": 1}
    out = bytes.fromhex(r["data"])
    assert out[:14] == eth(echo)[:14] and len(out) == 14 + 28 + len(echo)
    outer, udph, inner = out[14:34], out[34:42], out[42:]
    assert inner == with_ttl(echo, 63) and csum(inner[:20]) == 0
    assert outer[12:16] == IPv4Address(OWN).packed and outer[16:20] == IPv4Address(PEER).packed
    assert csum(outer) == 0 and struct.unpack("!H", outer[2:4])[0] == 28 + len(echo)
    assert struct.unpack("!H", outer[6:8])[0] == 0x4000 and outer[9] == 17  # DF, UDP
    sport, dport, length, _check = struct.unpack("!HHHH", udph)
    assert sport >= 49152 and dport == PORT and length == 8 + len(echo)
    i += 1
    for reason, frame in (
        ("ul_pass_no_peer", eth(inner_echo(dst="10.60.9.9"))),
        ("ul_pass_other", eth(ipv4(OWN, PEER, 17, udp(53, b"dns?")))),
        ("ul_pass_other", eth(b"\x60" + bytes(39), proto=0x86DD)),
    ):
        assert results[i]["retval"] == TC_ACT_OK and delta(i) == {reason: 1}, i
        assert bytes.fromhex(results[i]["data"]) == frame  # untouched
        i += 1
    assert results[i]["retval"] == TC_ACT_SHOT and delta(i) == {"encap_ttl_expired": 1}

    # every reason but the helper-failure ones was exercised
    seen = {k for k, v in results[-1]["counters"].items() if v}
    assert seen == {r.label for r in Reason} - {"encap_error", "decap_error"}


if __name__ == "__main__" and "--harness" in sys.argv:
    _harness()
