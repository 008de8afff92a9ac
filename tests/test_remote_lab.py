"""Client/server mode in a namespace lab: a `--listen` server on h1 is the only process that talks to
etcd; clients (`--remote`) on h2 and h3 have no path to etcd at all (a DROP rule in their namespaces) and
run the same data path as in etcd mode. Mutual TLS, systemd socket activation, and a server restart under a
ping flood while a new host joins through etcd."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from flannel_ebpf.lab.agent import Agent, cli_command, cli_env
from flannel_ebpf.lab.netns import stop_process
from flannel_ebpf.lab.traffic import FloodCounter
from tests.helpers import wait_for

pytestmark = pytest.mark.lab

UDP = {"Network": "10.9.0.0/16", "Backend": {"Type": "udp"}}
VXLAN = {"Network": "10.10.0.0/16", "Backend": {"Type": "vxlan"}}
PORT = 8888


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(d: Path, server_ip: str) -> None:
    """A CA, a server certificate for `server_ip` and a client certificate, all signed by the CA."""
    d.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    for name, ext in (("server", f"subjectAltName=IP:{server_ip}"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip


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
    make_pki(pki, h1_ip)
    for host in ("h2", "h3"):
        cut_from_etcd(lab, host)
    tls = ["--remote-cafile", str(pki / "ca.crt")]
    client_cert = ["--remote-certfile", str(pki / "client.crt"), "--remote-keyfile", str(pki / "client.key")]
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

        client = ["--remote", f"{h1_ip}:{PORT}", *tls, *client_cert]
        for host in ("h2", "h3"):
            lab.start_agent(host, client)
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
