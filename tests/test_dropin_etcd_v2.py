"""The etcd v2 hint's pieces that need no etcd: the copy command for every kind of endpoint, a probe
that finds nothing where nothing answers, and the lease sources' v2_config_hint (etcd's asks a stand-in
for etcd's v2 HTTP API; the remote one has nothing to ask). (The lab test runs the command against a
real etcd.)"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flannel_ebpf.lab.etcd import free_port
from flannel_ebpf.remote.client import RemoteRegistry
from flannel_ebpf.subnet.etcd_v2 import V2Config, copy_command, find_v2_config, hint
from flannel_ebpf.subnet.registry import EtcdTLS, SubnetRegistry

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
