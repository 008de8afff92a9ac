"""The aws-vpc backend against moto's EC2 server (`moto_server`, a real HTTP server process) and a
stand-in for the instance metadata service (moto has none): hosts' routes in the VPC route table, the
source/destination check, removals, terminated instances, other owners' routes, the 50-route limit, bad
credentials, and a host outside EC2. The data path (packets through a VPC) cannot be tested here.

Nothing reaches a real AWS endpoint: the credentials are fake, and the EC2 endpoint is set explicitly
(AWS_ENDPOINT_URL_EC2, the SDK's documented setting); each backend's client is checked to point at moto.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address, ip_network
from typing import Any

import boto3
import pytest

from flannel_ebpf.backends import make_backend
from flannel_ebpf.backends.awsvpc import AwsVpcBackend
from flannel_ebpf.backends.base import BackendError, BackendNotReady
from flannel_ebpf.backends.cloud.common import MetadataUnreachable
from flannel_ebpf.host.types import BackendOptions, ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs
from tests.cloud_standins import AwsMetadataStandIn, MotoServer, silent_listener

NETWORK = ip_network("10.5.0.0/16")
REGION = "us-east-1"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> MotoServer:
    """Fake credentials and moto as the EC2 endpoint; no shared config or credentials files."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SECURITY_TOKEN", "testing")  # the older name the SDKs still take
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # boto3's own IMDS use (instance role): off
    return moto


@dataclass
class Host:
    instance_id: str
    eni_id: str
    address: IPv4Address
    metadata: AwsMetadataStandIn


@dataclass
class Vpc:
    ec2: Any
    vpc_id: str
    subnet_id: str
    table_id: str
    hosts: list[Host]


def make_vpc(moto: MotoServer, hosts: int, cidr: str = "10.0.0.0/16", subnet: str = "10.0.1.0/24",
             addresses: list[str] | None = None) -> Vpc:  # fmt: skip
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto.url)
    vpc_id = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=subnet)["Subnet"]["SubnetId"]
    table_id = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table_id, SubnetId=subnet_id)
    made = []
    for i in range(hosts):
        extra = {"PrivateIpAddress": addresses[i]} if addresses else {}
        inst = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet_id, **extra)
        inst = inst["Instances"][0]
        eni = inst["NetworkInterfaces"][0]
        md = AwsMetadataStandIn(instance_id=inst["InstanceId"], mac=eni["MacAddress"], subnet_id=subnet_id,
                                eni_id=eni["NetworkInterfaceId"], vpc_id=vpc_id,
                                local_ipv4=eni["PrivateIpAddress"])  # fmt: skip
        made.append(Host(inst["InstanceId"], eni["NetworkInterfaceId"], ip_address(eni["PrivateIpAddress"]),
                         md.start()))  # type: ignore[arg-type]  # fmt: skip
    return Vpc(ec2, vpc_id, subnet_id, table_id, made)


@pytest.fixture
def vpc_factory(aws_env: MotoServer) -> Iterator[Any]:
    made: list[Vpc] = []

    def make(hosts: int = 3, **kw: Any) -> Vpc:
        vpc = make_vpc(aws_env, hosts, **kw)
        made.append(vpc)
        return vpc

    yield make
    for vpc in made:
        for host in vpc.hosts:
            host.metadata.close()


def ext_of(host: Host) -> ExternalInterface:
    return ExternalInterface("eth0", 2, host.address, host.address, 9001)


def lease(subnet: str, host: Host) -> Lease:
    return Lease(ip_network(subnet), LeaseAttrs(public_ip=host.address))  # type: ignore[arg-type]


def agent(host: Host, subnet: str, config: dict[str, Any] | None = None, moto_url: str = "") -> AwsVpcBackend:
    backend = AwsVpcBackend({"Type": "aws-vpc", **(config or {})}, BackendOptions(), imds_endpoint=host.metadata.url)
    attrs = backend.prepare(ext_of(host))
    # never anything but the local moto server
    assert backend.ec2.meta.endpoint_url.startswith("http://127.0.0.1:")
    assert attrs.to_json() == f'{{"PublicIP":"{host.address}","PublicIPv6":null}}'  # flannel's aws-vpc lease
    backend.start(LocalNetwork(NETWORK, ip_network(subnet), ext_of(host), 9001))  # type: ignore[arg-type]
    return backend


def routes(vpc: Vpc, table: str | None = None) -> dict[str, str]:
    found = vpc.ec2.describe_route_tables(RouteTableIds=[table or vpc.table_id])["RouteTables"][0]["Routes"]
    return {
        r["DestinationCidrBlock"]: r.get("NetworkInterfaceId") or r.get("InstanceId") or r.get("GatewayId")
        for r in found
    }


