"""The `aws-vpc` backend: no encapsulation; the VPC's route table carries each host's subnet.

As flannel's aws-vpc backend (removed after v0.19; same keys and behaviour): each host writes one route,
`<its subnet> -> its network interface` (the ENI holding the host's interface address), into the route
table named by `Backend.RouteTableID` (a string or a list of strings), or else the table associated with
the instance's subnet, or else the VPC's main table. It turns off the ENI's source/destination check
(the instance forwards packets for container addresses that are not its own), and removes routes in the
overlay Network whose target is gone (AWS shows them as `blackhole`; an instance that was terminated).

Beyond flannel: a peer's lease deletion removes that peer's route (only when the route still points at
the ENI holding the peer's PublicIP: a route someone else re-pointed is theirs), routes outside the
overlay Network or with other targets (gateways, NAT, peering) are never touched, and the table's route
limit (50 by default, as flannel documents; `RouteLimit` raises it for accounts with a larger quota) is
checked in every table before writing any: a full table makes the agent not-ready with one line instead
of programming some tables and not others. The own route is re-checked every resync (restored if deleted).

IAM: the policy flannel v0.5's aws-vpc guide documents is enough: ec2:CreateRoute, ec2:DeleteRoute,
ec2:ReplaceRoute, ec2:DescribeRouteTables, ec2:DescribeInstances. What this backend would rather use falls
back to what that policy allows: ec2:ModifyNetworkInterfaceAttribute -> ec2:ModifyInstanceAttribute (the
source/destination check; with neither, a warning: the guide turns the check off by hand), ReplaceRoute ->
DeleteRoute + CreateRoute, DescribeNetworkInterfaces -> DescribeInstances of the VPC, DescribeInstances at
start -> the metadata service's view of the interfaces. A permission that is needed and denied is named in
one line (`... does not allow ec2:CreateRoute ...`), never reported as bad credentials.

Credentials and region come as the AWS SDKs take them (boto3's chain: environment incl.
AWS_SECURITY_TOKEN/AWS_SESSION_TOKEN, shared files, the instance role); the instance id and region come
from the instance metadata service (IMDSv2, falling back to v1), at AWS_EC2_METADATA_SERVICE_ENDPOINT if
set. boto3 is blocking: the agent calls backends from its data-plane worker thread.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from ipaddress import IPv4Network, ip_network
from typing import Any

from loguru import logger

from flannel_ebpf.backends.base import Backend, BackendError, BackendNotReady
from flannel_ebpf.backends.cloud.common import AWS_SDK, MetadataClient, import_sdk
from flannel_ebpf.host.types import ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

DEFAULT_IMDS = "http://169.254.169.254"
#: flannel's documentation: "Amazon VPC limits the number of entries per route table to 50"
DEFAULT_ROUTE_LIMIT = 50
#: error codes that mean the credentials are wrong: said in one line, never retried
AUTH_CODES = frozenset(
    {"AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidAccessKeyId",
     "OptInRequired", "UnrecognizedClientException", "RequestExpired"}
)  # fmt: skip
#: error codes that mean the credentials are good but the IAM policy does not allow the action (EC2 says
#: UnauthorizedOperation; AccessDenied is the generic IAM code)
DENIED_CODES = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
ROUTE_GONE = frozenset({"InvalidRoute.NotFound"})


class PermissionDenied(BackendNotReady):
    """The IAM policy does not allow one EC2 action (`action`, e.g. `ec2:CreateRoute`). At start the agent
    exits with it; in a resync the network is not-ready with it (until the policy allows the action)."""

    def __init__(self, action: str, what: str) -> None:
        self.action = action
        super().__init__(
            f"aws-vpc: the IAM policy does not allow {action} ({what}): add {action} to the policy of this "
            f"instance's role (or of the credentials' user)"
        )


def parse_route_tables(config: dict[str, Any]) -> list[str]:
    """`RouteTableID`: absent (detect), a string, or a list of strings (flannel accepts both)."""
    raw = config.get("RouteTableID")
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(t, str) and t for t in raw):
        return list(dict.fromkeys(raw))
    raise BackendError(f"aws-vpc: RouteTableID must be a string or a list of strings, got {raw!r}")


def parse_route_limit(config: dict[str, Any]) -> int:
    raw = config.get("RouteLimit", DEFAULT_ROUTE_LIMIT)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 2:
        raise BackendError(f"aws-vpc: RouteLimit must be an integer of at least 2, got {raw!r}")
    return raw


def route_cidr(route: dict[str, Any]) -> IPv4Network | None:
    cidr = route.get("DestinationCidrBlock")
    try:
        return ip_network(cidr) if cidr else None  # type: ignore[return-value]
    except ValueError:
        return None


def describe_target(route: dict[str, Any]) -> str:
    for key in ("NetworkInterfaceId", "InstanceId", "GatewayId", "NatGatewayId", "VpcPeeringConnectionId",
                "TransitGatewayId"):  # fmt: skip
        if route.get(key):
            return str(route[key])
    return "?"


@dataclass
class AwsInstance:
    """Where this host sits in EC2."""

    instance_id: str
    region: str
    eni_id: str
    subnet_id: str
    vpc_id: str
    source_dest_check: bool | None = None


@dataclass
class AwsVpcBackend(Backend):
    """One host's route in its VPC route table(s)."""

    type_name = "aws-vpc"

    backend_config: dict[str, Any]
    options: Any
    #: the metadata service root (tests: a stand-in); default: AWS_EC2_METADATA_SERVICE_ENDPOINT, as the SDKs
    imds_endpoint: str = ""
    route_tables_configured: list[str] = field(default_factory=list)
    route_limit: int = DEFAULT_ROUTE_LIMIT
    ec2: Any = None
    instance: AwsInstance | None = None
    route_tables: list[str] = field(default_factory=list)
    local: LocalNetwork | None = None
    peers: dict[IPv4Network, Lease] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)  # routes this agent removed, for status (last 20)
    problem: str = ""
    #: EC2 actions the policy denied that have a fallback (each said once, as a warning)
    denied: set[str] = field(default_factory=set)
    _imds: MetadataClient | None = field(default=None, repr=False)
    _warned: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        import_sdk("aws-vpc", "aws", AWS_SDK)
        self.route_tables_configured = parse_route_tables(self.backend_config)
        self.route_limit = parse_route_limit(self.backend_config)
        self.imds_endpoint = self.imds_endpoint or os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", DEFAULT_IMDS)

    def overhead(self) -> int:
        return 0

    # ------------------------------------------------------------------------------------------------
    # discovery

    def _metadata(self) -> tuple[str, str]:
        self._imds = imds = MetadataClient(self.imds_endpoint, "AWS")
        try:  # IMDSv2: a session token first; instances that require v2 answer nothing without it
            token = imds.request("latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "300"})
            imds.headers["X-aws-ec2-metadata-token"] = token
        except BackendError as e:
            if "unreachable" in str(e):
                raise
            logger.debug("aws-vpc: no IMDSv2 token ({}); using IMDSv1", e)
        instance_id = imds.request("latest/meta-data/instance-id").strip()
        try:
            region = imds.request("latest/meta-data/placement/region").strip()
        except BackendError:  # older metadata services: the zone (us-east-1a) less its letter
            region = imds.request("latest/meta-data/placement/availability-zone").strip()[:-1]
        if not instance_id.startswith("i-") or not region:
            raise BackendError(f"aws-vpc: the metadata service gave instance id {instance_id!r}, region {region!r}")
        return instance_id, region

    def _client(self, region: str) -> Any:
        import boto3
        from botocore.config import Config

        # Endpoint and credentials as the SDK resolves them (AWS_ENDPOINT_URL_EC2, the credential chain);
        # short connect timeouts and a few standard retries keep a broken network from hanging the agent.
        config = Config(connect_timeout=3, read_timeout=15, retries={"max_attempts": 4, "mode": "standard"})
        return boto3.session.Session(region_name=region).client("ec2", config=config)

    def _call(self, what: str, fn: Any, ok_codes: frozenset[str] = frozenset(), **kwargs: Any) -> Any:
        """One EC2 request; errors become one operator-facing line (PermissionDenied names the action). An
        error whose code is in `ok_codes` is an answer: None."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return fn(**kwargs)
        except NoCredentialsError:
            raise BackendError(
                "aws-vpc: no AWS credentials (environment AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, shared "
                "credentials file, or an instance role)"
            ) from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            message = e.response.get("Error", {}).get("Message", "")
            if code in ok_codes:
                return None
            if code in DENIED_CODES:
                raise PermissionDenied(f"ec2:{e.operation_name}", what) from None
            if code in AUTH_CODES:
                raise BackendError(f"aws-vpc: AWS refused the credentials for {what}: {code}: {message}") from None
            raise BackendError(f"aws-vpc: {what} failed: {code}: {message}") from None
        except BotoCoreError as e:
            raise BackendError(f"aws-vpc: {what} failed: {e}") from None

    def _fallback(self, denied: PermissionDenied, instead: str) -> None:
        """A denied action with a way around it: one warning per action and way around, naming the action."""
        self.denied.add(denied.action)
        line = f"aws-vpc: the IAM policy does not allow {denied.action}: {instead}"
        if line not in self._warned:
            self._warned.add(line)
            logger.warning(line)

    def discover(self, ext: ExternalInterface) -> AwsInstance:
        instance_id, region = self._metadata()
        self.ec2 = self._client(region)
        try:
            found = self._call(
                f"describing instance {instance_id}", self.ec2.describe_instances, InstanceIds=[instance_id]
            )
        except PermissionDenied as e:
            self._fallback(e, "this instance's interface is read from the metadata service")
            return self._discover_from_metadata(instance_id, region, ext)
        instances = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
        if not instances:
            raise BackendError(f"aws-vpc: EC2 knows no instance {instance_id} in {region}")
        for eni in instances[0].get("NetworkInterfaces", []):
            if any(a.get("PrivateIpAddress") == str(ext.address) for a in eni.get("PrivateIpAddresses", [])):
                return AwsInstance(
                    instance_id, region, eni["NetworkInterfaceId"], eni["SubnetId"], eni["VpcId"],
                    eni.get("SourceDestCheck"),
                )  # fmt: skip
        raise BackendError(
            f"aws-vpc: no network interface of instance {instance_id} holds {ext.address} (the address of "
            f"{ext.name}); choose the interface with --iface"
        )

    def _discover_from_metadata(self, instance_id: str, region: str, ext: ExternalInterface) -> AwsInstance:
        """The interface holding `ext.address`, as the metadata service describes it (its source/destination
        check is then unknown)."""
        base = "latest/meta-data/network/interfaces/macs/"
        assert self._imds is not None  # set by _metadata(), which discover() calls first
        for mac in self._imds.request(base).split():
            mac = mac.strip("/")
            addresses = self._imds.request(f"{base}{mac}/local-ipv4s").split()
            if str(ext.address) in addresses:
                item = {
                    k: self._imds.request(f"{base}{mac}/{k}").strip() for k in ("interface-id", "subnet-id", "vpc-id")
                }
                return AwsInstance(instance_id, region, item["interface-id"], item["subnet-id"], item["vpc-id"])
        raise BackendError(
            f"aws-vpc: no network interface of instance {instance_id} holds {ext.address} (the address of "
            f"{ext.name}); choose the interface with --iface"
        )

    def _detect_route_tables(self, inst: AwsInstance) -> list[str]:
        """The table associated with the instance's subnet, else the VPC's main table (as flannel)."""
        for filters in (
            [{"Name": "association.subnet-id", "Values": [inst.subnet_id]}],
            [{"Name": "association.main", "Values": ["true"]}, {"Name": "vpc-id", "Values": [inst.vpc_id]}],
        ):
            found = self._call("finding the route table", self.ec2.describe_route_tables, Filters=filters)
            tables = found.get("RouteTables", [])
            if tables:
                return [tables[0]["RouteTableId"]]
        raise BackendError(f"aws-vpc: no route table for subnet {inst.subnet_id} and no main table in {inst.vpc_id}")

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        # Everything that can fail on a host outside EC2 or with bad credentials fails here, before a lease
        # is taken: one line, exit 1.
        self.instance = self.discover(ext)
        self.route_tables = self.route_tables_configured or self._detect_route_tables(self.instance)
        logger.info(
            "aws-vpc: instance {} in {}, interface {}, route table(s) {}",
            self.instance.instance_id, self.instance.region, self.instance.eni_id, ", ".join(self.route_tables),
        )  # fmt: skip
        # flannel's aws-vpc lease carries only the PublicIP (no BackendType): the udp shape
        return LeaseAttrs(public_ip=ext.public_ip, backend_type="udp", backend_data=None)

    # ------------------------------------------------------------------------------------------------
    # the data path: routes in the VPC

    def start(self, local: LocalNetwork) -> None:
        self.local = local
        inst = self._inst()
        if inst.source_dest_check is not False:
            # without this, EC2 drops every packet to or from a container address (not the ENI's own)
            self._turn_off_source_dest_check(inst)

    def _turn_off_source_dest_check(self, inst: AwsInstance) -> None:
        what = f"turning off the source/destination check of {inst.eni_id}"
        try:
            self._call(what, self.ec2.modify_network_interface_attribute, NetworkInterfaceId=inst.eni_id,
                       SourceDestCheck={"Value": False})  # fmt: skip
            via = "ec2:ModifyNetworkInterfaceAttribute"
        except PermissionDenied as first:
            # flannel's own call: the instance's attribute, which is its primary interface's
            self._fallback(first, "trying ec2:ModifyInstanceAttribute (flannel's call) for the check instead")
            try:
                self._call(what, self.ec2.modify_instance_attribute, InstanceId=inst.instance_id,
                           SourceDestCheck={"Value": False})  # fmt: skip
                via = "ec2:ModifyInstanceAttribute"
            except PermissionDenied as second:
                logger.warning(
                    "aws-vpc: the source/destination check of {} was left as it is: the IAM policy allows "
                    "neither {} nor {}; allow one, or turn the check off in the EC2 console (containers' "
                    "packets are dropped by EC2 while it is on)", inst.eni_id, first.action, second.action,
                )  # fmt: skip
                self.denied.add(second.action)
                return
        inst.source_dest_check = False
        logger.info("aws-vpc: source/destination check turned off on {} ({})", inst.eni_id, via)

    def _tables(self) -> dict[str, list[dict[str, Any]]]:
        found = self._call(
            "describing the route tables", self.ec2.describe_route_tables, RouteTableIds=self.route_tables
        )
        return {t["RouteTableId"]: t.get("Routes", []) for t in found.get("RouteTables", [])}

    def _interfaces(self, eni_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The ENIs that exist among `eni_ids`: id -> {"InstanceId": attached to ("": none), "Addresses"}.
        From ec2:DescribeNetworkInterfaces, else (the policy of flannel's guide) from ec2:DescribeInstances
        of the VPC, which sees only attached ENIs: a detached one counts as gone (AWS blackholes its routes)."""
        found: dict[str, dict[str, Any]] = {}
        if not eni_ids:
            return found
        if "ec2:DescribeNetworkInterfaces" not in self.denied:
            try:
                # a filter, not NetworkInterfaceIds: a deleted ENI is then simply absent instead of an error
                answer = self._call(
                    "describing network interfaces",
                    self.ec2.describe_network_interfaces,
                    Filters=[{"Name": "network-interface-id", "Values": eni_ids}],
                )
                for eni in answer.get("NetworkInterfaces", []):
                    found[eni["NetworkInterfaceId"]] = {
                        "InstanceId": eni.get("Attachment", {}).get("InstanceId", ""),
                        "Addresses": {a.get("PrivateIpAddress") for a in eni.get("PrivateIpAddresses", [])},
                    }
                return found
            except PermissionDenied as e:
                self._fallback(e, "network interfaces are read from ec2:DescribeInstances of the VPC instead")
        answer = self._call(
            "describing the VPC's instances",
            self.ec2.describe_instances,
            Filters=[{"Name": "vpc-id", "Values": [self._inst().vpc_id]}],
        )
        for reservation in answer.get("Reservations", []):
            for instance in reservation.get("Instances", []):
                for eni in instance.get("NetworkInterfaces", []):
                    if eni.get("NetworkInterfaceId") in eni_ids:
                        found[eni["NetworkInterfaceId"]] = {
                            "InstanceId": instance["InstanceId"],
                            "Addresses": {a.get("PrivateIpAddress") for a in eni.get("PrivateIpAddresses", [])},
                        }
        return found

    def _dead_targets(self, routes: list[dict[str, Any]]) -> set[str]:
        """Of these routes' ENI/instance targets, the ones that are gone: deleted ENIs, terminated instances."""
        eni_ids = sorted({r["NetworkInterfaceId"] for r in routes if r.get("NetworkInterfaceId")})
        instance_of = {eni: info["InstanceId"] for eni, info in self._interfaces(eni_ids).items()}
        dead = {e for e in eni_ids if e not in instance_of}
        instance_ids = sorted(
            {r["InstanceId"] for r in routes if r.get("InstanceId")} | set(instance_of.values()) - {""}
        )
        if instance_ids:
            found = self._call(
                "describing instances",
                self.ec2.describe_instances,
                Filters=[{"Name": "instance-id", "Values": instance_ids}],
            )
            states = {
                i["InstanceId"]: i.get("State", {}).get("Name", "")
                for r in found.get("Reservations", [])
                for i in r.get("Instances", [])
            }
            gone = {i for i in instance_ids if states.get(i, "terminated") == "terminated"}
            dead |= gone | {e for e, i in instance_of.items() if i in gone}
        return dead

    def _delete(self, table: str, route: dict[str, Any], why: str) -> None:
        cidr = route["DestinationCidrBlock"]
        self._call(f"deleting route {cidr} from {table}", self.ec2.delete_route,
                   ok_codes=ROUTE_GONE,  # already gone: fine
                   RouteTableId=table, DestinationCidrBlock=cidr)  # fmt: skip
        logger.info("aws-vpc: removed route {} -> {} from {}: {}", cidr, describe_target(route), table, why)
        self.removed = [*self.removed, f"{cidr} -> {describe_target(route)} ({why})"][-20:]

    def _clean_stale(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Routes in the overlay Network (not ours) whose target is gone: flannel's blackhole clean-up."""
        local = self._local()
        candidates = {
            (table, r["DestinationCidrBlock"]): r
            for table, routes in tables.items()
            for r in routes
            if (net := route_cidr(r)) is not None
            and net.subnet_of(local.network)
            and net != local.subnet
            and (r.get("NetworkInterfaceId") or r.get("InstanceId"))
        }
        if not candidates:
            return
        try:
            dead = self._dead_targets(list(candidates.values()))
        except PermissionDenied as e:
            self._fallback(e, "only routes AWS shows as blackhole are cleaned up")
            dead = set()
        for (table, _cidr), route in candidates.items():
            if route.get("State") == "blackhole":
                why = "blackhole (its target is gone)"
            elif route.get("NetworkInterfaceId") in dead or route.get("InstanceId") in dead:
                why = "its instance is terminated"
            else:
                continue
            self._delete(table, route, why)
            tables[table] = [r for r in tables[table] if r is not route]

    def _ensure_own_route(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        local, inst = self._local(), self._inst()
        cidr = str(local.subnet)
        missing = [t for t in self.route_tables if t not in tables]
        if missing:
            raise BackendError(f"aws-vpc: route table(s) {', '.join(missing)} not found")
        todo: dict[str, dict[str, Any] | None] = {}
        for table in self.route_tables:
            mine = next((r for r in tables[table] if r.get("DestinationCidrBlock") == cidr), None)
            if mine and mine.get("NetworkInterfaceId") == inst.eni_id and mine.get("State", "active") == "active":
                continue
            todo[table] = mine
        # A new route takes an entry: check every table before writing to any, never half-program them.
        full = [
            f"{table} holds {len(tables[table])} routes"
            for table, mine in todo.items()
            if mine is None and len(tables[table]) >= self.route_limit
        ]
        if full:
            raise BackendNotReady(
                f"aws-vpc: route table full: {'; '.join(full)}, the limit is {self.route_limit} (flannel's "
                f"documented default; set Backend.RouteLimit if AWS raised this account's quota); the route "
                f"{cidr} -> {inst.eni_id} was not added"
            )
        for table, mine in todo.items():
            if mine is None:
                self._call(
                    f"adding route {cidr} to {table}", self.ec2.create_route,
                    RouteTableId=table, DestinationCidrBlock=cidr, NetworkInterfaceId=inst.eni_id,
                )  # fmt: skip
                logger.info("aws-vpc: route added to {}: {} -> {}", table, cidr, inst.eni_id)
            else:
                # our lease is ours in etcd: a route for our subnet elsewhere is stale (flannel replaces it too)
                self._replace_route(table, cidr, inst.eni_id)
                logger.warning(
                    "aws-vpc: route {} in {} pointed at {} ({}); now -> {}",
                    cidr, table, describe_target(mine), mine.get("State"), inst.eni_id,
                )  # fmt: skip

    def _replace_route(self, table: str, cidr: str, eni_id: str) -> None:
        what = f"replacing route {cidr} in {table}"
        if "ec2:ReplaceRoute" not in self.denied:
            try:
                self._call(what, self.ec2.replace_route, RouteTableId=table, DestinationCidrBlock=cidr,
                           NetworkInterfaceId=eni_id)  # fmt: skip
                return
            except PermissionDenied as e:
                self._fallback(e, "a route is replaced by ec2:DeleteRoute and ec2:CreateRoute, as flannel does")
        self._call(f"deleting route {cidr} from {table}", self.ec2.delete_route, ok_codes=ROUTE_GONE,
                   RouteTableId=table, DestinationCidrBlock=cidr)  # fmt: skip
        self._call(f"adding route {cidr} to {table}", self.ec2.create_route, RouteTableId=table,
                   DestinationCidrBlock=cidr, NetworkInterfaceId=eni_id)  # fmt: skip

    def sync(self, peers: list[Lease]) -> None:
        self.peers = {p.subnet: p for p in peers}
        try:
            tables = self._tables()
            self._clean_stale(tables)
            self._ensure_own_route(tables)
        except BackendError as e:
            self.problem = str(e)
            raise
        self.problem = ""

    def add_peer(self, lease: Lease) -> None:
        # each host writes its own route; a peer's lease needs nothing here
        self.peers[lease.subnet] = lease

    def remove_peer(self, lease: Lease) -> None:
        self.peers.pop(lease.subnet, None)
        local = self._local()
        if lease.subnet == local.subnet:
            return
        tables = self._tables()
        routes = [
            (table, r)
            for table, rs in tables.items()
            for r in rs
            if r.get("DestinationCidrBlock") == str(lease.subnet)
            and (r.get("NetworkInterfaceId") or r.get("InstanceId"))
        ]
        for table, route in routes:
            try:
                gone_or_theirs = route.get("State") == "blackhole" or self._targets_ip(route, str(lease.public_ip))
            except PermissionDenied as e:
                self._fallback(e, "a gone lease's route is left in place (its target cannot be checked)")
                continue
            if gone_or_theirs:
                self._delete(table, route, f"the lease of {lease.public_ip} is gone")
            else:
                logger.info(
                    "aws-vpc: lease {} is gone but its route in {} points at {}, not at {}: left alone",
                    lease.subnet, table, describe_target(route), lease.public_ip,
                )  # fmt: skip

    def _targets_ip(self, route: dict[str, Any], address: str) -> bool:
        """Whether the route's target (an ENI, or an instance) holds this private address, or is gone."""
        if route.get("NetworkInterfaceId"):
            eni = self._interfaces([route["NetworkInterfaceId"]]).get(route["NetworkInterfaceId"])
            return eni is None or address in eni["Addresses"]
        found = self._call(
            "describing an instance",
            self.ec2.describe_instances,
            Filters=[{"Name": "instance-id", "Values": [route["InstanceId"]]}],
        )
        instances = [i for r in found.get("Reservations", []) for i in r.get("Instances", [])]
        return not instances or any(
            a.get("PrivateIpAddress") == address
            for i in instances
            for eni in i.get("NetworkInterfaces", [])
            for a in eni.get("PrivateIpAddresses", [])
        )

    def teardown(self, local: LocalNetwork | None) -> None:
        """`flannel-ebpf down`: remove this host's route (only if it still points at this host)."""
        if local is None:
            logger.info("aws-vpc: no recorded lease: no route to remove")
            return
        try:
            if self.instance is None:
                self.prepare(local.ext)
            self.local = local
            for table, routes in self._tables().items():
                for r in routes:
                    if (
                        r.get("DestinationCidrBlock") == str(local.subnet)
                        and r.get("NetworkInterfaceId") == self._inst().eni_id
                    ):
                        self._delete(table, r, "flannel-ebpf down")
        except BackendError as e:
            logger.error("aws-vpc: teardown: {}", e)

    def status(self) -> dict[str, Any]:
        inst = self.instance
        return {
            "type": self.type_name,
            "instance": inst.instance_id if inst else None,
            "region": inst.region if inst else None,
            "network_interface": inst.eni_id if inst else None,
            "source_dest_check": inst.source_dest_check if inst else None,
            "route_tables": self.route_tables,
            "route_limit": self.route_limit,
            "own_route": f"{self.local.subnet} -> {inst.eni_id}" if self.local and inst else None,
            "peers": len(self.peers),
            "routes_removed": self.removed,
            "denied_actions": sorted(self.denied),
            "problem": self.problem,
        }

    def _inst(self) -> AwsInstance:
        return self.required(self.instance if self.ec2 is not None else None)

    def _local(self) -> LocalNetwork:
        return self.required(self.local, "start()")
