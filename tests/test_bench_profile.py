"""The perf profile's parsing and per-skb arithmetic: pure, no root, on perf script output recorded on this
machine's kind (`perf script -F comm,pid,tid,cpu,time,period,event,ip,sym,dso`, call chains shortened)."""

from __future__ import annotations

import json

import pytest

from flannel_ebpf.bench.profile import (
    Aggregate,
    BackendProfile,
    Frame,
    aggregate,
    backend_profile,
    caller_chain,
    compare,
    cpu_mhz,
    cycles_per_unit,
    parse_perf_script,
    render_markdown,
    report_json,
    skbs_in_window,
    symbol_name,
    totals,
)

IPERF_CLIENT, IPERF_SERVER = 4101, 4117
PIDS = frozenset({IPERF_CLIENT, IPERF_SERVER})

# Seven samples of 250,000 ns (cpu-clock at 4 kHz): the client in the tc encap program, the client copying
# from user space, the server's user space, ksoftirqd forwarding (net_rx_action on the chain), the idle
# task, the idle task running network softirq, and another helper's python (left out).
RECORDED = """\
iperf3  4101/4101  [000] 15042.118201:     250000 cpu-clock:ppp:
\tffffffff8153caf2 trie_lookup_elem ([kernel.kallsyms])
\tffffffffc003253e bpf_prog_847cda7f07de3642_flannel_encap (bpf_prog_847cda7f07de3642_flannel_encap)
\tffffffff81f485a7 cls_bpf_classify ([kernel.kallsyms])
\tffffffff81ea23f1 tc_run ([kernel.kallsyms])
\tffffffff81eadcda __dev_queue_xmit ([kernel.kallsyms])

iperf3  4101/4101  [000] 15042.118451:     250000 cpu-clock:ppp:
\tffffffff81e8a0c1 _copy_from_iter ([kernel.kallsyms])
\tffffffff8201f3b2 tcp_sendmsg_locked ([kernel.kallsyms])
\tffffffff8201f9d0 tcp_sendmsg ([kernel.kallsyms])
\t          10ad6a __libc_send (/usr/lib/x86_64-linux-gnu/libc.so.6)

iperf3  4117/4117  [001] 15042.118460:     250000 cpu-clock:ppp:
\t            4feedb [unknown] (/usr/bin/iperf3)

ksoftirqd/1    23/23    [001] 15042.118710:     250000 cpu-clock:ppp:
\tffffffff8153caf2 fib_table_lookup ([kernel.kallsyms])
\tffffffff8204dc01 ip_route_input_slow ([kernel.kallsyms])
\tffffffff8204dc01 ip_rcv ([kernel.kallsyms])
\tffffffff81eb1bfe net_rx_action ([kernel.kallsyms])
\tffffffff81369c4d handle_softirqs ([kernel.kallsyms])

swapper     0/0     [000] 15042.118720:     250000 cpu-clock:ppp:
\tffffffff8224379b pv_native_safe_halt ([kernel.kallsyms])
\tffffffff822452b5 default_idle ([kernel.kallsyms])
\tffffffff813d09d6 do_idle ([kernel.kallsyms])

swapper     0/0     [001] 15042.118960:     250000 cpu-clock:ppp:
\tffffffff8153caf2 fib_table_lookup ([kernel.kallsyms])
\tffffffff82051965 ip_route_output_key_hash_rcu ([kernel.kallsyms])
\tffffffff81eb1bfe net_rx_action ([kernel.kallsyms])

Web Content  9001/9005  [001] 15042.119201:     250000 cpu-clock:ppp:
\t            51f241 _PyObject_FastCallDictTstate (/usr/bin/python3.11)
"""

MHZ = 2000.0  # 2 cycles per nanosecond: 250,000 ns = 500,000 cycles
PER_SAMPLE = 500_000.0


def test_parse_reads_every_sample_with_its_header_and_call_chain_leaf_first() -> None:
    samples = list(parse_perf_script(RECORDED.splitlines(keepends=True)))
    assert [s.pid for s in samples] == [4101, 4101, 4117, 23, 0, 0, 9001]
    first = samples[0]
    assert (first.comm, first.tid, first.cpu, first.period, first.event) == ("iperf3", 4101, 0, 250000, "cpu-clock")
    assert first.time == pytest.approx(15042.118201)
    assert first.frames[0] == Frame("trie_lookup_elem", "[kernel.kallsyms]")
    assert first.frames[-1].symbol == "__dev_queue_xmit"
    assert samples[-1].comm == "Web Content"  # a comm with a space
    assert samples[-1].tid == 9005