def test_registry_and_config() -> None:
    from flannel_ebpf.config import parse_config

    cfg = parse_config('{"Network": "10.5.0.0/16", "Backend": {"Type": "AWS-VPC", "RouteTableID": "rtb-1"}}')
    assert cfg.backend_type == "aws-vpc"
    backend = make_backend(cfg.backend_type, cfg.backend, BackendOptions())
    assert isinstance(backend, AwsVpcBackend) and backend.route_tables_configured == ["rtb-1"]
    assert make_backend("aws-vpc", {"RouteTableID": ["rtb-1", "rtb-2"]}, BackendOptions()).route_tables_configured == [
        "rtb-1", "rtb-2"]  # fmt: skip
    for bad in ({"RouteTableID": 5}, {"RouteTableID": ["rtb-1", 2]}, {"RouteLimit": "many"}):
        with pytest.raises(BackendError, match="aws-vpc"):
            make_backend("aws-vpc", bad, BackendOptions())


def test_three_hosts_routes_src_dst_check_removal(vpc_factory: Any) -> None:
    vpc: Vpc = vpc_factory(4)
    h = vpc.hosts
    subnets = ["10.5.1.0/24", "10.5.2.0/24", "10.5.3.0/24"]
    # other owners: a route outside the Network, and a gateway route; neither may ever be touched
    igw = vpc.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    vpc.ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc.vpc_id)
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    vpc.ec2.create_route(
        RouteTableId=vpc.table_id, DestinationCidrBlock="192.168.7.0/24", NetworkInterfaceId=h[3].eni_id
    )
    # a stale route left by a host whose instance was terminated (AWS shows it as blackhole; moto as active)
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.77.0/24", NetworkInterfaceId=h[3].eni_id)
    vpc.ec2.terminate_instances(InstanceIds=[h[3].instance_id])
    # a stale route for host 0's future subnet, pointing elsewhere: replaced (the lease is host 0's)
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.1.0/24", NetworkInterfaceId=h[2].eni_id)

    backends = [agent(h[i], subnets[i]) for i in range(3)]
    leases = [lease(subnets[i], h[i]) for i in range(3)]
    for i, backend in enumerate(backends):
        backend.sync([leases[j] for j in range(3) if j != i])
    got = routes(vpc)
    assert {s: got[s] for s in subnets} == {subnets[i]: h[i].eni_id for i in range(3)}
    assert "10.5.77.0/24" not in got  # its instance is terminated
    assert got["0.0.0.0/0"] == igw and got["192.168.7.0/24"] == h[3].eni_id  # other owners: untouched
    enis = vpc.ec2.describe_network_interfaces(NetworkInterfaceIds=[x.eni_id for x in h[:3]])["NetworkInterfaces"]
    assert [e["SourceDestCheck"] for e in enis] == [False, False, False]
    status = backends[0].status()
    assert status["own_route"] == f"10.5.1.0/24 -> {h[0].eni_id}" and status["route_tables"] == [vpc.table_id]
    assert any("10.5.77.0/24" in r for r in backends[0].removed + backends[1].removed + backends[2].removed)

    # resync is idempotent (no writes) and restores a deleted own route
    vpc.ec2.delete_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.2.0/24")
    backends[1].sync([leases[0], leases[2]])
    assert routes(vpc)["10.5.2.0/24"] == h[1].eni_id

    # host 2's lease is deleted: its route goes (removed by any host seeing the deletion)
    backends[0].remove_peer(leases[2])
    backends[1].remove_peer(leases[2])  # a second remover finds nothing: fine
    got = routes(vpc)
    assert "10.5.3.0/24" not in got and got["10.5.1.0/24"] == h[0].eni_id and got["10.5.2.0/24"] == h[1].eni_id

    # a lease deletion whose route someone re-pointed elsewhere: that route is theirs now, left alone
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.3.0/24", NetworkInterfaceId=h[1].eni_id)
    backends[0].remove_peer(leases[2])
    assert routes(vpc)["10.5.3.0/24"] == h[1].eni_id
    # a deletion event for our own subnet (as a relist may deliver) never removes our route
    backends[0].remove_peer(leases[0])
    assert routes(vpc)["10.5.1.0/24"] == h[0].eni_id

    # flannel-ebpf down: this host's route only
    backends[0].teardown(backends[0].local)
    got = routes(vpc)
    assert "10.5.1.0/24" not in got and got["10.5.2.0/24"] == h[1].eni_id


