"""Small helpers shared by the lab tests."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from flannel_ebpf.datapath import bpfsys, layout

_LOG_TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")


def backends_from_env(variable: str, default: str = "udp") -> list[str]:
    """The backends a long lab test runs on: `make test` keeps CI's time bounded with the default, the
    comma-separated variable adds more."""
    return [b for b in os.environ.get(variable, default).split(",") if b]


def close_pipes(proc: subprocess.Popen[Any]) -> None:
    """Close an ended child's pipes: each is an open file of the test process until collected."""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def wait_for(predicate: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll until `predicate()` is true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_delivery_settled(lab: Any, hosts: Sequence[str] | None = None) -> None:
    """Until each eBPF udp agent (of `hosts`, default all) has hooked its container bridge (or found that
    this kernel needs no hook). Adding a clsact qdisc to a device that carries traffic drops one packet in
    the kernel: loss tests must measure the agent, not that."""
    for host in lab.host_names if hosts is None else hosts:
        wait_for(
            lambda host=host: any(
                line in lab.agent_log(host, last_run=True)
                for line in ("hand-off attached", "no bridge hand-off needed")
            ),
            what=f"the container bridge of {host} hooked",
        )


def logged_at(lab: Any, host: str, needle: str) -> float | None:
    """time.time() of the agent's last run's first log line containing `needle` (the agent logs local
    time, to the millisecond)."""
    for line in lab.agent_log(host, last_run=True).splitlines():
        m = _LOG_TIME_RE.match(line)
        if m and needle in line:
            return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return None


def rx_bytes_per_packet(lab: Any, container: Any, traffic: Callable[[], object]) -> float:
    """Bytes per packet received on a container's eth0 while `traffic()` runs: ~1.4 KB when the host
    segmented TCP before handing it over, tens of KB when GSO skbs arrive whole."""

    def counters() -> tuple[int, int]:
        stats = "/sys/class/net/eth0/statistics"
        out = lab.exec(container, ["cat", f"{stats}/rx_bytes", f"{stats}/rx_packets"]).stdout.split()
        return int(out[0]), int(out[1])

    bytes0, packets0 = counters()
    traffic()
    bytes1, packets1 = counters()
    return (bytes1 - bytes0) / max(1, packets1 - packets0)


def pinned_map_ids(lab: Any, host: str) -> dict[str, int]:
    """The kernel ids of the maps pinned for `host` (the lab's agents pin in this machine's bpffs): the
    same ids after a restart mean the maps were adopted, not re-created."""
    ids = {}
    for spec in layout.ALL_MAPS:
        fd = bpfsys.obj_get(layout.pin_path(lab.pin_dir(host), spec))
        try:
            ids[spec.name] = bpfsys.map_info(fd).map_id
        finally:
            os.close(fd)
    return ids