def test_parse_without_trailing_blank_line_and_with_noise_keeps_samples() -> None:
    # perf ends each header with a space and pads the comm on the left in some layouts; a stray line is skipped
    text = "junk that is no header\n   " + RECORDED.rstrip("\n").replace("cpu-clock:ppp:", "cpu-clock:ppp: ")
    samples = list(parse_perf_script(text.splitlines()))
    assert len(samples) == 7
    assert samples[-1].leaf == "_PyObject_FastCallDictTstate [python3.11]"


def test_symbol_names_drop_the_ebpf_tag_and_name_user_space_binaries() -> None:
    tagged = "bpf_prog_847cda7f07de3642_flannel_encap"
    assert symbol_name(Frame(tagged, tagged)) == "bpf_prog_flannel_encap [eBPF]"
    assert symbol_name(Frame("fib_table_lookup", "[kernel.kallsyms]")) == "fib_table_lookup"
    assert symbol_name(Frame("[unknown]", "/usr/bin/iperf3")) == "[unknown] [iperf3]"


def test_clock_events_turn_nanoseconds_into_cycles_and_cycles_stay() -> None:
    assert cycles_per_unit("cycles", 0) == 1.0
    assert cycles_per_unit("cpu-clock", 2596.096) == pytest.approx(2.596096)
    with pytest.raises(ValueError):
        cycles_per_unit("cpu-clock", 0)
    with pytest.raises(ValueError):
        cycles_per_unit("page-faults", 2000)
    assert cpu_mhz("processor\t: 0\ncpu MHz\t\t: 2596.096\ncpu MHz\t\t: 1.0\n") == 2596.096
    assert cpu_mhz("no clock here") == 0.0


def recorded_aggregate() -> Aggregate:
    return aggregate(parse_perf_script(RECORDED.splitlines()), PIDS, MHZ)


def test_aggregate_counts_iperf3_and_network_softirq_and_leaves_out_the_rest() -> None:
    agg = recorded_aggregate()
    assert agg.counted_samples == 5  # 3 iperf3, ksoftirqd in net_rx_action, swapper in net_rx_action
    assert agg.excluded_samples == 2  # the idle halt and the other helper's python
    assert agg.cycles == {
        "trie_lookup_elem": PER_SAMPLE,
        "_copy_from_iter": PER_SAMPLE,
        "[unknown] [iperf3]": PER_SAMPLE,
        "fib_table_lookup": 2 * PER_SAMPLE,
    }
    assert agg.excluded_cycles == 2 * PER_SAMPLE
    assert agg.idle_cycles == PER_SAMPLE
    assert agg.in_iperf3_cycles == 3 * PER_SAMPLE
    assert agg.inclusive["net_rx_action"] == 2 * PER_SAMPLE
    assert agg.inclusive["bpf_prog_flannel_encap [eBPF]"] == PER_SAMPLE
    assert agg.callers["fib_table_lookup"] == {
        "ip_route_input_slow": PER_SAMPLE,
        "ip_route_output_key_hash_rcu": PER_SAMPLE,
    }
    assert agg.event == "cpu-clock"
    assert agg.span == pytest.approx(15042.119201 - 15042.118201)
    # CPU 0: three samples, one of them the idle halt; CPU 1: four, the idle task's one in softirq (busy).
    assert agg.cpu_cycles == {0: 3 * PER_SAMPLE, 1: 4 * PER_SAMPLE}
    assert agg.cpu_idle_cycles == {0: PER_SAMPLE, 1: 0.0}


def test_skbs_in_window_scales_the_counted_rate_to_perfs_span() -> None:
    assert skbs_in_window(10_000, wall_seconds=2.0, span_seconds=1.5) == pytest.approx(7_500)
    assert skbs_in_window(10_000, wall_seconds=2.0, span_seconds=2.5) == pytest.approx(10_000)  # never more
    with pytest.raises(ValueError):
        skbs_in_window(0, 2.0, 1.5)
    with pytest.raises(ValueError):
        skbs_in_window(100, 0.0, 1.5)


def test_backend_profile_divides_cycles_by_the_skbs_of_the_window() -> None:
    agg = recorded_aggregate()
    # 1,000 skbs counted over 0.002 s of wall time, perf's samples span 0.001 s: 500 skbs in the window.
    prof = backend_profile(
        "udp-ebpf", agg, packets=1_000, tx_bytes=48_000_000, wall_seconds=0.002, gbps=20, cpu_mhz=MHZ
    )
    assert prof.skbs == pytest.approx(500)
    assert prof.bytes_per_skb == 48_000
    assert prof.cycles_per_skb["fib_table_lookup"] == pytest.approx(2 * PER_SAMPLE / 500)
    assert prof.total == pytest.approx(5 * PER_SAMPLE / 500)
    assert prof.inclusive_per_skb["tc_run"] == pytest.approx(PER_SAMPLE / 500)
    assert prof.main_caller["fib_table_lookup"][1] == pytest.approx(0.5)
    assert prof.excluded_share == pytest.approx(2 / 7)
    assert prof.idle_share == pytest.approx(1 / 7)
    assert prof.softirq_elsewhere_share == pytest.approx(2 / 5)
    assert prof.cycles_per_unit == 2.0
    assert prof.cpu_busy == {0: pytest.approx(2 / 3), 1: 1.0}