def test_route_table_from_config_and_main_table(vpc_factory: Any) -> None:
    vpc: Vpc = vpc_factory(1)
    other = vpc.ec2.create_route_table(VpcId=vpc.vpc_id)["RouteTable"]["RouteTableId"]
    backend = agent(vpc.hosts[0], "10.5.9.0/24", {"RouteTableID": [vpc.table_id, other]})
    backend.sync([])
    assert routes(vpc)["10.5.9.0/24"] == routes(vpc, other)["10.5.9.0/24"] == vpc.hosts[0].eni_id
    # no table associated with the instance's subnet: the VPC's main table, as flannel
    assoc = vpc.ec2.describe_route_tables(RouteTableIds=[vpc.table_id])["RouteTables"][0]["Associations"][0]
    vpc.ec2.disassociate_route_table(AssociationId=assoc["RouteTableAssociationId"])
    main = vpc.ec2.describe_route_tables(
        Filters=[{"Name": "vpc-id", "Values": [vpc.vpc_id]}, {"Name": "association.main", "Values": ["true"]}]
    )["RouteTables"][0]["RouteTableId"]
    backend = agent(vpc.hosts[0], "10.5.9.0/24")
    assert backend.route_tables == [main]


def test_route_limit_not_ready_and_nothing_half_programmed(vpc_factory: Any) -> None:
    vpc: Vpc = vpc_factory(1)
    host = vpc.hosts[0]
    roomy = vpc.ec2.create_route_table(VpcId=vpc.vpc_id)["RouteTable"]["RouteTableId"]
    # the subnet's table: the local route + 49 of others' = 50 entries, flannel's documented limit
    for i in range(49):
        vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock=f"172.16.{i}.0/24",
                             NetworkInterfaceId=host.eni_id)  # fmt: skip
    backend = agent(host, "10.5.4.0/24", {"RouteTableID": [roomy, vpc.table_id]})
    with pytest.raises(BackendNotReady) as raised:
        backend.sync([])
    message = str(raised.value)
    assert "\n" not in message and "route table full" in message and f"{vpc.table_id} holds 50 routes" in message
    assert backend.status()["problem"] == message
    assert "10.5.4.0/24" not in routes(vpc, roomy) and "10.5.4.0/24" not in routes(vpc)  # neither table written
    vpc.ec2.delete_route(RouteTableId=vpc.table_id, DestinationCidrBlock="172.16.0.0/24")
    backend.sync([])  # the agent's periodic resync: room again
    assert routes(vpc, roomy)["10.5.4.0/24"] == routes(vpc)["10.5.4.0/24"] == host.eni_id
    assert backend.status()["problem"] == ""
    # a table already holding our route needs no new entry: at the limit, nothing to refuse
    vpc.ec2.create_route(
        RouteTableId=vpc.table_id, DestinationCidrBlock="172.16.0.0/24", NetworkInterfaceId=host.eni_id
    )
    backend.sync([])


def test_bad_credentials_one_line(aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = MotoServer(auth=True)  # moto enforcing IAM: unknown access keys are refused, as by AWS
    strict.start()
    md = AwsMetadataStandIn(instance_id="i-0123456789abcdef0").start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", strict.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        backend = AwsVpcBackend({"Type": "aws-vpc"}, BackendOptions(), imds_endpoint=md.url)
        ext = ExternalInterface("eth0", 2, IPv4Address("10.0.1.4"), IPv4Address("10.0.1.4"), 9001)
        began = time.monotonic()
        with pytest.raises(BackendError) as raised:
            backend.prepare(ext)
        assert time.monotonic() - began < 10
        message = str(raised.value)
        assert "\n" not in message and message.startswith("aws-vpc: AWS refused the credentials"), message
    finally:
        md.close()
        strict.close()


def test_not_in_ec2_says_so_quickly(aws_env: MotoServer) -> None:
    ext = ExternalInterface("eth0", 2, IPv4Address("10.0.1.4"), IPv4Address("10.0.1.4"), 9001)
    sock, silent = silent_listener()  # a metadata address that drops requests: no hang
    try:
        for endpoint in (silent, "http://127.0.0.1:1"):  # silent, then refused
            backend = AwsVpcBackend({"Type": "aws-vpc"}, BackendOptions(), imds_endpoint=endpoint)
            began = time.monotonic()
            with pytest.raises(MetadataUnreachable) as raised:
                backend.prepare(ext)
            assert time.monotonic() - began < 5
            assert "\n" not in str(raised.value)
            assert "AWS instance metadata service" in str(raised.value) and "unreachable" in str(raised.value)
    finally:
        sock.close()
