"""Is the network config in etcd's v2 store? The hint for a config written the etcd-v2 way.

flannel's etcd-era tutorials write the config with `etcdctl set` (the v2 API). etcd 3.x keeps v2 and v3
keys apart, and flannel-ebpf (as flanneld v0.20.2) reads only v3: without a hint the agent
would wait for a config the operator believes is there. etcd 3.4 and 3.5 serve the v2 API over HTTP at
`<client URL>/v2/keys/<key>` when started with `--enable-v2` (3.6 removed it): one GET per endpoint
tells whether the config is there.

Blocking (urllib), short timeouts: SubnetRegistry.v2_config_hint runs `find_v2_config` in a thread.
TLS or not is decided exactly as for the gRPC client (store.endpoint_tls): the probe carries the etcd
password, so it never goes out in plaintext where the gRPC client would use TLS.
"""

from __future__ import annotations

import base64
import json
import shlex
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from flannel_ebpf.subnet.store import EtcdTLS, base_url, endpoint_tls, ssl_context

#: the probe is a hint only: never hold the agent up for long on an endpoint that does not answer
PROBE_TIMEOUT = 2.0
#: a v2 answer is a small JSON document; anything bigger is not what we look for
MAX_ANSWER_BYTES = 256 * 1024


@dataclass(frozen=True)
class V2Config:
    endpoint: str  # the endpoint whose v2 store holds the key
    key: str
    value: str


def probe_endpoint(
    endpoint: str,
    key: str,
    tls: EtcdTLS | None = None,
    username: str = "",
    password: str = "",
    timeout: float = PROBE_TIMEOUT,
) -> str | None:
    """The v2 value of `key` at `endpoint`; None when the key or the v2 API is not there (etcd answers
    404 for both) or the endpoint does not answer. `tls`: the --etcd-*file options, as the gRPC client
    gets them (TLS for https:// and, once a file is given, for every endpoint)."""
    use_tls = endpoint_tls(endpoint, tls)
    url = f"{base_url(endpoint, tls)}/v2/keys{urllib.parse.quote(key)}"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if username:  # the v2 API takes the same users, as HTTP basic auth
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        context = ssl_context(use_tls)
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            doc = json.loads(answer.read(MAX_ANSWER_BYTES))
    except (OSError, ValueError, ssl.SSLError, urllib.error.URLError):
        return None  # HTTPError (404, 401, ...) is an OSError too: no hint to give
    node = doc.get("node") if isinstance(doc, dict) else None
    value = node.get("value") if isinstance(node, dict) else None
    return value if isinstance(value, str) and value.strip() else None


def find_v2_config(
    endpoints: list[str],
    key: str,
    tls: EtcdTLS | None = None,
    username: str = "",
    password: str = "",
    timeout: float = PROBE_TIMEOUT,
) -> V2Config | None:
    """The first endpoint whose v2 store has `key` (None: none has it, or none answered)."""
    for endpoint in endpoints:
        value = probe_endpoint(endpoint, key, tls, username, password, timeout)
        if value is not None:
            return V2Config(endpoint=endpoint, key=key, value=value)
    return None


def copy_command(endpoint: str, key: str, tls: EtcdTLS | None = None, username: str = "") -> str:
    """The one shell line that copies `key` from etcd's v2 store to v3 (etcdctl 3.4/3.5: `put` reads
    the value from stdin when none is given; each etcdctl asks for the password when --user has none)."""
    # the endpoint as the agent reaches it: https:// where the TLS files make it TLS
    shown = base_url(endpoint, tls) if endpoint_tls(endpoint, tls) is not None else endpoint
    v2 = ["ETCDCTL_API=2", "etcdctl", f"--endpoints={shown}"]
    v3 = ["ETCDCTL_API=3", "etcdctl", f"--endpoints={shown}"]
    if tls is not None and tls.enabled:  # the two APIs' etcdctl name the TLS files differently
        v2 += [f"--ca-file={tls.cafile}"] * bool(tls.cafile)
        v2 += [f"--cert-file={tls.certfile}"] * bool(tls.certfile) + [f"--key-file={tls.keyfile}"] * bool(tls.keyfile)
        v3 += [f"--cacert={tls.cafile}"] * bool(tls.cafile)
        v3 += [f"--cert={tls.certfile}"] * bool(tls.certfile) + [f"--key={tls.keyfile}"] * bool(tls.keyfile)
    if username:
        v2 += [f"--username={username}"]
        v3 += [f"--user={username}"]
    get = " ".join([*v2[:2], *map(shlex.quote, v2[2:]), "get", shlex.quote(key)])
    put = " ".join([*v3[:2], *map(shlex.quote, v3[2:]), "put", shlex.quote(key)])
    return f"{get} | {put}"


def hint(found: V2Config, tls: EtcdTLS | None = None, username: str = "") -> str:
    """The one line the agent logs and reports as its not-ready reason."""
    return (
        f"no network config at {found.key} in etcd v3, but etcd's v2 store at {found.endpoint} has one "
        f"(written with the v2 API, e.g. `etcdctl set`); flannel-ebpf, like flanneld v0.20.2, reads only v3; copy it "
        f"with: {copy_command(found.endpoint, found.key, tls, username)}"
    )
