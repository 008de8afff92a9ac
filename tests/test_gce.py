"""The gce backend against `GceStandIn` (tests/gce_standin.py), a stand-in for the GCE metadata server
and the Compute API's routes, operations, networks and instances resources (no GCE emulator exists), and
the stand-in checked against the Compute v1 discovery document that google-api-python-client ships, so
that it cannot drift from the published API. The data path cannot be tested here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, ip_network
from pathlib import Path
from typing import Any

import pytest

from flannel_ebpf.backends import make_backend
from flannel_ebpf.backends.base import BackendError, BackendNotReady
from flannel_ebpf.backends.cloud.common import MetadataUnreachable
from flannel_ebpf.backends.gce import GceBackend, route_name
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from tests.cloud_standins import silent_listener
from tests.gce_standin import GceStandIn

NETWORK = ip_network("10.5.0.0/16")


def discovery_document() -> dict[str, Any]:
    import googleapiclient

    path = Path(googleapiclient.__file__).parent / "discovery_cache" / "documents" / "compute.v1.json"
    return json.loads(path.read_text())


@pytest.fixture
def gce(monkeypatch: pytest.MonkeyPatch) -> Iterator[GceStandIn]:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    standin = GceStandIn(instances={f"host-{i}": {"networkIP": f"10.128.0.{i + 2}"} for i in range(4)}).start()
    try:
        yield standin  # type: ignore[misc]
    finally:
        standin.close()


def ext(i: int) -> ExternalInterface:
    address = IPv4Address(f"10.128.0.{i + 2}")
    return ExternalInterface("ens4", 2, address, address, 1460)


def lease(i: int) -> Lease:
    return Lease(ip_network(f"10.5.{i + 1}.0/24"), LeaseAttrs(public_ip=ext(i).address))  # type: ignore[arg-type]


def agent(gce: GceStandIn, i: int) -> GceBackend:
    backend = GceBackend(
        {"Type": "gce"}, BackendOptions(), metadata_root=gce.metadata_root(f"host-{i}"),
        compute_endpoint=f"{gce.url}/compute/v1/",
    )  # fmt: skip
    attrs = backend.prepare(ext(i))
    assert attrs.to_json() == f'{{"PublicIP":"{ext(i).address}","PublicIPv6":null}}'  # flannel's gce lease
    backend.start(LocalNetwork(NETWORK, lease(i).subnet, ext(i), 1460))  # type: ignore[arg-type]
    return backend


def next_hops(gce: GceStandIn) -> dict[str, str]:
    return {name: r.get("nextHopInstance", "").rsplit("/", 1)[-1] for name, r in gce.routes.items()}


def test_route_names_as_flannel() -> None:
    assert route_name("10.5.34.0/24") == "flannel-10-5-34-0-24"
    assert route_name(ip_network("172.16.0.0/28")) == "flannel-172-16-0-0-28"
    from flannel_ebpf.config import parse_config

    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "GCE"}}')
    assert cfg.backend_type == "gce" and isinstance(make_backend("gce", cfg.backend, BackendOptions()), GceBackend)


def test_three_hosts_routes_and_removal(gce: GceStandIn) -> None:
    # other owners: a route that is not flannel's, and a flannel route outside our Network
    gce.routes["default-route-x"] = {
        "name": "default-route-x",
        "destRange": "0.0.0.0/0",
        "network": gce.link("global/networks/default"),
        "nextHopGateway": gce.link("global/gateways/default-internet-gateway"),
    }
    gce.routes["flannel-10-99-1-0-24"] = {
        "name": "flannel-10-99-1-0-24",
        "destRange": "10.99.1.0/24",
        "network": gce.link("global/networks/default"),
        "nextHopInstance": gce.link("zones/us-central1-a/instances/gone"),
    }
    # a stale route of a deleted instance, inside the Network: cleaned
    gce.routes["flannel-10-5-77-0-24"] = {
        "name": "flannel-10-5-77-0-24",
        "destRange": "10.5.77.0/24",
        "network": gce.link("global/networks/default"),
        "nextHopInstance": gce.link("zones/us-central1-a/instances/deleted-host"),
    }
    # host 0's future subnet routed elsewhere: replaced
    gce.routes["flannel-10-5-1-0-24"] = {
        "name": "flannel-10-5-1-0-24",
        "destRange": "10.5.1.0/24",
        "network": gce.link("global/networks/default"),
        "nextHopInstance": gce.link("zones/us-central1-a/instances/host-3"),
    }

    backends = [agent(gce, i) for i in range(3)]
    leases = [lease(i) for i in range(3)]
    for i, backend in enumerate(backends):
        backend.sync([leases[j] for j in range(3) if j != i])
    hops = next_hops(gce)
    assert {n: hops[n] for n in ("flannel-10-5-1-0-24", "flannel-10-5-2-0-24", "flannel-10-5-3-0-24")} == {
        "flannel-10-5-1-0-24": "host-0", "flannel-10-5-2-0-24": "host-1", "flannel-10-5-3-0-24": "host-2"}  # fmt: skip
    assert "flannel-10-5-77-0-24" not in hops
    assert "default-route-x" in hops and "flannel-10-99-1-0-24" in hops  # other owners: untouched
    body = gce.bodies[-1]
    assert body == {
        "name": "flannel-10-5-3-0-24", "destRange": "10.5.3.0/24", "network": gce.link("global/networks/default"),
        "nextHopInstance": gce.link("zones/us-central1-a/instances/host-2"), "priority": 1000, "tags": [],
    }  # fmt: skip
    # every insert and delete was waited for: each operation was polled until DONE
    assert gce.operations and all(op["status"] == "DONE" for op in gce.operations.values())

    inserts = len(gce.bodies)
    backends[1].sync([leases[0], leases[2]])  # resync: nothing to do
    assert len(gce.bodies) == inserts
    del gce.routes["flannel-10-5-2-0-24"]
    backends[1].sync([leases[0], leases[2]])  # restores a deleted own route
    assert next_hops(gce)["flannel-10-5-2-0-24"] == "host-1"

    backends[0].remove_peer(leases[2])
    backends[1].remove_peer(leases[2])
    assert "flannel-10-5-3-0-24" not in gce.routes
    # re-pointed by someone else: theirs now, left alone
    gce.routes["flannel-10-5-3-0-24"] = {
        "name": "flannel-10-5-3-0-24",
        "destRange": "10.5.3.0/24",
        "network": gce.link("global/networks/default"),
        "nextHopInstance": gce.link("zones/us-central1-a/instances/host-1"),
    }
    backends[0].remove_peer(leases[2])
    assert "flannel-10-5-3-0-24" in gce.routes
    backends[0].remove_peer(leases[0])  # our own subnet: never removed by a peer event
    assert next_hops(gce)["flannel-10-5-1-0-24"] == "host-0"
    backends[0].teardown(backends[0].local)
    assert "flannel-10-5-1-0-24" not in gce.routes and "flannel-10-5-2-0-24" in gce.routes
    assert backends[1].status()["own_route"] == "flannel-10-5-2-0-24"


def test_route_quota_not_ready(gce: GceStandIn) -> None:
    gce.route_quota = 3
    for i in range(3):
        gce.routes[f"other-{i}"] = {
            "name": f"other-{i}",
            "destRange": f"172.16.{i}.0/24",
            "network": gce.link("global/networks/default"),
            "nextHopIp": "10.128.0.9",
        }
    backend = agent(gce, 0)
    with pytest.raises(BackendNotReady) as raised:
        backend.sync([])
    message = str(raised.value)
    assert "\n" not in message and "route quota" in message and "QUOTA_EXCEEDED" in message
    assert backend.status()["problem"] == message
    del gce.routes["other-0"]
    backend.sync([])
    assert next_hops(gce)["flannel-10-5-1-0-24"] == "host-0" and backend.status()["problem"] == ""


def test_bad_credentials_one_line(gce: GceStandIn) -> None:
    gce.api_token = "the-api-wants-another-token"  # the metadata server's token is refused by the API
    backend = GceBackend({}, BackendOptions(), metadata_root=gce.metadata_root("host-0"),
                         compute_endpoint=f"{gce.url}/compute/v1/")  # fmt: skip
    with pytest.raises(BackendError) as raised:
        backend.prepare(ext(0))
    assert "\n" not in str(raised.value) and "HTTP 401" in str(raised.value), raised.value
    # GOOGLE_APPLICATION_CREDENTIALS naming a broken file: one line
    import os

    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = "/nonexistent/key.json"
    try:
        with pytest.raises(BackendError, match="GOOGLE_APPLICATION_CREDENTIALS") as raised:
            backend.prepare(ext(0))
        assert "\n" not in str(raised.value)
    finally:
        del os.environ["GOOGLE_APPLICATION_CREDENTIALS"]


def test_not_in_gce_says_so_quickly() -> None:
    sock, silent = silent_listener()
    try:
        for root in (silent, "http://127.0.0.1:1"):
            backend = GceBackend({}, BackendOptions(), metadata_root=root, compute_endpoint="http://127.0.0.1:1/")
            began = time.monotonic()
            with pytest.raises(MetadataUnreachable) as raised:
                backend.prepare(ext(0))
            assert time.monotonic() - began < 5
            assert "\n" not in str(raised.value) and "GCE instance metadata service" in str(raised.value)
    finally:
        sock.close()


def test_standin_follows_the_discovery_document(gce: GceStandIn) -> None:
    """Every request the backend made to the stand-in is a method of the published Compute v1 API, with
    that method's HTTP verb and path; inserted routes use only the Route schema's fields."""
    doc = discovery_document()
    assert doc["rootUrl"] == "https://compute.googleapis.com/" and doc["servicePath"] == "compute/v1/"
    methods = []
    for resource in ("routes", "globalOperations", "networks", "instances"):
        for name, m in doc["resources"][resource]["methods"].items():
            pattern = re.sub(r"\{[^}]+\}", "[^/]+", m["flatPath"])
            methods.append((f"{resource}.{name}", m["httpMethod"], re.compile(pattern)))
    backends = [agent(gce, i) for i in range(2)]
    backends[0].sync([lease(1)])
    backends[1].sync([lease(0)])
    backends[0].remove_peer(lease(1))
    used = set()
    for verb, path in gce.requests:
        if path.startswith("/host/"):
            continue  # the metadata server
        api_path = path.split("?", 1)[0].removeprefix("/compute/v1/")
        match = [name for name, v, p in methods if v == verb and p.fullmatch(api_path)]
        assert match, f"{verb} {path} is no Compute v1 method"
        used.add(match[0])
    assert {"routes.get", "routes.insert", "routes.delete", "routes.list", "globalOperations.get", "networks.get",
            "instances.get"} <= used  # fmt: skip
    route_fields = set(doc["schemas"]["Route"]["properties"])
    for body in gce.bodies:
        assert set(body) <= route_fields
    # the list filter's field and the operation fields the backend reads are the API's
    assert "filter" in doc["resources"]["routes"]["methods"]["list"]["parameters"]
    assert {"status", "error", "name"} <= set(doc["schemas"]["Operation"]["properties"])
    assert "DONE" in doc["schemas"]["Operation"]["properties"]["status"]["enum"]
    assert (
        "NEXT_HOP_INSTANCE_NOT_FOUND"
        in doc["schemas"]["Route"]["properties"]["warnings"]["items"]["properties"]["code"]["enum"]
    )
