"""Local servers for the cloud backends' tests. Everything listens on 127.0.0.1 only, and only processes
started here are ever stopped (by their PID).

- `MotoServer`: moto's EC2 server (`moto_server`, PyPI `moto[server]`), a real HTTP server process that
  implements the EC2 API. The aws-vpc backend talks to it with boto3, unchanged. `with MotoServer() as
  moto:` runs one for the block (the aws-vpc tests' `moto` fixtures).
- `AwsMetadataStandIn`: a stand-in for the EC2 instance metadata service (IMDS), which moto does not
  serve: IMDSv2's token, instance-id, placement/region and availability-zone, mac, and the interface's
  entries under network/interfaces/macs/ (interface-id, subnet-id, vpc-id, local-ipv4s).
- `GceStandIn` (in tests/gce_standin.py): a stand-in for the GCE metadata server and the Compute API's
  routes, operations, networks and instances resources; no GCE emulator exists.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from flannel_ebpf.lab.etcd import free_port
from flannel_ebpf.lab.netns import stop_process


def moto_server_binary() -> str:
    """`moto_server` from the venv running the tests (make setup installs moto[server] there)."""
    import sys

    beside = os.path.join(os.path.dirname(sys.executable), "moto_server")
    found = beside if os.path.exists(beside) else shutil.which("moto_server")
    if not found:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]'; make setup does)")
    return found


@dataclass
class MotoServer:
    """One `moto_server` process on 127.0.0.1. `auth`: enforce IAM authentication from the first request
    (moto's INITIAL_NO_AUTH_ACTION_COUNT=0), so unknown credentials are refused as AWS refuses them."""

    auth: bool = False
    port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.port = self.port or free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen(
            [moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("moto_server did not start listening")

    def enforce_iam(self, on: bool) -> None:
        """Turn moto's IAM enforcement on (every request must be signed by an IAM user's access key and be
        allowed by that user's policies) or off (moto's `reset-auth`: the count of requests let through
        unchecked), e.g. off to set up a VPC and IAM users, on while the code under test runs."""
        import urllib.request

        body = b"0" if on else b"1e18"
        # not form-encoded (urllib's default type): moto reads the raw body
        request = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5)
            self.proc = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@dataclass
class HttpStandIn:
    """A tiny HTTP server on 127.0.0.1 in a thread: subclasses answer `handle(method, path, headers, body)`."""

    server: _Server | None = field(default=None, repr=False)
    requests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, str]:
        raise NotImplementedError

    def start(self) -> HttpStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def _do(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                standin.requests.append((self.command, self.path))
                status, ctype, text = standin.handle(self.command, self.path, self.headers, body)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                if ctype == "application/text" or self.path.startswith("/computeMetadata"):
                    self.send_header("Metadata-Flavor", "Google")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _do

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@dataclass
class AwsMetadataStandIn(HttpStandIn):
    """A stand-in for the EC2 instance metadata service of one instance (IMDSv2: token required)."""

    instance_id: str = ""
    region: str = "us-east-1"
    zone: str = "us-east-1a"
    mac: str = "02:00:00:00:00:01"
    subnet_id: str = ""
    eni_id: str = ""
    vpc_id: str = ""
    local_ipv4: str = ""
    token: str = "stand-in-token"

    def handle(self, method: str, path: str, headers: Any, body: bytes) -> tuple[int, str, str]:
        if path == "/latest/api/token":
            if method != "PUT" or not headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                return 400, "text/plain", "bad token request"
            return 200, "text/plain", self.token
        if headers.get("X-aws-ec2-metadata-token") != self.token:
            return 401, "text/plain", "unauthorized"
        macs = "/latest/meta-data/network/interfaces/macs/"
        meta = {
            "/latest/meta-data/instance-id": self.instance_id,
            "/latest/meta-data/placement/region": self.region,
            "/latest/meta-data/placement/availability-zone": self.zone,
            "/latest/meta-data/mac": self.mac,
            macs: f"{self.mac}/",
            f"{macs}{self.mac}/subnet-id": self.subnet_id,
            f"{macs}{self.mac}/interface-id": self.eni_id,
            f"{macs}{self.mac}/vpc-id": self.vpc_id,
            f"{macs}{self.mac}/local-ipv4s": self.local_ipv4,
        }
        if meta.get(path):  # an entry this instance has (a value given)
            return 200, "text/plain", meta[path]
        return 404, "text/plain", "not found"


def silent_listener() -> tuple[socket.socket, str]:
    """A port that accepts connections and never answers: what a dropped metadata request looks like."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"
