"""A real Prometheus (Debian's) scrapes three lab agents' /metrics; the test asks it through its HTTP API.

Prometheus runs in the lab's etcd namespace (on the underlay, so it reaches the agents' health ports) with a
temporary config and data dir, is stopped by its PID at the end, and is queried from inside that namespace.
Checks: a count-bounded ping flood shows up in the receiving host's decap_ok counter, a hostile lease shows
up in the refused-peers metric, `promtool check metrics` passes a scrape, every query of the shipped Grafana
dashboard parses (promtool) and returns data, and the shipped alerting rules parse and are evaluated."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flannel_ebpf.lab.prometheus import Prometheus
from tests.helpers import wait_delivery_settled, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.bpf]

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "packaging" / "grafana-dashboard.json"
RULES = ROOT / "packaging" / "prometheus-rules.yml"
UDP = {"Network": "10.5.0.0/16", "Backend": {"Type": "udp"}}
PREFIX = "/coreos.com/network"
PORT = 9465
PINGS = 400

FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed (make setup installs Debian's prometheus)")
    return path


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in doc["panels"] for target in panel.get("targets", [])]


def test_dashboard_queries_and_alerting_rules_parse(tmp_path):
    queries = dashboard_queries()
    assert len(queries) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": q}
                                                         for i, q in enumerate(queries)]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    for checked in (path, RULES):
        result = subprocess.run([promtool(), "check", "rules", str(checked)], capture_output=True, text=True)
        assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_a_real_prometheus_scrapes_three_agents(lab_factory):
    lab = lab_factory(3, network_config=UDP)
    lab.start_agents(["--healthz-ip", "0.0.0.0", "--healthz-port", str(PORT), "--lease-check-interval", "1"])
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    wait_delivery_settled(lab)
    target = {name: f"{host.underlay_ip}:{PORT}" for name, host in lab.hosts.items()}

    # Prometheus' own linter on a real scrape (from inside h1's namespace)
    scrape = lab.exec("h1", ["python3", "-c", FETCH, f"http://{target['h1']}/metrics"]).stdout
    assert 'flannel_ebpf_datapath_packets_total{network="",reason="decap_ok",verdict="pass"}' in scrape
    lint = subprocess.run([promtool(), "check", "metrics"], input=scrape, capture_output=True, text=True)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint

    prom = Prometheus(lab.node("etcd"), list(target.values()), rule_files=[RULES])
    try:
        prom.start()
        wait_for(lambda: len(prom.query("up == 1")) == 3, timeout=30, what="Prometheus scraping all three agents")
        assert all(prom.value("flannel_ebpf_ready", instance=t) == 1 for t in target.values())
        assert prom.value("sum(flannel_ebpf_peers)") == 6  # each of 3 hosts follows the 2 others

        # A count-bounded flood h1's container -> h3's: h3 decapsulates every echo request it got.
        decap = 'flannel_ebpf_datapath_packets_total{reason="decap_ok"}'
        before = prom.value(decap, instance=target["h3"])
        assert before is not None
        h1c, _, h3c = lab.containers
        out = lab.exec(h1c, ["ping", "-q", "-f", "-c", str(PINGS), "-w", "30", str(h3c.ip)], check=False).stdout
        received = int(re.search(r"(\d+) received", out).group(1))
        assert received >= PINGS * 0.95, out
        wait_for(lambda: prom.value(decap, instance=target["h3"]) - before >= received, timeout=15,
                 what=f"h3's decap_ok rising by {received} in Prometheus")  # fmt: skip
        rose = prom.value(f"increase({decap}[5m])", instance=target["h3"])
        assert rose is not None and rose >= received * 0.9  # PromQL's extrapolation aside, the same rise

        # A hostile lease (a subnet outside the Network): every agent refuses it, and says so
        lab.etcd_put(f"{PREFIX}/subnets/10.99.0.0-24", json.dumps({"PublicIP": str(lab.hosts["h2"].underlay_ip)}))
        refused = 'flannel_ebpf_peers_refused{reason="outside_network"}'
        wait_for(lambda: all(prom.value(refused, instance=t) == 1 for t in target.values()), timeout=20,
                 what="the hostile lease in every agent's refused-peers metric")  # fmt: skip
        wait_for(lambda: any(a["labels"]["alertname"] == "FlannelEbpfPeersRefused"
                             for a in prom.api("/api/v1/alerts")["data"]["alerts"]), timeout=15,
                 what="the refused-peers alert pending")  # fmt: skip

        # The alerting rules: loaded, evaluated, healthy
        groups = prom.api("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == 5
        for rule in rules:
            assert rule["health"] == "ok" and not rule["lastEvaluation"].startswith("0001"), rule

        # Every query of the dashboard returns data from these agents
        for query in dashboard_queries():
            assert prom.query(query), f"no data for the dashboard query {query}"
    except BaseException:
        print(f"---- prometheus log ----\n{prom.log()[-3000:]}")
        raise
    finally:
        prom.stop()
    assert not prom.dir.exists()


def test_status_is_a_short_summary_with_rates_json_and_watch(lab_factory):
    lab = lab_factory(2, network_config=UDP)
    lab.start_agents()
    lab.wait_all_ready(60)
    for host in lab.host_names:
        lab.add_container(host)
    wait_delivery_settled(lab)
    h1c, h2c = lab.containers
    state_dir = str(lab.agent("h2").host.state_dir)
    lab.exec(h1c, ["ping", "-q", "-f", "-c", "200", "-w", "20", str(h2c.ip)], check=False)

    text = lab.agent_cli("h2", "status", "--state-dir", state_dir).stdout
    print(text)
    lines = text.splitlines()
    assert len(lines) <= 15
    assert lines[0].startswith("state       ready ")
    assert re.search(r"^lease       10\.5\.\d+\.0/24  TTL \d", text, re.M)
    assert re.search(r"^backend     udp  data path ebpf \(decap \w+, delivery port, loader \w+\)", text, re.M)
    assert re.search(r"^peers       1$", text, re.M)
    decap = re.search(r"decap_ok +(\d+) pkts +([\d.]+)/s", text)
    assert decap and int(decap.group(1)) >= 200  # the flood's echo requests, and a rate over one second
    assert re.search(r"^top drops   ", text, re.M)

    doc = lab.agent_status("h2")["summary"]
    assert {"ready", "health", "running", "phase", "reason", "subnet", "network", "lease_ttl_seconds", "backend",
            "datapath", "peers", "peers_refused", "loop_stall_max_ms", "rates_window_seconds", "throughput",
            "drops", "counters_error"} == set(doc)  # fmt: skip
    assert doc["ready"] is True and doc["peers"] == 1 and doc["datapath"]["datapath"] == "ebpf"
    assert doc["throughput"]["decap_ok"]["packets"] >= 200 and doc["lease_ttl_seconds"] > 3600

    watched = lab.agent_cli("h2", "status", "--state-dir", state_dir, "--watch", "--watch-count", "2", timeout=30)
    assert watched.returncode == 0 and watched.stdout.count("\x1b[H\x1b[2J") == 2, watched.stdout
    assert watched.stdout.count("state       ready") == 2 and "every 2 s; Ctrl-C to end" in watched.stdout
