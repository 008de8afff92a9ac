"""The lease server's own metrics (client/server mode): requests by route, method and status code, served
as `GET /metrics` on the server's listener. Apart from the agent's (flannel_ebpf.metrics) so that the lease
server, a control-plane process, imports nothing of the data path."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import Counter as PromCounter
from prometheus_client import Histogram as PromHistogram
from prometheus_client.exposition import choose_encoder

if TYPE_CHECKING:
    from aiohttp import web

#: every metric of the agent and of the lease server starts with it
PREFIX = "flannel_ebpf"


class LeaseApiMetrics:
    """Requests of the lease server by route (its pattern, e.g. `/v1/{network}/leases/{subnet}`), method and
    status code; also answers `GET /metrics` on the server's own listener. One per process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = PromCounter(
            f"{PREFIX}_lease_api_requests",
            "Requests to the lease server, by route, method and status code",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self.duration = PromHistogram(
            f"{PREFIX}_lease_api_request_duration_seconds",
            "How long the lease server took to answer (a watch: until it returned events)",
            ["route", "method"],
            registry=self.registry,
        )
        self.registry.register(ProcessCollector(namespace=PREFIX, registry=None))

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.registry), content_type

    @property
    def middleware(self) -> Any:
        from aiohttp import web

        @web.middleware
        async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
            if request.path == "/metrics" and request.method in ("GET", "HEAD"):
                body, content_type = self.render(request.headers.get("Accept"))
                return web.Response(body=body, headers={"Content-Type": content_type})
            route = _route_of(request)
            began, code = time.monotonic(), 500
            try:
                response = await handler(request)
                code = response.status
                return response
            except web.HTTPException as e:
                code = e.status
                raise
            finally:
                self.requests.labels(route, _method(request.method), str(code)).inc()
                self.duration.labels(route, _method(request.method)).observe(time.monotonic() - began)

        return count


def _route_of(request: web.Request) -> str:
    """The matched route's pattern (bounded); `other` for a path no route matched."""
    info = request.match_info
    resource = info.route.resource if info is not None and info.route is not None else None
    canonical = getattr(resource, "canonical", None) if resource is not None else None
    return canonical if isinstance(canonical, str) and canonical.startswith("/v1/") else "other"


def _method(method: str) -> str:
    return method if method in ("GET", "POST", "PUT", "DELETE", "HEAD") else "other"


LEASE_API = LeaseApiMetrics()
