"""What the running kernel can do for the udp data path, asked once at load (never per packet).

- decap_l4_udp: does bpf_skb_adjust_room() know BPF_F_ADJ_ROOM_DECAP_L4_UDP? Then decapsulation
  clears the sender's tunnel GSO state itself, as a kernel tunnel does. Asked by running
  bpf/probe_decap.c on a crafted flannel packet with BPF_PROG_TEST_RUN (the flag reached bpf-next in
  2026-08: kernel 7.3 at the earliest).
- bridge_tunnel_gso: does a bridge pass encapsulated GSO skbs to its ports whole? Mainline 6.19 ("net:
  bridge: use common function to compute the features") gives a bridge its ports' encapsulation
  features; before that its hw_enc_features are SG | GSO_PARTIAL and it segments them in software.
  There is no cheap way to ask this of a bridge (the feature set is not exposed), so it is read from
  the kernel version.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from loguru import logger

from flannel_ebpf.datapath import bpfsys

#: the first mainline release whose bridge offers its ports' encapsulation features
BRIDGE_TUNNEL_GSO_SINCE = (6, 19)


@dataclass(frozen=True)
class KernelFeatures:
    kernel: str
    decap_l4_udp: bool
    bridge_tunnel_gso: bool

    @property
    def decap_leaves_tunnel_gso(self) -> bool:
        """Does a decapsulated skb still carry the sender's tunnel GSO state? (then a bridge before
        6.19 re-segments it, and the bridge-port hand-off is what keeps it whole)"""
        return not self.decap_l4_udp

    @property
    def bridge_handoff_needed(self) -> bool:
        return self.decap_leaves_tunnel_gso and not self.bridge_tunnel_gso

    def as_dict(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "decap_l4_udp": self.decap_l4_udp,
            "bridge_tunnel_gso": self.bridge_tunnel_gso,
            "bridge_handoff_needed": self.bridge_handoff_needed,
        }


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string such as 6.18.44-fc-v782."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _probe_packet() -> bytes:
    """[Ethernet][outer IPv4/UDP 8285][inner IPv4/UDP]: what flannel's decap sees."""
    inner = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), bytes(4)) + bytes(8)
    udp = struct.pack("!HHHH", 40000, 8285, 8 + len(inner), 0)
    outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(inner), 0, 0x4000, 64, 17, 0, bytes(4), bytes(4))
    eth = bytes(6) + bytes(6) + struct.pack("!H", 0x0800)
    return eth + outer + udp + inner


def probe_kernel(probe_decap_fd: int) -> KernelFeatures:
    """Probe with the loaded `flannel_probe_decap` program (its fd)."""
    release = os.uname().release
    try:
        decap_l4_udp = bpfsys.prog_test_run(probe_decap_fd, _probe_packet()).retval == 1
    except OSError as e:  # test runs refused (an LSM, say): assume the older kernel's behaviour
        logger.warning("cannot probe the kernel for BPF_F_ADJ_ROOM_DECAP_L4_UDP ({}): assuming it is absent", e)
        decap_l4_udp = False
    features = KernelFeatures(
        kernel=release,
        decap_l4_udp=decap_l4_udp,
        bridge_tunnel_gso=kernel_version(release) >= BRIDGE_TUNNEL_GSO_SINCE,
    )
    logger.info(
        "kernel {}: DECAP_L4_UDP {}, bridge passes tunnel GSO {}: bridge-port hand-off {}",
        release,
        "yes" if features.decap_l4_udp else "no",
        "yes" if features.bridge_tunnel_gso else "no",
        "needed" if features.bridge_handoff_needed else "not needed",
    )
    return features
