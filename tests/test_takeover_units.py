"""Pure pieces of the takeover: reading link deletions off rtnetlink, and `down --keep-datapath`'s flag."""

from __future__ import annotations

import struct

from flannel_ebpf.backends.udp.device_guard import deleted_links
from flannel_ebpf.cli import HANDED_BACK, parse_argv

RTM_NEWLINK, RTM_DELLINK, IFLA_MTU, IFLA_IFNAME = 16, 17, 4, 3


def rta(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def link_message(kind: int, name: str) -> bytes:
    body = struct.pack("=BxHiII", 0, 0, 7, 0, 0) + rta(IFLA_MTU, struct.pack("=I", 1472))
    body += rta(IFLA_IFNAME, name.encode() + b"\0")
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_deleted_links_names_only_the_deleted_devices():
    data = link_message(RTM_NEWLINK, "docker0") + link_message(RTM_DELLINK, "flannel0")
    assert deleted_links(data) == {"flannel0"}
    assert deleted_links(link_message(RTM_NEWLINK, "flannel0")) == set()


def test_deleted_links_survives_truncated_and_garbage_datagrams():
    whole = link_message(RTM_DELLINK, "flannel0")
    for cut in range(len(whole)):
        deleted_links(whole[:cut])  # never raises
    assert deleted_links(b"") == set()
    assert deleted_links(struct.pack("=IHHII", 2, RTM_DELLINK, 0, 0, 0)) == set()  # a length below the header
    bad_attr = struct.pack("=IHHII", 16 + 16 + 4, RTM_DELLINK, 0, 0, 0) + b"\0" * 16 + struct.pack("=HH", 0, 3)
    assert deleted_links(bad_attr) == set()  # an attribute of length 0 ends the walk


def test_down_keep_datapath_flag_and_what_it_keeps():
    assert parse_argv(["down", "--keep-datapath"]).keep_datapath is True
    assert parse_argv(["down"]).keep_datapath is False
    # flanneld adopts these as they are; udp's eBPF path is not flanneld's
    assert set(HANDED_BACK) == {"vxlan", "host-gw"}
