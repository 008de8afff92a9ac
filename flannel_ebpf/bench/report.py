"""Benchmark results -> a Markdown table, a JSON file and a PNG chart.

Input is one result per backend (iperf3 TCP with 1 and 4 streams, small-packet UDP rate, round-trip
latency percentiles, CPU seconds per gigabit) and the run's metadata. Ratios are given against kernel vxlan
(what the eBPF udp path must beat) and against the userspace TUN udp path (flannel's classic udp, what it
replaces). Absolute numbers vary between machines; ratios within one run are what we compare.

Everything but `write_report` is pure. A backend that failed (or never ran) is shown with its error; a
missing or non-numeric value is shown as a dash; neither ever stops the report.

    python -m flannel_ebpf.bench.report results.json OUT_DIR
reads `{"metadata": {...}, "backends": [{...}, ...]}` and writes OUT_DIR/bench.{md,json,png}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

#: Every backend the benchmark runs, in the order the report shows them.
BACKENDS: tuple[str, ...] = (
    "udp-ebpf", "udp-ebpf-underlay", "udp-ebpf-xdp", "udp-ebpf-peer", "udp-tun", "vxlan", "host-gw", "none"
)  # fmt: skip
BACKEND_LABELS: dict[str, str] = {
    "udp-ebpf": "udp, eBPF (default flags)",
    "udp-ebpf-underlay": "udp, eBPF (--udp-encap underlay)",
    "udp-ebpf-xdp": "udp, eBPF (XDP decap)",
    "udp-ebpf-peer": "udp, eBPF (peer delivery: bypasses host netfilter)",
    "udp-tun": "udp, userspace TUN (flannel's classic)",
    "vxlan": "kernel vxlan",
    "host-gw": "host-gw (no encapsulation)",
    "none": "no overlay",
}
VXLAN, TUN = "vxlan", "udp-tun"
#: the error of a backend this run was not asked to measure (`--backends`): listed, but not as a failure
NOT_RUN = "not run"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    decimals: int


METRICS: tuple[Metric, ...] = (
    Metric("tcp1_gbps", "TCP, 1 stream", "Gbit/s", True, 2),
    Metric("tcp4_gbps", "TCP, 4 streams", "Gbit/s", True, 2),
    Metric("udp_small_pps", "UDP, small packets", "packets/s", True, 0),
    Metric("rtt_p50_ms", "RTT p50", "ms", False, 3),
    Metric("rtt_p99_ms", "RTT p99", "ms", False, 3),
    Metric("rtt_idle_p50_ms", "RTT p50, idle", "ms", False, 3),
    Metric("cpu_s_per_gbit", "CPU", "s/Gbit", False, 2),
)
METRIC_KEYS = tuple(m.key for m in METRICS)


@dataclass(frozen=True)
class BackendResult:
    """One backend's numbers; None where a measurement is missing. `error` set: the backend failed."""

    name: str
    tcp1_gbps: float | None = None
    tcp4_gbps: float | None = None
    udp_small_pps: float | None = None
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    rtt_idle_p50_ms: float | None = None  # pings far apart: the CPUs sleep between them (cold path)
    cpu_s_per_gbit: float | None = None
    error: str | None = None
    #: metric -> its value in each round (None where that round failed), for the metrics measured in
    #: more than one round; the field above holds their median
    rounds: dict[str, tuple[float | None, ...]] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> BackendResult:
        """Tolerant parse: unknown keys ignored, non-numbers (and NaN, infinities) become None."""
        values = {key: _number(data.get(key)) for key in METRIC_KEYS}
        error = data.get("error")
        raw_rounds = data.get("rounds")
        rounds = {
            key: tuple(_number(v) for v in raw_rounds[key])
            for key in METRIC_KEYS
            if isinstance(raw_rounds, Mapping) and isinstance(raw_rounds.get(key), list | tuple)
        }
        return cls(
            name=str(data.get("name", "?")), error=None if error in (None, "") else str(error), rounds=rounds, **values
        )

    def value(self, key: str) -> float | None:
        value: float | None = getattr(self, key)
        return value

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RunMetadata:
    kernel: str
    cpus: int | None
    date: str
    extra: dict[str, str] = field(default_factory=dict)  # e.g. underlay MTU, iperf3 version, durations

    @classmethod
    def current(cls, **extra: str) -> RunMetadata:
        """This machine, now (UTC)."""
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        return cls(kernel=platform.release(), cpus=os.cpu_count(), date=now.isoformat(), extra=dict(extra))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RunMetadata:
        known = {"kernel", "cpus", "date"}
        cpus = data.get("cpus")
        return cls(
            kernel=str(data.get("kernel", "?")),
            cpus=int(cpus) if isinstance(cpus, int | float) and not isinstance(cpus, bool) else None,
            date=str(data.get("date", "?")),
            extra={str(k): str(v) for k, v in data.items() if k not in known},
        )


