"""Client/server mode across eras, in a namespace lab, with flannel's own flanneld v0.5.5 (built from its tag,
unchanged; `../shared/flanneld/`) on either side, over vxlan (a data path both have):

- flanneld v0.5.5 `-listen` on h1, on etcd's v2 API, serving flannel-ebpf clients (`up --remote`) on h2 and
  h3 and a flanneld v0.5.5 client (`-remote`) on h4;
- `flannel-ebpf up --listen` on h1 serving flanneld v0.5.5 clients on h2 and h3 and a flannel-ebpf client on
  h4.

Each once with the default network and once with two networks (blue: vxlan VNI 1, red: vxlan VNI 2), named by
the clients (`--networks blue,red --subnet-dir D`, v0.5.5's `-networks=blue,red -subnet-dir=D`): as in
v0.5, the server serves every network under the etcd prefix. The clients have no path to etcd (a DROP rule in
their namespaces). Every container answers every other of its network. Our server authorizes a plain-HTTP
write by its TCP source address: a v0.5.5 client's PublicIP (its `-iface` address) is that address.

A missing flanneld binary fails these tests (FlanneldMissing), it never skips them.
"""

from __future__ import annotations

import json

import pytest

from flannel_ebpf.lab.containers import SubnetEnv
from tests.helpers import wait_for
from tests.test_remote_lab import PORT, Server, cut_from_etcd

pytestmark = pytest.mark.lab

