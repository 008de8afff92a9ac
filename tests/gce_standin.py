"""`GceStandIn`: a stand-in for the GCE metadata server and the parts of the Compute Engine API v1 the gce
backend uses (no GCE emulator exists). One HTTP server on 127.0.0.1 serves both:

- the metadata server's paths under /computeMetadata/v1/ (header `Metadata-Flavor: Google` required, as
  the real one requires): project/project-id, instance/{zone,name,hostname}, the first interface's
  network, and the default service account's token;
- the Compute API under /compute/v1/ with the documented shapes of the routes (get, insert, delete,
  list), globalOperations (get), networks (get) and instances (get) resources: inserts and deletes
  return an operation that is RUNNING at first and DONE on a later poll, a missing resource is a 404
  error object, a route whose instance does not exist carries the NEXT_HOP_INSTANCE_NOT_FOUND warning,
  and the project's route quota (100 by default) fails an insert's operation with QUOTA_EXCEEDED.

Every request is recorded; tests/test_gce.py checks each recorded request's method and path, and each
inserted route's fields, against the Compute discovery document shipped in google-api-python-client, so
this stand-in cannot drift from the published API.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from tests.cloud_standins import HttpStandIn

BASE = "/compute/v1/"


@dataclass
class GceStandIn(HttpStandIn):
    project: str = "flannel-test"
    zone: str = "us-central1-a"
    network: str = "default"
    instance: str = ""  # the instance whose metadata is served
    token: str = "stand-in-access-token"  # what the metadata server hands out
    api_token: str = ""  # what the API accepts ("": the same): differ to play revoked credentials
    route_quota: int = 100
    #: name -> {networkIP}
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # route insert bodies as sent
    _ops: int = 0

    def link(self, path: str) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{self.project}/{path}"

    # ------------------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, str]:
        url = urllib.parse.urlsplit(path)
        # /host/<instance>/computeMetadata/v1/...: the metadata server as that instance sees it (several
        # hosts in one test share this one project)
        if m := re.fullmatch(r"(?:/host/([^/]+))?/computeMetadata/v1/(.*)", url.path):
            return self._metadata(m[2], headers, m[1] or self.instance)
        if url.path.startswith(BASE):
            if headers.get("Authorization") != f"Bearer {self.api_token or self.token}":
                return self._error(401, "Request had invalid authentication credentials.", "authError")
            query = urllib.parse.parse_qs(url.query)
            return self._compute(method, url.path[len(BASE) :], query, json.loads(body) if body else None)
        return 404, "text/plain", "not found"

    def metadata_root(self, instance: str) -> str:
        return f"{self.url}/host/{instance}"

    def _metadata(self, path: str, headers: Any, instance: str) -> tuple[int, str, str]:
        if headers.get("Metadata-Flavor") != "Google":
            return 403, "text/plain", "Missing Metadata-Flavor:Google header."
        values = {
            "project/project-id": self.project,
            "instance/zone": f"projects/123456789/zones/{self.zone}",
            "instance/name": instance,
            "instance/hostname": f"{instance}.{self.zone}.c.{self.project}.internal",
            "instance/network-interfaces/0/network": f"projects/123456789/networks/{self.network}",
            "instance/service-accounts/default/token": json.dumps(
                {"access_token": self.token, "expires_in": 3599, "token_type": "Bearer"}
            ),
        }
        if path in values:
            ctype = "application/json" if path.endswith("/token") else "application/text"
            return 200, ctype, values[path]
        return 404, "text/plain", "not found"

    def _json(self, value: Any, status: int = 200) -> tuple[int, str, str]:
        return status, "application/json", json.dumps(value)

    def _error(self, code: int, message: str, reason: str) -> tuple[int, str, str]:
        return self._json(
            {"error": {"code": code, "message": message, "errors": [{"reason": reason, "message": message}]}}, code
        )

    def _operation(self, kind: str, target: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        self._ops += 1
        op = {
            "kind": "compute#operation",
            "name": f"operation-{self._ops}",
            "operationType": kind,
            "targetLink": self.link(f"global/routes/{target}"),
            "status": "RUNNING",
            "selfLink": self.link(f"global/operations/operation-{self._ops}"),
            "_polls": 0,
            "_error": error,
        }
        self.operations[op["name"]] = op
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _route_view(self, route: dict[str, Any]) -> dict[str, Any]:
        view = dict(route)
        instance = route.get("nextHopInstance", "").rsplit("/", 1)[-1]
        if route.get("nextHopInstance") and instance not in self.instances:
            view["warnings"] = [{"code": "NEXT_HOP_INSTANCE_NOT_FOUND", "message": "instance gone"}]
        return view

    def _compute(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, str, str]:
        prefix = f"projects/{self.project}/"
        if not path.startswith(prefix):
            return self._error(404, f"project {path} not found", "notFound")
        rest = path[len(prefix) :]
        if m := re.fullmatch(r"global/networks/([^/]+)", rest):
            if method == "GET" and m[1] == self.network:
                return self._json({"kind": "compute#network", "name": m[1], "selfLink": self.link(rest)})
            return self._error(404, f"The resource '{rest}' was not found", "notFound")
        if m := re.fullmatch(r"zones/([^/]+)/instances/([^/]+)", rest):
            inst = self.instances.get(m[2])
            if method == "GET" and inst is not None and m[1] == self.zone:
                return self._json(
                    {
                        "kind": "compute#instance",
                        "name": m[2],
                        "selfLink": self.link(rest),
                        "canIpForward": True,
                        "networkInterfaces": [
                            {"networkIP": inst["networkIP"], "network": self.link(f"global/networks/{self.network}")}
                        ],
                    }
                )
            return self._error(404, f"The resource '{rest}' was not found", "notFound")
        if m := re.fullmatch(r"global/operations/([^/]+)", rest):
            op = self.operations.get(m[1])
            if method != "GET" or op is None:
                return self._error(404, f"The resource '{rest}' was not found", "notFound")
            op["_polls"] += 1
            if op["_polls"] >= 1:  # RUNNING when returned by insert/delete, DONE at the first poll
                op["status"] = "DONE"
                if op["_error"]:
                    op["error"] = op["_error"]
            return self._json({k: v for k, v in op.items() if not k.startswith("_")})
        if rest == "global/routes":
            if method == "GET":
                pattern = query.get("filter", [""])[0]
                m = re.fullmatch(r'name eq "(.*)"', pattern)
                items = [self._route_view(r) for n, r in sorted(self.routes.items()) if not m or re.fullmatch(m[1], n)]
                return self._json({"kind": "compute#routeList", "items": items})
            if method == "POST":
                self.bodies.append(body)
                name = body["name"]
                if name in self.routes:
                    return self._error(409, f"The resource '{rest}/{name}' already exists", "alreadyExists")
                if len(self.routes) >= self.route_quota:
                    error = {
                        "errors": [
                            {
                                "code": "QUOTA_EXCEEDED",
                                "message": f"Quota 'ROUTES' exceeded. Limit: {self.route_quota}.0 globally.",
                            }
                        ]
                    }
                    return self._json(self._operation("insert", name, error))
                self.routes[name] = {**body, "kind": "compute#route", "selfLink": self.link(f"global/routes/{name}")}
                return self._json(self._operation("insert", name))
        if m := re.fullmatch(r"global/routes/([^/]+)", rest):
            if m[1] not in self.routes:
                return self._error(404, f"The resource '{rest}' was not found", "notFound")
            if method == "GET":
                return self._json(self._route_view(self.routes[m[1]]))
            if method == "DELETE":
                del self.routes[m[1]]
                return self._json(self._operation("delete", m[1]))
        return self._error(404, f"{method} {rest}: not served by the stand-in", "notFound")