@dataclass(frozen=True)
class ReportFiles:
    markdown: Path
    json: Path
    png: Path | None  # None when the chart could not be drawn (its error is in the log)


ResultsInput = Iterable[BackendResult | Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def normalize(results: ResultsInput) -> list[BackendResult]:
    """Results in the report's order, one per backend; a backend with no result shows as "not run".

    Accepts BackendResult objects, dicts with a "name", or a dict keyed by backend name.
    """
    if isinstance(results, Mapping):
        items: list[BackendResult | Mapping[str, Any]] = [
            {**dict(value), "name": name} if isinstance(value, Mapping) else {"name": name, "error": repr(value)}
            for name, value in results.items()
        ]
    else:
        items = list(results)
    by_name: dict[str, BackendResult] = {}
    for item in items:
        if isinstance(item, BackendResult):
            result = item
        elif isinstance(item, Mapping):
            result = BackendResult.from_mapping(item)
        else:
            result = BackendResult(name="?", error=f"unreadable result: {item!r}")
        by_name[result.name] = result
    ordered = [by_name.pop(name, BackendResult(name=name, error=NOT_RUN)) for name in BACKENDS]
    return ordered + list(by_name.values())  # backends this module does not know, after the known ones


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def ratios(results: list[BackendResult], baseline: str) -> dict[str, dict[str, float | None]]:
    """backend -> metric -> value / baseline's value (None when either is missing or failed)."""
    base = next((r for r in results if r.name == baseline and r.ok), None)
    table: dict[str, dict[str, float | None]] = {}
    for r in results:
        table[r.name] = {
            key: ratio(r.value(key), base.value(key)) if (r.ok and base is not None) else None for key in METRIC_KEYS
        }
    return table


def ratio_spread(results: list[BackendResult], baseline: str, name: str, key: str) -> tuple[float, float] | None:
    """The lowest and highest ratio of one round's value to the baseline's value in the same round, over
    the rounds where both were measured (None with fewer than two such rounds): a ratio whose spread
    crosses 1x is no signal."""
    base = next((r for r in results if r.name == baseline and r.ok), None)
    this = next((r for r in results if r.name == name and r.ok), None)
    if base is None or this is None:
        return None
    pairs = zip(this.rounds.get(key, ()), base.rounds.get(key, ()), strict=False)
    per_round = [q for q in (ratio(v, b) for v, b in pairs) if q is not None]
    return (min(per_round), max(per_round)) if len(per_round) > 1 else None


# -- Markdown --


def _cell(value: float | None, decimals: int) -> str:
    if value is None:
        return "—"
    return f"{value:,.{decimals}f}"


def _ratio_cell(value: float | None, spread: tuple[float, float] | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")


def _escape(text: str) -> str:
    """One Markdown table cell: no pipes, no line breaks, bounded length."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= 200 else flat[:197] + "..."


def _label(name: str) -> str:
    return BACKEND_LABELS.get(name, name)


def render_markdown(results: ResultsInput, meta: RunMetadata) -> str:
    rows = normalize(results)
    lines = [
        "# flannel-ebpf benchmark",
        "",
        f"- kernel: {meta.kernel}",
        f"- CPUs: {meta.cpus if meta.cpus is not None else '?'}",
        f"- date: {meta.date}",
        *(f"- {key}: {value}" for key, value in sorted(meta.extra.items())),
        "",
        "Absolute numbers vary between machines; compare the ratios of one run.",
        "",
        "## Results",
        "",
        "| backend | " + " | ".join(f"{m.label} ({m.unit})" for m in METRICS) + " | status |",
        "|---|" + "---:|" * len(METRICS) + "---|",
    ]
    for r in rows:
        cells = [_cell(r.value(m.key), m.decimals) for m in METRICS]
        status = "ok" if r.ok else NOT_RUN if r.error == NOT_RUN else f"failed: {_escape(r.error or '')}"
        lines.append(f"| {_label(r.name)} | " + " | ".join(cells) + f" | {status} |")
    for baseline, title in ((VXLAN, "kernel vxlan"), (TUN, "the userspace TUN udp path (udp-tun)")):
        table = ratios(rows, baseline)
        lines += ["", f"## Relative to {title}", ""]
        if not any(r.name == baseline and r.ok for r in rows):
            lines.append(f"No ratios: {baseline} has no result in this run.")
            continue
        lines += [
            "| backend | " + " | ".join(m.label for m in METRICS) + " |",
            "|---|" + "---:|" * len(METRICS),
        ]
        for r in rows:
            cells = [_ratio_cell(table[r.name][m.key], ratio_spread(rows, baseline, r.name, m.key)) for m in METRICS]
            lines.append(f"| {_label(r.name)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are backend / baseline: above 1x is better for throughput and packet rate, below 1x is better "
        "for latency and CPU per gigabit. In brackets, for metrics measured in several rounds: the lowest and "
        "highest ratio of one round (both backends measured in the same round); the ratio shown is that of the "
        "medians.",
        "",
    ]
    return "\n".join(lines)


# -- JSON --


def report_json(results: ResultsInput, meta: RunMetadata) -> dict[str, Any]:
    rows = normalize(results)
    return {
        "schema": SCHEMA_VERSION,
        "metadata": {"kernel": meta.kernel, "cpus": meta.cpus, "date": meta.date, **meta.extra},
        "metrics": [asdict(m) for m in METRICS],
        "backends": [asdict(r) for r in rows],
        "ratios": {"vs_vxlan": ratios(rows, VXLAN), "vs_udp_tun": ratios(rows, TUN)},
        "ratio_spreads": {
            f"vs_{baseline.replace('-', '_')}": {
                r.name: {key: ratio_spread(rows, baseline, r.name, key) for key in METRIC_KEYS if r.rounds.get(key)}
                for r in rows
            }
            for baseline in (VXLAN, TUN)
        },
    }


# -- PNG --


def render_chart(results: ResultsInput, meta: RunMetadata, path: Path) -> Path:
    """One horizontal bar panel per metric; failed backends are labelled instead of drawn."""
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = normalize(results)
    names = [r.name for r in rows]
    fig = Figure(figsize=(20, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(2, (len(METRICS) + 1) // 2, sharey=True).flatten()
    for unused in grid[len(METRICS) :]:
        unused.set_visible(False)
    axes = grid[: len(METRICS)]
    colours = {
        "udp-ebpf": "#2a9d8f",
        "udp-ebpf-underlay": "#264653",
        "udp-ebpf-xdp": "#52b788",
        "udp-ebpf-peer": "#95d5b2",
        "udp-tun": "#e76f51",
        "vxlan": "#457b9d",
    }
    for ax, metric in zip(axes, METRICS, strict=True):
        values = [r.value(metric.key) if r.ok else None for r in rows]
        present = [v for v in values if v is not None]
        top = max(present) if present else 1.0
        positions = range(len(rows))
        ax.barh(
            list(positions),
            [v or 0.0 for v in values],
            color=[colours.get(n, "#8d99ae") for n in names],
        )
        for y, (r, v) in enumerate(zip(rows, values, strict=True)):
            text = _cell(v, metric.decimals) if v is not None else ("failed" if not r.ok else "—")
            ax.text(
                (v or 0.0) + top * 0.01,
                y,
                text,
                va="center",
                fontsize=8,
                color="#c1121f" if not r.ok else "black",
            )
        ax.set_yticks(list(positions), labels=names)
        if metric.key == "udp_small_pps":
            ax.ticklabel_format(axis="x", style="plain")
        ax.set_xlim(0, top * 1.25)
        better = "higher is better" if metric.higher_is_better else "lower is better"
        ax.set_title(f"{metric.label} ({metric.unit}), {better}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # the y axis is shared: once puts the first backend on top in every panel
    fig.suptitle(f"flannel-ebpf benchmark — kernel {meta.kernel}, {meta.cpus or '?'} CPUs, {meta.date}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# -- files --


def write_report(
    results: ResultsInput, meta: RunMetadata, out_dir: str | os.PathLike[str], stem: str = "bench"
) -> ReportFiles:
    """Write <out_dir>/<stem>.md, .json and .png. A chart that cannot be drawn does not stop the rest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = normalize(results)
    markdown = out / f"{stem}.md"
    markdown.write_text(render_markdown(rows, meta))
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(report_json(rows, meta), indent=2) + "\n")
    chart = out / f"{stem}.png"
    png: Path | None = chart
    try:
        render_chart(rows, meta, chart)
    except Exception as e:  # matplotlib missing or broken: the table and JSON still matter
        logger.error("benchmark chart not drawn: {}", e)
        png = None
    return ReportFiles(markdown=markdown, json=json_path, png=png)


def load_results(path: str | os.PathLike[str]) -> tuple[list[BackendResult], RunMetadata]:
    """Read `{"metadata": {...}, "backends": [...] or {name: {...}}}` (e.g. what the bench runner saved)."""
    data = json.loads(Path(path).read_text())
    meta_raw = data.get("metadata")
    meta = RunMetadata.from_mapping(meta_raw) if isinstance(meta_raw, Mapping) else RunMetadata.current()
    return normalize(data.get("backends") or []), meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render benchmark results as Markdown, JSON and PNG")
    parser.add_argument("results", help="JSON with metadata and per-backend results")
    parser.add_argument("out_dir")
    parser.add_argument("--stem", default="bench")
    args = parser.parse_args(argv)
    rows, meta = load_results(args.results)
    files = write_report(rows, meta, args.out_dir, args.stem)
    print(files.markdown.read_text())
    print(f"written: {files.markdown} {files.json} {files.png or '(no chart)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
