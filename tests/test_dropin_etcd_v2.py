"""The etcd v2 hint's pieces that need no etcd: the copy command for every kind of endpoint, a probe
that finds nothing where nothing answers, and the lease sources' v2_config_hint (etcd's asks a stand-in
for etcd's v2 HTTP API; the remote one has nothing to ask). (The lab test runs the command against a
real etcd.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flannel_ebpf.lab.etcd import free_port
from flannel_ebpf.remote.client import RemoteRegistry
from flannel_ebpf.subnet.etcd_v2 import V2Config, copy_command, find_v2_config, hint
from flannel_ebpf.subnet.registry import SubnetRegistry
from flannel_ebpf.subnet.store import EtcdTLS, base_url, endpoint_tls
from tests.test_etcd_tls import make_pki

KEY = "/coreos.com/network/config"


def test_copy_command_plaintext():
    assert copy_command("http://10.0.0.1:2379", KEY) == (
        f"ETCDCTL_API=2 etcdctl --endpoints=http://10.0.0.1:2379 get {KEY} | "
        f"ETCDCTL_API=3 etcdctl --endpoints=http://10.0.0.1:2379 put {KEY}"
    )


def test_copy_command_names_tls_files_and_user_as_each_etcdctl_wants_them():
    tls = EtcdTLS(cafile="/etc/ca.pem", certfile="/etc/c.pem", keyfile="/etc/k.pem")
    cmd = copy_command("https://e:2379", "/my net/config", tls, "flannel")
    get, put = cmd.split(" | ")
    assert get == (
        "ETCDCTL_API=2 etcdctl --endpoints=https://e:2379 --ca-file=/etc/ca.pem --cert-file=/etc/c.pem "
        "--key-file=/etc/k.pem --username=flannel get '/my net/config'"
    )
    assert put == (
        "ETCDCTL_API=3 etcdctl --endpoints=https://e:2379 --cacert=/etc/ca.pem --cert=/etc/c.pem "
        "--key=/etc/k.pem --user=flannel put '/my net/config'"
    )


def test_hint_is_one_line_with_the_command():
    text = hint(V2Config("http://e:2379", KEY, '{"Network":"10.5.0.0/16"}'))
    assert "\n" not in text and text.endswith(copy_command("http://e:2379", KEY))
    assert text.startswith(f"no network config at {KEY} in etcd v3, but etcd's v2 store at http://e:2379 has one")


def test_probe_finds_nothing_where_nothing_answers_and_does_not_linger():
    began = time.monotonic()
    assert find_v2_config([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"], KEY) is None
    assert time.monotonic() - began < 3


@contextmanager
def v2_store(value: str) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server answering etcd v2's GET /v2/keys<KEY> with `value`: its endpoint, and the
    Authorization headers it was sent."""
    auth: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            auth.append(self.headers.get("Authorization", ""))
            found = self.path == f"/v2/keys{KEY}"
            body = json.dumps({"node": {"key": KEY, "value": value}} if found else {"errorCode": 100}).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", auth
    finally:
        server.shutdown()
        server.server_close()


def test_etcd_registry_hint_names_the_endpoint_holding_the_v2_config_and_the_command():
    with v2_store('{"Network":"10.5.0.0/16"}') as (endpoint, auth):
        dead = f"http://127.0.0.1:{free_port()}"
        registry = SubnetRegistry([dead, endpoint], username="flannel", password="secret")
        text = asyncio.run(registry.v2_config_hint())
    assert text == hint(V2Config(endpoint, KEY, '{"Network":"10.5.0.0/16"}'), None, "flannel")
    assert auth == ["Basic Zmxhbm5lbDpzZWNyZXQ="]  # flannel:secret, as the v2 API takes etcd's users
    assert registry.lost_reason == ""


def test_etcd_registry_hint_is_empty_where_no_v2_store_has_the_config():
    registry = SubnetRegistry([f"http://127.0.0.1:{free_port()}"])
    assert asyncio.run(registry.v2_config_hint()) == ""


def test_remote_registry_has_no_v2_store_to_ask():
    registry = RemoteRegistry(f"127.0.0.1:{free_port()}")
    assert asyncio.run(registry.v2_config_hint()) == ""
    assert registry.lost_reason == ""  # nothing asked yet: nothing lost


# --- the probe makes the gRPC client's TLS decision (it carries the etcd password) ----------------------


@contextmanager
def raw_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A plaintext TCP listener on loopback that records the first bytes of every connection and answers
    nothing: what a man in the middle of a plaintext etcd endpoint would read."""
    received: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(1.0)
                data = b""
                with contextlib.suppress(OSError):
                    while len(data) < 8192 and (chunk := conn.recv(8192)):
                        data += chunk
                        if b"\r\n\r\n" in data:  # a whole plaintext HTTP request head
                            break
                received.append(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], received
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("pki")
    make_pki(str(d))
    return f"{d}/ca.crt"


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "http://127.0.0.1:{port}"])
def test_probe_with_tls_files_never_sends_the_password_in_plaintext(form, ca_file):
    """--etcd-cafile makes the gRPC client use TLS at an http:// or bare endpoint: the v2 probe, which
    carries the password as HTTP basic auth, must do the same (it used to send it in clear)."""
    with raw_listener() as (port, received):
        endpoint = form.format(port=port)
        registry = SubnetRegistry([endpoint], tls=EtcdTLS(cafile=ca_file), username="flannel", password="s3cret")
        assert registry.tls_for(endpoint) is not None  # the gRPC side's decision: TLS
        assert asyncio.run(registry.v2_config_hint()) == ""
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    assert received, "the probe never connected: the test proves nothing"
    token = base64.b64encode(b"flannel:s3cret")
    for data in received:
        assert b"Authorization" not in data and token not in data and b"s3cret" not in data
        assert not data.startswith(b"GET "), "a plaintext HTTP request"
        assert data[:1] == b"\x16", f"not a TLS handshake: {data[:40]!r}"  # a TLS record: handshake


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:2379", "http://127.0.0.1:2379", "https://127.0.0.1:2379", "http://[::1]:2379"]
)
@pytest.mark.parametrize("tls", [None, EtcdTLS(), EtcdTLS(cafile="/ca.pem"), EtcdTLS(certfile="/c", keyfile="/k")])
def test_probe_url_and_grpc_client_make_one_tls_decision(endpoint, tls):
    registry = SubnetRegistry([endpoint], tls=tls)
    grpc_tls = registry.tls_for(endpoint)
    assert grpc_tls == endpoint_tls(endpoint, tls)
    assert base_url(endpoint, tls).startswith("https://" if grpc_tls is not None else "http://")
    assert (grpc_tls is not None) == (endpoint.startswith("https://") or bool(tls and tls.enabled))


def test_copy_command_names_the_endpoint_as_tls_reaches_it():
    tls = EtcdTLS(cafile="/etc/ca.pem")
    assert copy_command("10.0.0.1:2379", KEY, tls).startswith(
        "ETCDCTL_API=2 etcdctl --endpoints=https://10.0.0.1:2379 --ca-file=/etc/ca.pem get"
    )
