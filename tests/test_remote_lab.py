"""Client/server mode in a namespace lab: a `--listen` server on h1 is the only process that talks to
etcd; clients (`--remote`) on h2 and h3 have no path to etcd at all (a DROP rule in their namespaces) and
run the same data path as in etcd mode. Mutual TLS, systemd socket activation, and a server restart under a
ping flood while a new host joins through etcd; a host that tries to write another host's lease is refused."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from flannel_ebpf.lab.agent import Agent, cli_command, cli_env
from flannel_ebpf.lab.netns import stop_process
from flannel_ebpf.lab.traffic import FloodCounter
from tests.helpers import wait_for
from tests.test_remote_identity import assert_untouched, etcd_record, make_pki

pytestmark = pytest.mark.lab

UDP = {"Network": "10.9.0.0/16", "Backend": {"Type": "udp"}}
VXLAN = {"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan"}}
PORT = 8888


def cut_from_etcd(lab, host: str) -> None:
    """No packet from this host's namespace reaches etcd's address; prove it with etcdctl."""
    etcd_ip = urlparse(lab.etcd_endpoint).hostname
    lab.exec(host, ["iptables", "-w", "-I", "OUTPUT", "-d", etcd_ip, "-j", "DROP"])
    probe = lab.exec(host, ["etcdctl", "--endpoints", lab.etcd_endpoint, "--dial-timeout", "1s",
                            "--command-timeout", "1s", "endpoint", "health"], check=False, timeout=15)  # fmt: skip
    assert not probe.ok, probe.stdout


class Server:
    """`flannel-ebpf up --listen` in a host's namespace, logging to a file of its own."""

    def __init__(self, lab, host: str, args: list[str]) -> None:
        h = lab.host(host)
        self.host = dataclasses.replace(h, dir=h.dir / "server")
        self.agent = Agent(self.host, lab.etcd_endpoint, lab.pin_dir(host) / "server")
        self.args = args
        self.log = self.host.agent_log

    def start(self) -> None:
        self.agent.start(self.args)
        self.wait_serving()

    def wait_serving(self) -> None:
        runs = self.log.read_text().count("==== ")
        wait_for(lambda: self.log.read_text().count("serving flannel's remote API") >= runs, timeout=20,
                 what="the server listening")  # fmt: skip

    def stop(self) -> int | None:
        return self.agent.stop()


def health(lab, host: str) -> str:
    return lab.agent(host).health().stdout.strip()


