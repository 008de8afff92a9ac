"""`flannel-ebpf status` for a person: a short aligned summary (ready or why not, lease and TTL, backend and
data path, peers, the top drop reasons with rates), and its machine form (`summary` in `status --json`).

The summary's keys (stable; docs/OPERATIONS.md, "Metrics and status"): ready, health, running, phase, reason,
subnet, network, lease_ttl_seconds, backend, datapath, peers, peers_refused, loop_stall_max_ms, rates_window_seconds,
throughput, drops, counters_error. `throughput` and `drops` come from the eBPF counters (empty for the kernel backends):
{"<reason>": {"packets": total, "per_second": rate over the window (null without a window)}}.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flannel_ebpf import state as state_file

#: counted reasons shown as throughput (the others that pass are not traffic a person watches)
THROUGHPUT = ("encap_ok", "decap_ok", "deliver_port", "deliver_peer")
TOP_DROPS = 5


def read_counters(st: state_file.AgentState) -> dict[str, int] | None:
    """The eBPF counters (packets per reason) now, from the pinned map; None without the eBPF path."""
    maps = (st.backend_status or {}).get("maps")
    pin_dir = maps.get("pin_dir") if isinstance(maps, dict) else None
    if not pin_dir:
        return None
    from flannel_ebpf.metrics import _read_counters

    counters = _read_counters(str(pin_dir))
    return None if counters is None else {reason.label: packets for reason, (packets, _) in counters.items()}


def counters_unreadable(st: state_file.AgentState) -> str:
    """Why the eBPF counters of a running eBPF path cannot be read from here ("" when they can, or when
    there is no eBPF path): e.g. bpffs hidden by `ip netns exec`."""
    maps = (st.backend_status or {}).get("maps")
    pin_dir = maps.get("pin_dir") if isinstance(maps, dict) else None
    if not pin_dir or read_counters(st) is not None:
        return ""
    from flannel_ebpf.datapath.maps import bpffs_missing

    return bpffs_missing(str(pin_dir)) or f"the counters map under {pin_dir} cannot be read (programs unloaded?)"


def summary(
    st: state_file.AgentState,
    health: tuple[bool, str],
    before: dict[str, int] | None = None,
    after: dict[str, int] | None = None,
    window: float = 0.0,
) -> dict[str, Any]:
    """The summary of one network: `before`/`after` are counter readings `window` seconds apart (rates)."""
    from flannel_ebpf.datapath import layout

    status = st.backend_status or {}
    expires = (st.lease or {}).get("expiration")
    from flannel_ebpf.metrics import MANAGER_REFUSAL_KINDS, refusal_kind

    # the lease manager's refusals (whatever the backend), then the backend's own as of its last heartbeat
    refused: dict[str, int] = {MANAGER_REFUSAL_KINDS.get(r, "other"): n for r, n in st.peers_refused.items()}

    for table in ("refused", "skipped"):
        entries = status.get(table)
        if isinstance(entries, dict):
            for refusal in entries.values():
                kind = refusal_kind(str(refusal.get("reason", "")) if isinstance(refusal, dict) else str(refusal))
                refused[kind] = refused.get(kind, 0) + 1
    if status.get("peers_refused_map_full"):
        refused["map_full"] = int(status["peers_refused_map_full"])
    counts = after if after is not None else before
    drop_labels = {r.label for r in layout.Reason if r not in layout.PASS_REASONS}

    def entry(label: str) -> dict[str, Any]:
        rate = None
        if before is not None and after is not None and window > 0:
            rate = round(max(0, after.get(label, 0) - before.get(label, 0)) / window, 1)
        return {"packets": (counts or {}).get(label, 0), "per_second": rate}

    drops = sorted((label for label in drop_labels if (counts or {}).get(label)), key=lambda k: -(counts or {})[k])
    ready, line = health
    return {
        "ready": ready,
        "health": line,
        "running": state_file.agent_gone(st) is None,
        "phase": st.phase,
        "reason": st.reason,
        "subnet": st.subnet,
        "network": st.network,
        "lease_ttl_seconds": None if not expires else round(expires - time.time()),
        "backend": st.backend_type,
        "datapath": {k: status.get(k) for k in ("datapath", "decap", "delivery", "loader") if status.get(k)},
        "peers": len(st.peers),
        "peers_refused": refused,
        "loop_stall_max_ms": st.loop_stall_max_ms,
        "rates_window_seconds": window if after is not None else None,
        "throughput": {label: entry(label) for label in THROUGHPUT} if counts is not None else {},
        "drops": {label: entry(label) for label in drops[:TOP_DROPS]},
        "counters_error": counters_unreadable(st) if counts is None else "",
    }


def _ttl(seconds: int | None) -> str:
    if seconds is None:
        return "no expiry (reservation)"
    if seconds >= 3600:
        return f"TTL {seconds / 3600:.1f} h"
    return f"TTL {seconds // 60} min {seconds % 60} s"


def _rate(entry: dict[str, Any]) -> str:
    return "" if entry["per_second"] is None else f"{entry['per_second']:>10.1f}/s"


def format_summary(doc: dict[str, Any]) -> str:
    """The aligned lines a person reads."""
    rows: list[tuple[str, str]] = [("state", doc["health"])]
    if not doc["running"]:
        rows.append(("agent", "NOT running"))
    if doc["subnet"]:
        rows.append(("lease", f"{doc['subnet']}  {_ttl(doc['lease_ttl_seconds'])}  (network {doc['network']})"))
    if doc["backend"]:
        path = doc["datapath"]
        detail = ", ".join(f"{k} {v}" for k, v in path.items() if k != "datapath")
        rows.append(("backend", f"{doc['backend']}  data path {path.get('datapath', 'kernel')}"
                                + (f" ({detail})" if detail else "")))  # fmt: skip
    refused = ", ".join(f"{n} {kind}" for kind, n in sorted(doc["peers_refused"].items()))
    rows.append(("peers", f"{doc['peers']}" + (f"  (refused: {refused})" if refused else "")))
    rows.append(("event loop", f"longest stall {doc['loop_stall_max_ms']:.0f} ms"))
    for label, entry in doc["throughput"].items():
        if entry["packets"] or label in ("encap_ok", "decap_ok"):
            rows.append(("traffic" if not any(r[0] == "traffic" for r in rows) else "",
                         f"{label:<22} {entry['packets']:>12} pkts {_rate(entry)}"))  # fmt: skip
    if doc.get("counters_error"):
        rows.append(("traffic", f"unknown: {doc['counters_error']}"))
    if doc["throughput"]:
        if doc["drops"]:
            for i, (label, entry) in enumerate(doc["drops"].items()):
                rows.append(("top drops" if i == 0 else "", f"{label:<22} {entry['packets']:>12} pkts {_rate(entry)}"))
        else:
            rows.append(("top drops", "none"))
    return "\n".join(f"{key:<11} {value}".rstrip() for key, value in rows)


def watch(
    render: Callable[[float], str], interval: float, count: int | None, out: Callable[[str], None] = print
) -> int:
    """Redraw `render(window)` every `interval` seconds in place (Ctrl-C ends it; `count` draws at most)."""
    drawn = 0
    try:
        while count is None or drawn < count:
            text = render(interval)
            out("\x1b[H\x1b[2J" + text + f"\n\n(every {interval:g} s; Ctrl-C to end)")
            drawn += 1
    except KeyboardInterrupt:
        pass
    return 0