def test_caller_chain_follows_the_most_frequent_caller_up_the_stack() -> None:
    agg = recorded_aggregate()
    assert agg.callers["ip_route_input_slow"] == {"ip_rcv": PER_SAMPLE}  # not only leaves have callers
    prof = backend_profile("udp-ebpf", agg, packets=1_000, tx_bytes=1, wall_seconds=0.002, gbps=1, cpu_mhz=MHZ)
    chain = caller_chain(prof, "trie_lookup_elem", depth=3)
    assert chain == "bpf_prog_flannel_encap [eBPF] 100% < cls_bpf_classify 100% < tc_run 100%"
    assert caller_chain(prof, "fib_table_lookup", depth=1) in (
        "ip_route_input_slow 50%",
        "ip_route_output_key_hash_rcu 50%",
    )
    assert caller_chain(prof, "handle_softirqs", depth=3) == ""  # the top of its stack


def make(name: str, per_skb: dict[str, float], bytes_per_skb: float = 50_000) -> BackendProfile:
    return BackendProfile(
        name, 20.0, 1000.0, bytes_per_skb, 6.5, "cpu-clock", 2.6, per_skb, dict(per_skb), {}, 0.4, 0.3, 0.1
    )


SIDE_BY_SIDE = [
    make("host-gw", {"fib_table_lookup": 1000, "br_dev_xmit": 800, "_copy_to_iter": 5000, "[unknown] [iperf3]": 100}),
    make(
        "udp-ebpf", {"fib_table_lookup": 2500, "skb_do_redirect": 1200, "_copy_to_iter": 5100, "bpf_prog_x [eBPF]": 40}
    ),
    make("vxlan", {"fib_table_lookup": 1800, "_copy_to_iter": 7000}),
]


def test_compare_orders_by_the_difference_to_host_gw_with_zeros_where_absent() -> None:
    rows = compare(SIDE_BY_SIDE, top=4)
    assert [r.symbol for r in rows] == ["fib_table_lookup", "skb_do_redirect", "br_dev_xmit", "[unknown] [iperf3]"]
    assert rows[0].difference == 1500
    assert rows[2].difference == -800
    assert rows[2].values == {"host-gw": 800, "udp-ebpf": 0.0, "vxlan": 0.0}


def test_totals_split_kernel_ebpf_and_user_space() -> None:
    rows = {r.symbol: r for r in totals(SIDE_BY_SIDE)}
    total = rows["**all counted** (cycles/skb)"]
    assert total.values == {"host-gw": 6900, "udp-ebpf": 8840, "vxlan": 8800}
    assert total.difference == 1940
    assert rows["of which eBPF programs"].values["udp-ebpf"] == 40
    assert rows["user space (iperf3)"].values == {"host-gw": 100, "udp-ebpf": 0, "vxlan": 0}
    assert rows["kernel, eBPF included"].values["host-gw"] == 6800
    assert rows["all counted, cycles per KiB sent"].values["host-gw"] == pytest.approx(6900 / 50_000 * 1024)


def test_markdown_puts_host_gw_first_and_shows_a_failed_backend() -> None:
    failed = BackendProfile.failed("vxlan", "agents not ready")
    text = render_markdown([SIDE_BY_SIDE[1], SIDE_BY_SIDE[0], failed], {"kernel": "6.18"})
    header = next(line for line in text.splitlines() if line.startswith("| function"))
    assert header.split(" | ")[1:3] == ["host-gw", "udp eBPF"]
    assert "difference (udp eBPF - host-gw)" in header
    assert "| fib_table_lookup | 1,000 | 2,500 | +1,500 |" in text
    assert "| vxlan | failed: agents not ready |" in text
    assert "| stage, with its callees (cycles per skb) |" in text
    assert "| backend | TCP 1 stream (Gbit/s) |" in text
    assert "| backend | TCP 4 streams (Gbit/s) |" in render_markdown(SIDE_BY_SIDE, {}, streams=4)
    payload = json.loads(json.dumps(report_json([SIDE_BY_SIDE[0], failed], {"kernel": "6.18"})))
    assert payload["backends"][1]["error"] == "agents not ready"
    assert payload["backends"][0]["cycles_per_skb"]["br_dev_xmit"] == 800
