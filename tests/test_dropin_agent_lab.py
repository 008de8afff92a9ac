"""flanneld drop-in behaviour of the real agent in a namespace lab with a real etcd (started with
`--enable-v2`, as etcd 3.4/3.5 allow): /healthz and /readyz over real HTTP, the hint for a network config
written with etcd's v2 API (and its copy command, run as printed), and --net-config-path.

One lab (one host, alloc backend: no data path to wait for) for the whole module.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator

import pytest

from tests.helpers import wait_for

pytestmark = pytest.mark.lab

PREFIX = "/coreos.com/network"
CONFIG = {"Network": "10.8.0.0/16", "Backend": {"Type": "alloc"}}
HEALTHZ = ["--healthz-ip", "127.0.0.1", "--healthz-port", "8471"]

FETCH = """
import json, sys, urllib.error, urllib.request
out = {}
for path in sys.argv[1:]:
    try:
        with urllib.request.urlopen("http://127.0.0.1:8471" + path, timeout=5) as r:
            out[path] = [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        out[path] = [e.code, e.read().decode()]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def lab() -> Iterator:
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (make setup)")
    from flannel_ebpf.lab.lab import Lab

    the_lab = Lab(1).up()
    try:
        the_lab.enable_etcd_v2()
        yield the_lab
    finally:
        for name, agent in the_lab.agents.items():
            if agent.ever_started:
                print(f"\n---- agent log of {name} (tail) ----\n{agent.log_tail()}")
        the_lab.close()


def http(lab, *paths: str) -> dict[str, list]:
    """GET each path of the agent's health endpoint from inside its host: {path: [status, body]}."""
    out = lab.exec("h1", ["/usr/bin/python3", "-c", FETCH, *paths]).stdout
    return json.loads(out)


def test_healthz_is_liveness_readyz_says_why_and_the_v2_config_hint(lab):
    # The config written the old tutorials' way: etcd's v2 API, which flannel-ebpf (like flanneld
    # v0.20.2) never reads.
    endpoint = lab.etcd_endpoint
    lab.exec("h1", ["env", "ETCDCTL_API=2", "etcdctl", f"--endpoints={endpoint}", "set", f"{PREFIX}/config",
                    json.dumps(CONFIG)])  # fmt: skip
    assert lab.etcd_get(f"{PREFIX}/config") is None  # not in v3

    agent = lab.start_agent("h1", HEALTHZ)
    wait_for(lambda: "etcd's v2 store" in agent.health().stdout, timeout=20, what="the v2 hint in health")
    health = agent.health()
    assert health.returncode == 1 and health.stdout.startswith("not-ready waiting-config: no network config at")

    answers = http(lab, "/healthz", "/readyz", "/metrics", "/healthz/x")
    # flanneld's /healthz: the process runs, whatever else is true
    assert answers["/healthz"] == [200, "flanneld is running"]
    status, body = answers["/readyz"]
    assert status == 503 and body.startswith("not-ready waiting-config: ") and "etcd's v2 store" in body
    assert answers["/metrics"][0] == 200 and "flannel_ebpf_ready" in answers["/metrics"][1]  # flannel-ebpf's own
    assert answers["/healthz/x"][0] == 404

    hints = [line for line in lab.agent_log("h1").splitlines() if "etcd's v2 store" in line]
    assert len(hints) == 1 and "WARNING" in hints[0], hints  # said once
    command = re.search(r"copy it with: (.*)$", hints[0]).group(1)
    assert command == (
        f"ETCDCTL_API=2 etcdctl --endpoints={endpoint} get {PREFIX}/config | "
        f"ETCDCTL_API=3 etcdctl --endpoints={endpoint} put {PREFIX}/config"
    )

    # Run the command exactly as the agent printed it: the agent proceeds to ready.
    lab.exec("h1", ["sh", "-c", command])
    ready = lab.wait_ready("h1", 30)
    assert ready.startswith("ready eth0 subnet:10.8.")
    answers = http(lab, "/healthz", "/readyz")
    assert answers["/healthz"] == [200, "flanneld is running"]
    assert answers["/readyz"] == [200, ready + "\n"]
    assert lab.stop_agent("h1") == 0
    assert lab.agent_down("h1").ok


def test_net_config_path_reads_the_config_from_a_file(lab):
    lab.etcd_delete(f"{PREFIX}/config")  # only the file has a config now
    path = lab.host("h1").dir / "net-conf.json"
    path.write_text(json.dumps({"Network": "10.9.0.0/16", "Backend": {"Type": "ALLOC"}}))
    lab.start_agent("h1", ["-net-config-path", str(path)])  # Go's spelling, as flanneld's unit files have it
    lab.wait_ready("h1", 30)
    assert str(lab.subnet_env("h1").subnet).startswith("10.9.")
    leases = lab.leases()  # the lease is in etcd, as always
    assert len(leases) == 1 and next(iter(leases)).startswith("10.9.")
    assert "network config from" in lab.agent_log("h1", last_run=True)
    assert lab.stop_agent("h1") == 0
    assert lab.agent_down("h1", ["--release-lease"]).ok


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read the network config file {path}: No such file or directory"),
        ("{not json", "invalid network config in {path}: "),
        ('{"Network": "10.9.0.0/16", "SubnetLen": 31}', "invalid network config in {path}: SubnetLen must be /30"),
    ],
)
def test_a_bad_net_config_file_is_one_line_and_exit_1(lab, content, says):
    path = lab.host("h1").dir / "bad-net-conf.json"
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_text(content)
    agent = lab.start_agent("h1", ["--net-config-path", str(path)])
    wait_for(lambda: not agent.running, timeout=20, what="the agent's exit")
    assert agent.proc.returncode == 1
    log = lab.agent_log("h1", last_run=True)
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and says.format(path=path) in errors[0], log
    assert "Traceback" not in log


def test_the_not_ready_reason_follows_an_etcd_outage_while_waiting_for_the_config(lab):
    lab.exec("h1", ["env", "ETCDCTL_API=2", "etcdctl", f"--endpoints={lab.etcd_endpoint}", "rm", f"{PREFIX}/config"])
    lab.etcd_delete(f"{PREFIX}/config")
    agent = lab.start_agent("h1", HEALTHZ)
    missing = f"not-ready waiting-config: no network config at {PREFIX}/config"
    wait_for(lambda: agent.health().stdout.strip() == missing, timeout=20, what="waiting for the config")
    lab.stop_etcd()
    try:
        wait_for(lambda: "etcd unavailable" in http(lab, "/readyz")["/readyz"][1], timeout=20, what="the outage")
        assert http(lab, "/healthz")["/healthz"] == [200, "flanneld is running"]  # alive all along
    finally:
        lab.start_etcd()
    wait_for(lambda: agent.health().stdout.strip() == missing, timeout=20, what="back to the missing config")
    assert lab.stop_agent("h1") == 0