def test_udp_clients_without_etcd_mutual_tls_and_server_restart_under_flood(lab_factory):
    lab = lab_factory(3, network_config=UDP)
    h1_ip = str(lab.host("h1").underlay_ip)
    pki = lab.dir / "pki"
    make_pki(pki, h1_ip, {host: f"IP:{lab.host(host).underlay_ip}" for host in ("h2", "h3")})
    for host in ("h2", "h3"):
        cut_from_etcd(lab, host)
    tls = ["--remote-cafile", str(pki / "ca.crt")]
    server = Server(lab, "h1", ["--listen", f"{h1_ip}:{PORT}", *tls, "--remote-certfile", str(pki / "server.crt"),
                                "--remote-keyfile", str(pki / "server.key")])  # fmt: skip
    server.start()
    try:
        # A client with the CA but no certificate of its own is refused: never ready, no lease.
        lab.start_agent("h3", ["--remote", f"{h1_ip}:{PORT}", *tls])
        wait_for(lambda: "flannel server" in health(lab, "h3"), timeout=15, what="h3 refused")
        refused = health(lab, "h3")
        assert refused.startswith("not-ready waiting-config") and "--remote-certfile" in refused, refused
        assert lab.stop_agent("h3") == 0
        assert lab.leases() == {}

        for host in ("h2", "h3"):  # each with a certificate for its own address
            cert = ["--remote-certfile", str(pki / f"{host}.crt"), "--remote-keyfile", str(pki / f"{host}.key")]
            lab.start_agent(host, ["--remote", f"{h1_ip}:{PORT}", *tls, *cert])
        lab.wait_all_ready(30, hosts=["h2", "h3"])
        assert len(lab.leases()) == 2  # written by the server, in flanneld's form
        h2c, h3c = lab.add_container("h2"), lab.add_container("h3")
        matrix = lab.ping_matrix()
        assert matrix.all_ok, matrix.failures()
        for host in ("h2", "h3"):  # the bridge hand-off hooked: a flood measures the agent, not that
            wait_for(
                lambda host=host: (
                    "hand-off attached" in lab.agent_log(host, last_run=True)
                    or "no bridge hand-off needed" in lab.agent_log(host, last_run=True)
                ),
                what=f"{host} hooked",
            )

        # The server restarts under a flood between the clients; meanwhile h1 joins through etcd directly.
        flood = FloodCounter(lab.node(h2c), str(h3c.ip)).start()
        try:
            assert server.stop() == 0
            wait_for(lambda: health(lab, "h2").startswith("not-ready server-lost"), timeout=15,
                     what="h2 reporting the lost server")  # fmt: skip
            lab.start_agent("h1")
            lab.wait_ready("h1", 30)
            server.start()
            lab.wait_all_ready(20, hosts=["h2", "h3"])
        finally:
            result = flood.stop()
        print(f"server restart under flood: {result.sent} sent, {result.received} received")
        assert result.sent > 1000 and result.received == result.sent, result
        h1c = lab.add_container("h1")
        h1_subnet = lab.subnet_env("h1").subnet.network
        for host in ("h2", "h3"):
            log = lab.agent_log(host, last_run=True)
            # the watch resumed from its cursor: h1 arrived as an event, no second full listing was needed
            wait_for(lambda host=host: f"peer {h1_subnet}" in lab.agent_log(host, last_run=True), timeout=10,
                     what=f"{host} sees h1")  # fmt: skip
            log = lab.agent_log(host, last_run=True)
            assert log.count("listed ") == 1, log
        matrix = lab.ping_matrix(containers=[h1c, h2c, h3c])
        assert matrix.all_ok, matrix.failures()
    finally:
        server.stop()


def test_vxlan_clients_through_a_socket_activated_server(lab_factory):
    lab = lab_factory(3, network_config=VXLAN)
    h1 = lab.host("h1")
    for host in ("h2", "h3"):
        cut_from_etcd(lab, host)
    # systemd's socket activation: the listening socket is made by systemd-socket-activate and passed as fd 3
    env = cli_env()
    keep = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "HOME")
    log_dir = h1.dir / "server"
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = ["systemd-socket-activate", "-l", f"{h1.underlay_ip}:{PORT}",
            *(f"-E{k}={env[k]}" for k in keep if k in env), *cli_command(), "up", "--listen=fd://",
            "--etcd-endpoints", lab.etcd_endpoint]  # fmt: skip
    with open(log_dir / "agent.log", "ab") as log:
        proc = h1.popen(argv, stdout=log, stderr=log, env=env)
    try:
        # systemd-socket-activate starts the server on the first connection (a client's), as systemd would
        wait_for(lambda: "Listening on" in (log_dir / "agent.log").read_text(), what="the activation socket")
        client = ["--remote", f"{h1.underlay_ip}:{PORT}"]
        for host in ("h1", "h2", "h3"):  # a client on the server's own host too, as flanneld v0.5 ran it
            lab.start_agent(host, client)
        lab.wait_all_ready(30)
        assert "serving flannel's remote API on fd://" in (log_dir / "agent.log").read_text()
        for host in lab.host_names:
            lab.add_container(host)
        matrix = lab.ping_matrix()
        assert matrix.all_ok, matrix.failures()
        leases = lab.leases()
        assert len(leases) == 3 and all(v["BackendType"] == "vxlan" for v in leases.values()), leases
        assert "not-ready" not in health(lab, "h2")
    finally:
        stop_process(proc, 10, what="socket-activated server")


def curl(lab, host: str, method: str, url: str, body: dict | None = None, pki: Path | None = None) -> tuple[int, str]:
    """One request from `host`'s namespace, as flanneld v0.5's client sends it; (status, body)."""
    argv = ["curl", "-sS", "--max-time", "10", "-X", method, "-o", "-", "-w", "\n%{http_code}"]
    if pki is not None:
        argv += ["--cacert", str(pki / "ca.crt"), "--cert", str(pki / f"{host}.crt"), "--key", str(pki / f"{host}.key")]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
    out = lab.exec(host, [*argv, url]).stdout
    text, _, status = out.rpartition("\n")
    return int(status), text