VERSION = "v0.5.5"
PREFIX = "/coreos.com/network"
SINGLE = {"Network": "10.41.0.0/16", "Backend": {"Type": "vxlan"}}
NETWORKS = {
    "blue": {"Network": "10.42.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}},
    "red": {"Network": "10.43.0.0/16", "Backend": {"Type": "vxlan", "VNI": 2}},
}
CLIENTS = ("h2", "h3", "h4")
LATE = "h5"  # joins once the others answer: every client learns of it from its watch through the server


def subnet_dir(lab, host: str):
    return lab.host(host).dir / "flannel-networks"


def start_client(lab, host: str, kind: str, remote: str, multi: bool) -> None:
    """A client of the server at `remote`: flannel-ebpf (`kind` "ebpf") or flanneld v0.5.5 ("v05")."""
    if kind == "ebpf":
        args = ["--remote", remote]
        if multi:
            args += ["--networks", ",".join(NETWORKS), "--subnet-dir", str(subnet_dir(lab, host))]
        lab.start_agent(host, args)
        return
    args = [f"-remote={remote}"]
    if multi:
        args += [f"-networks={','.join(NETWORKS)}", f"-subnet-dir={subnet_dir(lab, host)}"]
    # PublicIP: the -iface address, the one its connections to the server leave from (our server checks it)
    lab.start_flanneld(host, VERSION, args)


def start_clients(lab, remote: str, multi: bool, kinds: dict[str, str]) -> None:
    """Every client host (the late one too) cut from etcd, then the clients of `kinds` ({host: kind}) started
    in that order, and ready through the server."""
    for host in (*CLIENTS, LATE):
        cut_from_etcd(lab, host)
    for host, kind in kinds.items():
        start_client(lab, host, kind, remote, multi)
    wait_clients_ready(lab, kinds, multi)


def late_client_joins(lab, remote: str, multi: bool, kind: str, phase: str) -> None:
    """LATE joins as a `kind` client once the others answer: it gets its lease from the server, and every
    client learns of it through the server's watch."""
    start_client(lab, LATE, kind, remote, multi)
    wait_clients_ready(lab, {LATE: kind}, multi)
    check_leases(lab, multi, [*CLIENTS, LATE])
    add_containers_and_ping(lab, multi, f"{phase}, {LATE} joined", [*CLIENTS, LATE])


def agent_health(lab, host: str) -> dict[str, str]:
    out = lab.agent_cli(host, "health", "--state-dir", str(lab.host(host).state_dir)).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def wait_clients_ready(lab, kinds: dict[str, str], multi: bool) -> None:
    ebpf = [h for h, kind in kinds.items() if kind == "ebpf"]
    v05 = [h for h, kind in kinds.items() if kind == "v05"]
    if not multi:
        lab.wait_all_ready(60, hosts=[*ebpf, *v05])
        return
    for host in v05:
        lab.flanneld_of(host).wait_networks_ready(subnet_dir(lab, host), list(NETWORKS), 60)
    for host in ebpf:
        wait_for(lambda h=host: all(agent_health(lab, h).get(n, "").startswith("ready") for n in NETWORKS),
                 timeout=60, what=f"{host}: blue and red ready through the server")  # fmt: skip


def leases_by_network(lab, multi: bool) -> dict[str, dict[str, dict]]:
    names = list(NETWORKS) if multi else [""]
    found = {}
    for name in names:
        base = f"{PREFIX}/{name}/subnets/" if name else f"{PREFIX}/subnets/"
        found[name] = {k: json.loads(v) for k, v in lab.etcd_get_prefix(base).items()}
    return found


def check_leases(lab, multi: bool, clients: list[str]) -> None:
    """Each network has one lease per client, written by the server: the client's address as PublicIP,
    vxlan with its VTEP MAC."""
    client_ips = {str(lab.host(h).underlay_ip) for h in clients}
    for name, leases in leases_by_network(lab, multi).items():
        assert {v["PublicIP"] for v in leases.values()} == client_ips and len(leases) == len(clients), (name, leases)
        assert all(v["BackendType"] == "vxlan" and v["BackendData"]["VtepMAC"] for v in leases.values()), leases
    if multi:
        assert not lab.etcd_get_prefix(f"{PREFIX}/subnets/"), "nothing in the default network"


def add_containers_and_ping(lab, multi: bool, phase: str, clients: list[str]) -> None:
    """A container per client (per network), unless it has one; every container answers every other of
    its network."""
    have = {c.name for c in lab.containers}
    if not multi:
        for host in clients:
            if f"{host}c1" not in have:
                lab.add_container(host)
        containers = [lab.containers_of(h)[0] for h in clients]
        matrix = lab.ping_matrix(containers=containers, count=3, interval=0.2, timeout=2.0)
        print(f"\n{phase}:\n{matrix.format()}")
        assert matrix.all_ok, f"{phase}: {[str(r) for r in matrix.failures()]}\n{matrix.format()}"
        return
    for name, config in NETWORKS.items():
        containers = []
        for host in clients:
            env_file = subnet_dir(lab, host) / f"{name}.env"
            assert str(SubnetEnv.read(env_file).network) == config["Network"], env_file.read_text()
            if f"{host}{name[0]}" not in have:
                lab.add_container(host, f"{host}{name[0]}", f"br-{name}", env_file)
            containers.append(next(c for c in lab.containers if c.name == f"{host}{name[0]}"))
        matrix = lab.ping_matrix(containers=containers, count=3, interval=0.2, timeout=2.0)
        print(f"\n{phase}, {name}:\n{matrix.format()}")
        assert matrix.all_ok, f"{phase}, {name}: {[str(r) for r in matrix.failures()]}\n{matrix.format()}"


def configure(lab, multi: bool) -> None:
    if multi:
        for name, config in NETWORKS.items():
            lab.etcd_put(f"{PREFIX}/{name}/config", json.dumps(config))
    else:
        lab.etcd_put(f"{PREFIX}/config", json.dumps(SINGLE))


@pytest.mark.parametrize("multi", [False, True], ids=["one-network", "blue-and-red"])
def test_flannel_ebpf_and_v05_clients_of_a_flanneld_v05_server(lab_factory, multi):
    lab = lab_factory(5, etcd_api="v2")
    configure(lab, multi)
    remote = f"{lab.host('h1').underlay_ip}:{PORT}"
    server = lab.start_flanneld_server("h1", remote, VERSION)
    start_clients(lab, remote, multi, {"h2": "ebpf", "h3": "ebpf", "h4": "v05"})
    for host in ("h2", "h3"):  # the client knew the server for a v0.5 one and kept to its API
        assert f"flannel server http://{remote} is a flanneld v0.5" in lab.agent_log(host, last_run=True)
    check_leases(lab, multi, list(CLIENTS))
    add_containers_and_ping(lab, multi, f"flanneld {VERSION} server", list(CLIENTS))
    late_client_joins(lab, remote, multi, "v05", f"flanneld {VERSION} server")
    requests = server.log_text(last_run=True)
    for name in NETWORKS if multi else ["_"]:  # every network went through the v0.5.5 server
        assert f"POST /v1/{name}/leases" in requests, requests[-2000:]


@pytest.mark.parametrize("multi", [False, True], ids=["one-network", "blue-and-red"])
def test_v05_and_flannel_ebpf_clients_of_a_flannel_ebpf_server(lab_factory, multi):
    lab = lab_factory(5)
    configure(lab, multi)
    h1_ip = str(lab.host("h1").underlay_ip)
    server = Server(lab, "h1", ["--listen", f"{h1_ip}:{PORT}"])  # plain HTTP: the source address decides
    server.start()
    try:
        remote = f"{h1_ip}:{PORT}"
        start_clients(lab, remote, multi, {"h2": "v05", "h3": "v05", "h4": "ebpf"})
        assert f"flannel server http://{remote} is a flannel-ebpf server" in lab.agent_log("h4", last_run=True)
        check_leases(lab, multi, list(CLIENTS))
        add_containers_and_ping(lab, multi, "flannel-ebpf server", list(CLIENTS))
        late_client_joins(lab, remote, multi, "ebpf", "flannel-ebpf server")
        log = server.log.read_text()
        assert "may not write" not in log, log[-2000:]  # no client was refused its own lease
        for host in ("h2", "h3"):  # the v0.5.5 clients are still running and took no error from our server
            fd = lab.flanneld_of(host)
            assert fd.running, fd.log_tail()
            assert "Failed" not in fd.log_text(last_run=True), fd.log_tail()
    finally:
        server.stop()
