"""End to end: the real agent (`flannel-ebpf up`, a subprocess) with a real etcd and `Type: aws-vpc`,
against moto's EC2 server and the instance metadata stand-in (tests/cloud_standins.py). It runs in the
root namespace: aws-vpc touches no local network state (no devices, no routes), and the test turns the
FLANNEL-FWD iptables rules off so the agent leaves the firewall alone too.

Shown: the lease, the host's route in the VPC route table, the source/destination check off, health
ready; a peer's lease deletion removing its route; a full route table making the agent not-ready with
the reason, and ready again once there is room.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import boto3
import pytest

from flannel_ebpf.lab.etcd import EtcdServer
from flannel_ebpf.lab.netns import stop_process
from tests.cloud_standins import AwsMetadataStandIn, MotoServer

CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "aws-vpc"}}'


def an_interface() -> tuple[str, str]:
    """A non-loopback interface with an IPv4 address (the agent's --iface; the instance's private IP)."""
    out = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True, text=True, check=True).stdout)
    for link in out:
        if link["ifname"] != "lo" and link.get("addr_info"):
            return link["ifname"], link["addr_info"][0]["local"]
    raise AssertionError("no interface with an IPv4 address besides lo")


def subnet_for(address: str) -> str:
    """A subnet holding `address` outside AWS's reserved addresses (the first four and the last)."""
    for prefix in range(24, 15, -1):
        net = ip_network(f"{address}/{prefix}", strict=False)
        offset = int(ip_address(address)) - int(net.network_address)
        if 4 <= offset < net.num_addresses - 1:
            return str(net)
    raise AssertionError(f"no subnet for {address}")


@pytest.fixture
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


def health(state_dir: Path) -> str:
    cmd = [sys.executable, "-c", "import sys; from flannel_ebpf.cli import main; sys.exit(main())"]
    r = subprocess.run([*cmd, "health", "--state-dir", str(state_dir)], capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def wait_for(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_agent_aws_vpc_end_to_end(etcd: EtcdServer, moto: MotoServer, tmp_path: Path) -> None:
    iface, address = an_interface()
    subnet = subnet_for(address)
    vpc_cidr = str(ip_network(subnet).supernet(new_prefix=16))
    ec2 = boto3.client(
        "ec2", region_name="us-east-1", endpoint_url=moto.url, aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )  # fmt: skip
    vpc_id = ec2.create_vpc(CidrBlock=vpc_cidr)["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock=subnet)["Subnet"]["SubnetId"]
    table = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet_id)
    me = ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet_id, PrivateIpAddress=address
    )["Instances"][0]
    peer = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnet_id)["Instances"][0]
    my_eni, peer_eni = (
        me["NetworkInterfaces"][0]["NetworkInterfaceId"],
        peer["NetworkInterfaces"][0]["NetworkInterfaceId"],
    )
    peer_ip = peer["PrivateIpAddress"]
    # the peer host (not run here) holds 10.5.200.0/24 and wrote its own route, as its agent would
    ec2.create_route(RouteTableId=table, DestinationCidrBlock="10.5.200.0/24", NetworkInterfaceId=peer_eni)
    etcd.ctl("put", "/coreos.com/network/config", input=CONFIG)
    peer_lease = json.dumps({"PublicIP": peer_ip, "PublicIPv6": None})
    etcd.ctl("put", "/coreos.com/network/subnets/10.5.200.0-24", input=peer_lease)

    metadata = AwsMetadataStandIn(instance_id=me["InstanceId"], subnet_id=subnet_id).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLANNELD_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_ENDPOINT_URL_EC2=moto.url,
        AWS_EC2_METADATA_SERVICE_ENDPOINT=metadata.url, AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
    )  # fmt: skip
    state_dir = tmp_path / "state"
    log = (tmp_path / "agent.log").open("w")
    argv = [
        sys.executable, "-c", "import sys; from flannel_ebpf.cli import main; sys.exit(main())", "up",
        "--etcd-endpoints", etcd.endpoint, "--iface", iface, "--subnet-file", str(tmp_path / "subnet.env"),
        "--state-dir", str(state_dir), "--iptables-forward-rules=false", "--resync-interval", "1",
    ]  # fmt: skip
    agent = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def routes() -> dict[str, str]:
        found = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]["Routes"]
        return {r["DestinationCidrBlock"]: r.get("NetworkInterfaceId", "") for r in found}

    try:
        ready = wait_for("the agent to be ready", lambda: (h := health(state_dir)).startswith("ready") and h)
        assert ready.startswith(f"ready {iface} subnet:10.5.") and "mtu:" in ready
        own = ready.split("subnet:")[1].split()[0]
        own_subnet = str(ip_network(own, strict=False))
        assert routes()[own_subnet] == my_eni
        eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[my_eni])["NetworkInterfaces"][0]
        assert eni["SourceDestCheck"] is False
        assert routes()["10.5.200.0/24"] == peer_eni

        # the peer's lease goes: its route goes
        etcd.ctl("del", "/coreos.com/network/subnets/10.5.200.0-24")
        wait_for("the peer's route to go", lambda: "10.5.200.0/24" not in routes())

        # the table fills up and our route is lost: not-ready, with the reason; room again: ready
        for i in range(49):  # the local route, 49 others' routes: 50, flannel's documented limit
            ec2.create_route(RouteTableId=table, DestinationCidrBlock=f"172.16.{i}.0/24", NetworkInterfaceId=peer_eni)
        ec2.delete_route(RouteTableId=table, DestinationCidrBlock=own_subnet)
        if own_subnet in routes():  # the agent's 1 s resync restored it meanwhile (moto has no limit): again
            ec2.delete_route(RouteTableId=table, DestinationCidrBlock=own_subnet)
        line = wait_for("not-ready", lambda: (h := health(state_dir)).startswith("not-ready") and h)
        assert line.startswith("not-ready backend: aws-vpc: route table full:") and "limit is 50" in line, line
        assert own_subnet not in routes()
        ec2.delete_route(RouteTableId=table, DestinationCidrBlock="172.16.0.0/24")
        wait_for("ready again", lambda: health(state_dir).startswith("ready"))
        assert routes()[own_subnet] == my_eni
    finally:
        stop_process(agent, 10)
        metadata.close()
        log.close()
        print((tmp_path / "agent.log").read_text()[-4000:])
    assert agent.returncode == 0
    assert "CryptographyDeprecationWarning" not in (tmp_path / "agent.log").read_text()


#: the agent, with boto3 not importable (as on a host installed without the `aws` extra)
WITHOUT_BOTO3 = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "boto3":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from flannel_ebpf.cli import main
sys.exit(main())
"""


def test_agent_without_boto3_says_to_install_the_aws_extra_and_exits_1(etcd: EtcdServer, tmp_path: Path) -> None:
    iface, _ = an_interface()
    etcd.ctl("put", "/coreos.com/network/config", input=CONFIG)
    argv = [
        sys.executable, "-c", WITHOUT_BOTO3, "up", "--etcd-endpoints", etcd.endpoint, "--iface", iface,
        "--subnet-file", str(tmp_path / "subnet.env"), "--state-dir", str(tmp_path / "state"),
        "--iptables-forward-rules=false",
    ]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith(
        "the aws-vpc backend needs boto3: pip install 'flannel-ebpf[aws]'"
    ), out
    assert "Traceback" not in out, out