def test_a_host_cannot_write_another_hosts_lease(lab_factory):
    """h3 holds a valid certificate, for its own address, and tries to take over, move and delete h2's
    lease: with mutual TLS (identity: the certificate's IP SANs) and then over plain HTTP (identity: the
    source address). Every write is refused with 403 and h2's etcd value and etcd lease stay exactly as they
    were; h2's own requests, as flanneld v0.5's client sends them, work."""
    lab = lab_factory(3, network_config=VXLAN)
    h1_ip, h2_ip, h3_ip = (str(lab.host(h).underlay_ip) for h in ("h1", "h2", "h3"))
    pki = lab.dir / "pki"
    make_pki(pki, h1_ip, {"h2": f"IP:{h2_ip}", "h3": f"IP:{h3_ip},DNS:h3.example"})
    tls = ["--remote-cafile", str(pki / "ca.crt"), "--remote-certfile", str(pki / "server.crt"),
           "--remote-keyfile", str(pki / "server.key")]  # fmt: skip

    def h2_attrs(mac: str = "aa:bb:cc:00:00:02") -> dict:
        return {"PublicIP": h2_ip, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}}

    def attack(base: str, lease: dict, pki: Path | None, identity: str) -> None:
        url = f"{base}/leases/{lease['Subnet'].replace('/', '-')}"
        stolen = h2_attrs(mac="aa:bb:cc:00:00:03")
        for method, target, body in (("POST", f"{base}/leases", stolen), ("POST", f"{base}/leases/", stolen),
                                     ("PUT", f"{url}?ttl=10", {**lease, "Attrs": stolen}),
                                     ("DELETE", f"{url}?PublicIP={h2_ip}", None)):  # fmt: skip
            status, text = curl(lab, "h3", method, target, body, pki)
            assert status == 403, (method, target, status, text)
            assert identity in text and f"PublicIP {h2_ip}" in text and text.count("\n") == 1, text

    server = Server(lab, "h1", ["--listen", f"{h1_ip}:{PORT}", *tls])
    server.start()
    try:
        base = f"https://{h1_ip}:{PORT}/v1/_"
        status, text = curl(lab, "h2", "POST", f"{base}/leases", h2_attrs(), pki)  # v0.5: no trailing slash
        assert status == 200, text
        lease = json.loads(text)
        key = f"{lab.etcd_prefix}/subnets/{lease['Subnet'].replace('/', '-')}"
        before = etcd_record(lab.etcd.ctl, key)
        assert before is not None and json.loads(before.value)["BackendData"]["VtepMAC"] == "aa:bb:cc:00:00:02"
        attack(base, lease, pki, f"certificate CN=h3 [{h3_ip}]")
        time.sleep(1.1)  # a moved or renewed etcd lease would show in its remaining TTL
        assert_untouched(before, etcd_record(lab.etcd.ctl, key))
        assert list(lab.leases()) == [lease["Subnet"].replace("/", "-")]
        assert server.log.read_text().count(f"may not write leases of PublicIP {h2_ip}") == 4
    finally:
        server.stop()

    server = Server(lab, "h1", ["--listen", f"{h1_ip}:{PORT}"])  # plain HTTP: the source address decides
    server.start()
    try:
        base = f"http://{h1_ip}:{PORT}/v1/_"
        attack(base, lease, None, f"source address [{h3_ip}]")
        time.sleep(1.1)
        assert_untouched(before, etcd_record(lab.etcd.ctl, key))
        status, text = curl(lab, "h3", "POST", f"{base}/leases", {**h2_attrs(), "PublicIP": h3_ip})
        assert status == 200 and json.loads(text)["Subnet"] != lease["Subnet"], text
        status, text = curl(lab, "h2", "PUT", f"{base}/leases/{lease['Subnet'].replace('/', '-')}", lease)
        assert status == 200, text  # h2 renews its own lease from its own address
    finally:
        server.stop()
