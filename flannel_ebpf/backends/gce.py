"""The `gce` backend: no encapsulation; a GCE route in the instance's network carries each host's subnet.

As flannel's gce backend (removed after v0.19): each host owns one route named `flannel-<subnet with "."
and "/" as "-">` (10.5.34.0/24 -> `flannel-10-5-34-0-24`), destRange its subnet, next hop its instance,
priority 1000, in the network of its first interface. A route of that name pointing elsewhere is deleted
and re-made (this host holds the lease in etcd). The names are flannel's, so flanneld and flannel-ebpf
hosts share one network. Every insert and delete is an operation, waited for until DONE.

Beyond flannel: a peer's lease deletion removes that peer's route (only a `flannel-` route whose next-hop
instance holds the peer's PublicIP, or is gone), `flannel-` routes in the overlay Network whose instance is
gone (GCE's NEXT_HOP_INSTANCE_NOT_FOUND) are removed, other routes are never touched, and the own route is
re-checked every resync. A project route quota hit (100 routes by default) makes the agent not-ready with
one line and is retried.

Instance, project, zone and network come from the metadata server (GCE_METADATA_HOST, google-auth's
setting, else 169.254.169.254); credentials from GOOGLE_APPLICATION_CREDENTIALS if set, else the metadata
server's token for the instance's service account (needs the compute-rw scope). The instance must be
created with --can-ip-forward. The client is google-api-python-client with the Compute discovery document
it ships (no network fetch of the document).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network, ip_network
from typing import Any

from loguru import logger

from flannel_ebpf.backends.base import Backend, BackendError, BackendNotReady
from flannel_ebpf.backends.cloud.common import GCE_SDK, MetadataClient, import_sdk
from flannel_ebpf.host.types import ExternalInterface, LocalNetwork
from flannel_ebpf.subnet.lease import Lease, LeaseAttrs

COMPUTE_SCOPE = "https://www.googleapis.com/auth/compute"
DEFAULT_METADATA_HOST = "169.254.169.254"
ROUTE_PRIORITY = 1000  # flannel's
OPERATION_TIMEOUT = 120.0


def route_name(subnet: IPv4Network | str) -> str:
    """flannel's name for a subnet's route: `flannel-10-5-34-0-24`."""
    return "flannel-" + str(subnet).replace(".", "-").replace("/", "-")


def resource_path(link: str) -> str:
    """`projects/p/zones/z/instances/i` of a selfLink (full URL or partial): compared, never the host."""
    at = link.find("projects/")
    return link[at:] if at >= 0 else link


def basename(value: str) -> str:
    return value.rstrip("/").rsplit("/", 1)[-1]


def _metadata_credentials(metadata: MetadataClient) -> Any:
    """Credentials that take the instance service account's token from the metadata server (the server
    this backend was pointed at, which google-auth's own class does not take as a parameter)."""
    import datetime

    from google.auth import credentials

    class MetadataCredentials(credentials.Credentials):
        def refresh(self, request: Any) -> None:
            answer = json.loads(metadata.request("instance/service-accounts/default/token"))
            self.token = answer["access_token"]
            # google-auth compares expiry with a naive UTC time
            now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
            self.expiry = now + datetime.timedelta(seconds=int(answer.get("expires_in", 300)))

    return MetadataCredentials()  # type: ignore[no-untyped-call]  # google-auth's __init__ is not annotated


@dataclass
class GceInstance:
    project: str
    zone: str
    name: str
    network: str  # the network's name
    network_link: str = ""
    instance_link: str = ""


