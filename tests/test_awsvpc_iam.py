"""aws-vpc under IAM policies, against moto's EC2 server enforcing them (moto's IAM authorization: requests
signed by an IAM user's access key, each EC2 action checked against that user's policy; turned on once the
VPC and the users are made). The policy flannel v0.5's aws-vpc guide documents (CreateRoute, DeleteRoute,
ReplaceRoute, DescribeRouteTables, DescribeInstances) is enough: what the backend would rather use falls back
to what that policy allows, each denied action named once in a warning. A permission that is needed and
denied is named in one line (`ec2:<Action>`), never reported as bad credentials.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from ipaddress import ip_network
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from loguru import logger

from flannel_ebpf.backends.awsvpc import AwsVpcBackend
from flannel_ebpf.backends.base import BackendError, BackendNotReady
from flannel_ebpf.host.types import BackendOptions, LocalNetwork
from tests.cloud_standins import MotoServer
from tests.test_awsvpc import NETWORK, REGION, Vpc, agent, ext_of, lease, make_vpc, routes

#: the permissions flannel v0.5.5's Documentation/aws-vpc-backend.md lists for its sample policy
GUIDE_POLICY = ("ec2:CreateRoute", "ec2:DeleteRoute", "ec2:ReplaceRoute", "ec2:DescribeRouteTables",
                "ec2:DescribeInstances")  # fmt: skip


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:  # its own server: enforcement is server-wide
        yield server


@pytest.fixture
def iam(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[MotoServer]:
    """moto as the EC2 endpoint, enforcement off (set-up), no session token (an IAM user's key is used)."""
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", moto.url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    moto.enforce_iam(False)
    try:
        yield moto
    finally:
        moto.enforce_iam(False)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING", format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


_users = 0


def iam_user(moto: MotoServer, actions: tuple[str, ...]) -> tuple[str, str]:
    """An IAM user allowed exactly `actions` on any resource; its access key."""
    global _users
    _users += 1
    name = f"flannel{_users}"
    client = boto3.client("iam", region_name=REGION, endpoint_url=moto.url)
    client.create_user(UserName=name)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": list(actions), "Resource": "*"}]}
    client.put_user_policy(UserName=name, PolicyName="flannel", PolicyDocument=json.dumps(policy))
    key = client.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


class Enforced:
    """`with Enforced(moto, monkeypatch, key):` the process's AWS credentials are the user's and moto checks
    every request against its policy; afterwards enforcement is off again (for the test's own checks)."""

    def __init__(self, moto: MotoServer, monkeypatch: pytest.MonkeyPatch, key: tuple[str, str]) -> None:
        self.moto, self.monkeypatch, self.key = moto, monkeypatch, key

    def __enter__(self) -> Enforced:
        self.monkeypatch.setenv("AWS_ACCESS_KEY_ID", self.key[0])
        self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.key[1])
        self.moto.enforce_iam(True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.moto.enforce_iam(False)
        self.monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")


def without(*denied: str) -> tuple[str, ...]:
    return tuple(a for a in GUIDE_POLICY if a not in denied)


def source_dest_check(vpc: Vpc, i: int) -> tuple[bool, bool]:
    """(the ENI's, the instance's) source/destination check."""
    host = vpc.hosts[i]
    eni = vpc.ec2.describe_network_interfaces(NetworkInterfaceIds=[host.eni_id])["NetworkInterfaces"][0]
    attr = vpc.ec2.describe_instance_attribute(InstanceId=host.instance_id, Attribute="sourceDestCheck")
    return eni["SourceDestCheck"], str(attr["SourceDestCheck"]["Value"]).lower() == "true"


def test_moto_enforces_the_policy(iam: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ground the other tests stand on: an action outside the user's policy is refused, one inside is not."""
    vpc = make_vpc(iam, 1)
    key = iam_user(iam, GUIDE_POLICY)
    with Enforced(iam, monkeypatch, key):
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=iam.url, aws_access_key_id=key[0],
                           aws_secret_access_key=key[1])  # fmt: skip
        ec2.describe_route_tables(RouteTableIds=[vpc.table_id])
        with pytest.raises(ClientError) as refused:
            ec2.modify_network_interface_attribute(NetworkInterfaceId=vpc.hosts[0].eni_id,
                                                   SourceDestCheck={"Value": False})  # fmt: skip
    assert refused.value.response["Error"]["Code"] in ("AccessDenied", "UnauthorizedOperation")
    assert source_dest_check(vpc, 0) == (True, True)
    vpc.hosts[0].metadata.close()


def test_the_policy_of_flannels_guide_is_enough(iam: MotoServer, monkeypatch: pytest.MonkeyPatch, warnings) -> None:
    vpc = make_vpc(iam, 4)
    h = vpc.hosts
    subnets = ["10.5.1.0/24", "10.5.2.0/24", "10.5.3.0/24"]
    # a stale route of a terminated instance (cleaned up), and one for host 0's subnet pointing elsewhere
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.77.0/24", NetworkInterfaceId=h[3].eni_id)
    vpc.ec2.terminate_instances(InstanceIds=[h[3].instance_id])
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.1.0/24", NetworkInterfaceId=h[2].eni_id)
    leases = [lease(subnets[i], h[i]) for i in range(3)]
    try:
        with Enforced(iam, monkeypatch, iam_user(iam, GUIDE_POLICY)):
            backends = [agent(h[i], subnets[i]) for i in range(3)]
            for _ in range(2):  # a resync says nothing new
                for i, backend in enumerate(backends):
                    backend.sync([leases[j] for j in range(3) if j != i])
            backends[0].remove_peer(leases[2])  # its target checked through DescribeInstances
        got = routes(vpc)
        assert {s: got.get(s) for s in subnets[:2]} == {subnets[0]: h[0].eni_id, subnets[1]: h[1].eni_id}
        assert "10.5.77.0/24" not in got and subnets[2] not in got
        # neither Modify* action is in the guide's policy: the check stays on (the guide turns it off by hand)
        assert source_dest_check(vpc, 0) == (True, True)
        for backend in backends:
            assert backend.denied == {"ec2:ModifyNetworkInterfaceAttribute", "ec2:ModifyInstanceAttribute",
                                      "ec2:DescribeNetworkInterfaces"}, backend.denied  # fmt: skip
            assert backend.status()["source_dest_check"] in (None, True)
        check_lines = [w for w in warnings if "source/destination check" in w]
        assert len(check_lines) == 3, warnings  # one per host, none per resync
        both = ("ec2:ModifyNetworkInterfaceAttribute", "ec2:ModifyInstanceAttribute")
        assert all(all(action in w for action in both) for w in check_lines), check_lines
        assert sum("ec2:DescribeNetworkInterfaces" in w for w in warnings) == 3, warnings
        assert not any("refused the credentials" in w for w in warnings)
    finally:
        for host in h:
            host.metadata.close()


def test_with_modify_instance_attribute_the_check_is_turned_off_as_flannel_did(
    iam: MotoServer, monkeypatch: pytest.MonkeyPatch, warnings
) -> None:
    vpc = make_vpc(iam, 1)
    try:
        with Enforced(iam, monkeypatch, iam_user(iam, (*GUIDE_POLICY, "ec2:ModifyInstanceAttribute"))):
            backend = agent(vpc.hosts[0], "10.5.4.0/24")
            backend.sync([])
        assert backend.status()["source_dest_check"] is False
        assert source_dest_check(vpc, 0)[1] is False  # the instance's attribute, as flannel's own call sets it
        assert backend.denied == {"ec2:ModifyNetworkInterfaceAttribute"}
        assert routes(vpc)["10.5.4.0/24"] == vpc.hosts[0].eni_id
    finally:
        vpc.hosts[0].metadata.close()


def test_without_describe_instances_the_metadata_service_names_the_interface(
    iam: MotoServer, monkeypatch: pytest.MonkeyPatch, warnings
) -> None:
    vpc = make_vpc(iam, 2)
    h = vpc.hosts
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.77.0/24", NetworkInterfaceId=h[1].eni_id)
    vpc.ec2.terminate_instances(InstanceIds=[h[1].instance_id])
    try:
        with Enforced(iam, monkeypatch, iam_user(iam, without("ec2:DescribeInstances"))):
            backend = agent(h[0], "10.5.5.0/24")  # the route table found from the metadata's subnet-id
            backend.sync([])
            backend.sync([])
        assert backend.instance.eni_id == h[0].eni_id and backend.route_tables == [vpc.table_id]
        got = routes(vpc)
        assert got["10.5.5.0/24"] == h[0].eni_id
        # a terminated instance's route cannot be told from a live one (moto does not show it blackhole)
        assert got["10.5.77.0/24"] == h[1].eni_id
        assert "ec2:DescribeInstances" in backend.denied
        named = [w for w in warnings if "does not allow ec2:DescribeInstances" in w]
        assert len(named) == 2 and "metadata service" in named[0] and "blackhole" in named[1], warnings
    finally:
        for host in h:
            host.metadata.close()


@pytest.mark.parametrize(
    ("denied", "step"),
    [("ec2:CreateRoute", "sync"), ("ec2:DescribeRouteTables", "prepare"), ("ec2:DeleteRoute", "down")],
)
def test_a_needed_permission_that_is_denied_is_named_in_one_line(
    iam: MotoServer, monkeypatch: pytest.MonkeyPatch, warnings, denied: str, step: str
) -> None:
    vpc = make_vpc(iam, 1)
    host = vpc.hosts[0]
    try:
        if step == "down":  # the route exists; `flannel-ebpf down` cannot remove it
            backend = agent(host, "10.5.6.0/24")
            backend.sync([])
        with Enforced(iam, monkeypatch, iam_user(iam, without(denied))):
            if step == "prepare":
                backend = AwsVpcBackend({"Type": "aws-vpc"}, BackendOptions(), imds_endpoint=host.metadata.url)
                with pytest.raises(BackendError) as raised:
                    backend.prepare(ext_of(host))
                message = str(raised.value)
            elif step == "sync":
                backend = agent(host, "10.5.6.0/24")
                with pytest.raises(BackendNotReady) as raised:  # the agent: not-ready, retried every resync
                    backend.sync([])
                message = str(raised.value)
                assert backend.status()["problem"] == message
            else:
                backend = AwsVpcBackend({"Type": "aws-vpc"}, BackendOptions(), imds_endpoint=host.metadata.url)
                backend.teardown(backend_local(host))
                message = next(w for w in warnings if "teardown" in w)
        assert "\n" not in message and f"does not allow {denied} " in message, message
        assert "refused the credentials" not in message
    finally:
        host.metadata.close()


def backend_local(host: Any) -> LocalNetwork:
    """What `flannel-ebpf down` hands the backend: the recorded lease's network."""
    return LocalNetwork(NETWORK, ip_network("10.5.6.0/24"), ext_of(host), 9001)  # type: ignore[arg-type]


def test_without_replace_route_a_stale_route_is_deleted_and_created(
    iam: MotoServer, monkeypatch: pytest.MonkeyPatch, warnings
) -> None:
    vpc = make_vpc(iam, 2)
    h = vpc.hosts
    vpc.ec2.create_route(RouteTableId=vpc.table_id, DestinationCidrBlock="10.5.8.0/24", NetworkInterfaceId=h[1].eni_id)
    try:
        with Enforced(iam, monkeypatch, iam_user(iam, without("ec2:ReplaceRoute"))):
            backend = agent(h[0], "10.5.8.0/24")
            backend.sync([])
        assert routes(vpc)["10.5.8.0/24"] == h[0].eni_id
        assert "ec2:ReplaceRoute" in backend.denied
        assert sum("ec2:ReplaceRoute" in w and "ec2:DeleteRoute and ec2:CreateRoute" in w for w in warnings) == 1
    finally:
        for host in h:
            host.metadata.close()
