"""Telling that a pin directory is not on a bpffs in this mount namespace (as under `ip netns exec`), from
/proc/self/mountinfo text: pure parsing, no lab."""

from __future__ import annotations

from pathlib import Path

from flannel_ebpf.datapath.maps import bpffs_missing, mount_of

HOST = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
24 23 0:22 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:8 - bpf bpf rw,mode=700
25 22 0:23 / /tmp/with\\040space rw - tmpfs tmpfs rw
"""
# `ip netns exec`: a fresh sysfs mounted over /sys hides the bpffs below it (mountinfo lists it later)
NETNS_EXEC = HOST + "310 23 0:60 / /sys rw,relatime - sysfs ns1 rw\n"


def test_the_bpffs_mount_holds_the_pin_dir_on_the_host() -> None:
    assert mount_of("/sys/fs/bpf/flannel-ebpf", HOST) == ("/sys/fs/bpf", "bpf")
    assert mount_of("/sys/fs/bpf", HOST) == ("/sys/fs/bpf", "bpf")
    assert mount_of("/sys/fs/bpfx", HOST) == ("/sys", "sysfs")  # a prefix of the name is not the mount
    assert mount_of("/tmp/with space/pins", HOST) == ("/tmp/with space", "tmpfs")  # \\040 unescaped


def test_under_ip_netns_exec_the_last_sysfs_mount_on_sys_wins() -> None:
    assert mount_of("/sys/fs/bpf/flannel-ebpf", NETNS_EXEC) == ("/sys", "sysfs")


def test_bpffs_missing_names_the_cause_and_what_to_do(tmp_path: Path) -> None:
    host, netns = tmp_path / "host", tmp_path / "netns"
    host.write_text(HOST)
    netns.write_text(NETNS_EXEC)
    assert bpffs_missing("/sys/fs/bpf/flannel-ebpf", str(host)) is None
    why = bpffs_missing("/sys/fs/bpf/flannel-ebpf", str(netns))
    assert why is not None and why.startswith("bpffs is not mounted here (/sys/fs/bpf/flannel-ebpf is on sysfs")
    assert "outside `ip netns exec`" in why and "mount bpffs" in why
    assert bpffs_missing("/sys/fs/bpf/flannel-ebpf", str(tmp_path / "absent")) is None  # cannot tell: no claim