@dataclass
class GceBackend(Backend):
    type_name = "gce"

    backend_config: dict[str, Any]
    options: Any
    #: the metadata server's root (tests: a stand-in); default from GCE_METADATA_HOST, as google-auth
    metadata_root: str = ""
    #: the Compute API's base URL (tests: a stand-in); default: the discovery document's
    compute_endpoint: str = ""
    compute: Any = None
    instance: GceInstance | None = None
    local: LocalNetwork | None = None
    peers: dict[IPv4Network, Lease] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    problem: str = ""

    def __post_init__(self) -> None:
        import_sdk("gce", "gce", GCE_SDK)
        if not self.metadata_root:
            host = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_ROOT") or DEFAULT_METADATA_HOST
            self.metadata_root = host if "://" in host else f"http://{host}"
        self.compute_endpoint = self.compute_endpoint or os.environ.get("FLANNEL_EBPF_GCE_COMPUTE_ENDPOINT", "")

    def overhead(self) -> int:
        return 0

    # ------------------------------------------------------------------------------------------------
    # discovery

    def _metadata(self) -> MetadataClient:
        return MetadataClient(self.metadata_root + "/computeMetadata/v1", "GCE", {"Metadata-Flavor": "Google"})

    def _credentials(self, metadata: MetadataClient) -> Any:
        path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if path:
            from google.auth.exceptions import GoogleAuthError
            from google.oauth2 import service_account

            # a service account key file (the kind GOOGLE_APPLICATION_CREDENTIALS names for a host)
            try:
                creds = service_account.Credentials.from_service_account_file(path, scopes=[COMPUTE_SCOPE])
            except (GoogleAuthError, OSError, ValueError, KeyError) as e:
                raise BackendError(f"gce: GOOGLE_APPLICATION_CREDENTIALS={path}: {e}") from None
            return creds
        return _metadata_credentials(metadata)

    def _client(self, creds: Any) -> Any:
        import google_auth_httplib2
        import httplib2
        from googleapiclient import discovery

        # a timeout on every request, and no proxy from the environment
        http = google_auth_httplib2.AuthorizedHttp(creds, http=httplib2.Http(timeout=30, proxy_info=None))
        options = {"api_endpoint": self.compute_endpoint} if self.compute_endpoint else None
        # static_discovery: the Compute v1 discovery document shipped inside google-api-python-client
        return discovery.build("compute", "v1", http=http, static_discovery=True, client_options=options)

    def _do(self, what: str, request: Any) -> Any:
        """Execute one API request; errors become one operator-facing line."""
        from google.auth.exceptions import GoogleAuthError
        from googleapiclient.errors import HttpError

        try:
            return request.execute(num_retries=2)
        except HttpError as e:
            reason = e.reason if hasattr(e, "reason") else str(e)
            if e.resp.status in (401, 403):
                raise BackendError(
                    f"gce: {what}: HTTP {e.resp.status}: {reason} (credentials: the instance's service account "
                    "needs the compute-rw scope, or set GOOGLE_APPLICATION_CREDENTIALS)"
                ) from None
            raise BackendError(f"gce: {what}: HTTP {e.resp.status}: {reason}") from None
        except GoogleAuthError as e:
            raise BackendError(f"gce: {what}: credentials: {e}") from None
        except (OSError, TimeoutError) as e:
            raise BackendError(f"gce: {what}: {e}") from None

    def discover(self) -> GceInstance:
        md = self._metadata()
        project = md.request("project/project-id").strip()
        zone = basename(md.request("instance/zone"))
        try:
            name = md.request("instance/name").strip()
        except BackendError:  # flannel took the hostname's first label
            name = md.request("instance/hostname").split(".", 1)[0]
        network = basename(md.request("instance/network-interfaces/0/network"))
        self.compute = self._client(self._credentials(md))
        inst = GceInstance(project, zone, name, network)
        net = self._do(f"getting network {network}", self.compute.networks().get(project=project, network=network))
        found = self._do(
            f"getting instance {name}", self.compute.instances().get(project=project, zone=zone, instance=name)
        )
        inst.network_link, inst.instance_link = net["selfLink"], found["selfLink"]
        if found.get("canIpForward") is False:
            logger.warning("gce: instance {} was created without --can-ip-forward: GCE drops forwarded packets", name)
        return inst

    def prepare(self, ext: ExternalInterface) -> LeaseAttrs:
        # a host outside GCE or without credentials fails here, before a lease is taken: one line, exit 1
        self.instance = self.discover()
        logger.info(
            "gce: instance {} in project {} zone {}, network {}",
            self.instance.name, self.instance.project, self.instance.zone, self.instance.network,
        )  # fmt: skip
        # flannel's gce lease carries only the PublicIP (no BackendType): the udp shape
        return LeaseAttrs(public_ip=ext.public_ip, backend_type="udp", backend_data=None)

    # ------------------------------------------------------------------------------------------------
    # routes

    def _wait(self, what: str, operation: dict[str, Any]) -> None:
        """Routes' insert and delete return a global operation: poll it until DONE, then check its error."""
        inst = self._inst()
        deadline, delay = time.monotonic() + OPERATION_TIMEOUT, 0.2
        while operation.get("status") != "DONE":
            if time.monotonic() > deadline:
                raise BackendError(
                    f"gce: {what}: operation {operation.get('name')} not done after {OPERATION_TIMEOUT:.0f} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
            operation = self._do(
                f"{what}: polling its operation",
                self.compute.globalOperations().get(project=inst.project, operation=operation["name"]),
            )
        errors = (operation.get("error") or {}).get("errors") or []
        if errors:
            text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
            if any(e.get("code") == "QUOTA_EXCEEDED" for e in errors):
                raise BackendNotReady(
                    f"gce: {what}: the project's route quota is exhausted ({text}); GCE allows 100 routes per "
                    "project by default: raise the quota or use fewer hosts"
                )
            raise BackendError(f"gce: {what}: {text}")

    def _get_route(self, name: str) -> dict[str, Any] | None:
        from googleapiclient.errors import HttpError

        inst = self._inst()
        route: dict[str, Any] | None
        try:
            route = self.compute.routes().get(project=inst.project, route=name).execute(num_retries=2)
        except HttpError as e:
            if e.resp.status == 404:
                return None
            route = self._do(f"getting route {name}", self.compute.routes().get(project=inst.project, route=name))
        return route

    def _delete(self, name: str, why: str) -> None:
        inst = self._inst()
        from googleapiclient.errors import HttpError

        try:
            op = self.compute.routes().delete(project=inst.project, route=name).execute(num_retries=2)
        except HttpError as e:
            if e.resp.status == 404:
                return
            raise BackendError(f"gce: deleting route {name}: HTTP {e.resp.status}: {e.reason}") from None
        self._wait(f"deleting route {name}", op)
        logger.info("gce: removed route {}: {}", name, why)
        self.removed = [*self.removed, f"{name} ({why})"][-20:]

    def _ensure_own_route(self) -> None:
        inst, local = self._inst(), self._local()
        name = route_name(local.subnet)
        route = self._get_route(name)
        if route is not None:
            if resource_path(route.get("nextHopInstance", "")) == resource_path(inst.instance_link):
                return
            logger.warning("gce: route {} pointed at {}: replacing it", name, route.get("nextHopInstance") or "?")
            self._delete(name, "it pointed elsewhere; this host holds the lease")
        body = {
            "name": name,
            "destRange": str(local.subnet),
            "network": inst.network_link,
            "nextHopInstance": inst.instance_link,
            "priority": ROUTE_PRIORITY,
            "tags": [],
        }
        op = self._do(f"inserting route {name}", self.compute.routes().insert(project=inst.project, body=body))
        self._wait(f"inserting route {name}", op)
        logger.info("gce: route {} added: {} -> instance {}", name, local.subnet, inst.name)

    def _flannel_routes(self) -> list[dict[str, Any]]:
        """flannel-named routes in our network."""
        inst = self._inst()
        routes: list[dict[str, Any]] = []
        request = self.compute.routes().list(project=inst.project, filter='name eq "flannel-.*"')
        while request is not None:
            page = self._do("listing routes", request)
            routes += page.get("items", [])
            request = self.compute.routes().list_next(request, page)
        ours = resource_path(inst.network_link)
        return [r for r in routes if resource_path(r.get("network", "")) == ours and r["name"].startswith("flannel-")]

    def _clean_stale(self) -> None:
        local = self._local()
        for route in self._flannel_routes():
            try:
                dest = ip_network(route.get("destRange", ""))
            except ValueError:
                continue
            if dest == local.subnet or not dest.subnet_of(local.network):  # type: ignore[arg-type]
                continue
            if any(w.get("code") == "NEXT_HOP_INSTANCE_NOT_FOUND" for w in route.get("warnings", [])):
                self._delete(route["name"], "its instance is gone")

    def sync(self, peers: list[Lease]) -> None:
        self.peers = {p.subnet: p for p in peers}
        try:
            self._clean_stale()
            self._ensure_own_route()
        except BackendError as e:
            self.problem = str(e)
            raise
        self.problem = ""

    def add_peer(self, lease: Lease) -> None:
        self.peers[lease.subnet] = lease  # each host writes its own route

    def remove_peer(self, lease: Lease) -> None:
        self.peers.pop(lease.subnet, None)
        if lease.subnet == self._local().subnet:
            return
        name = route_name(lease.subnet)
        route = self._get_route(name)
        if route is None or route.get("destRange") != str(lease.subnet):
            return
        if self._instance_holds(route.get("nextHopInstance", ""), str(lease.public_ip)):
            self._delete(name, f"the lease of {lease.public_ip} is gone")
        else:
            logger.info("gce: lease {} is gone but route {} points at {}: left alone", lease.subnet, name,
                        route.get("nextHopInstance") or "no instance")  # fmt: skip

    def _instance_holds(self, link: str, address: str) -> bool:
        """Whether the instance of this selfLink has this internal address, or no longer exists."""
        from googleapiclient.errors import HttpError

        parts = resource_path(link).split("/")  # projects/P/zones/Z/instances/I
        if len(parts) != 6 or parts[2] != "zones" or parts[4] != "instances":
            return False
        try:
            found = self.compute.instances().get(project=parts[1], zone=parts[3], instance=parts[5]).execute()
        except HttpError as e:
            if e.resp.status == 404:
                return True
            raise BackendError(f"gce: getting instance {parts[5]}: HTTP {e.resp.status}") from None
        return any(n.get("networkIP") == address for n in found.get("networkInterfaces", []))

    def teardown(self, local: LocalNetwork | None) -> None:
        if local is None:
            return
        try:
            if self.instance is None:
                self.instance = self.discover()
            self.local = local
            route = self._get_route(route_name(local.subnet))
            if route and resource_path(route.get("nextHopInstance", "")) == resource_path(self._inst().instance_link):
                self._delete(route_name(local.subnet), "flannel-ebpf down")
        except BackendError as e:
            logger.error("gce: teardown: {}", e)

    def status(self) -> dict[str, Any]:
        inst = self.instance
        return {
            "type": self.type_name,
            "project": inst.project if inst else None,
            "zone": inst.zone if inst else None,
            "instance": inst.name if inst else None,
            "network": inst.network if inst else None,
            "own_route": route_name(self.local.subnet) if self.local else None,
            "peers": len(self.peers),
            "routes_removed": self.removed,
            "problem": self.problem,
        }

    def _inst(self) -> GceInstance:
        return self.required(self.instance if self.compute is not None else None)

    def _local(self) -> LocalNetwork:
        return self.required(self.local, "start()")

    def start(self, local: LocalNetwork) -> None:
        self.local = local
        self._inst()
