"""--etcd-cafile/--etcd-certfile/--etcd-keyfile and --etcd-username/--etcd-password against a real etcd
that serves TLS only, with client certificates and authentication on (loopback, a throwaway CA)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_ebpf.agent import Agent
from flannel_ebpf.lab.etcd import free_port
from flannel_ebpf.network import FatalError
from flannel_ebpf.options import AgentOptions
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.manager import LeaseOptions
from flannel_ebpf.subnet.registry import SubnetRegistry
from flannel_ebpf.subnet.store import EtcdTLS

pytestmark = pytest.mark.skipif(not shutil.which("openssl") or not shutil.which("etcd"), reason="needs openssl, etcd")


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(d: str) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)  # fmt: skip
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip


@pytest.fixture
def tls_etcd(tmp_path):
    d = str(tmp_path)
    make_pki(d)
    port, peer = free_port(), free_port()
    url = f"https://127.0.0.1:{port}"
    tls = ["--cacert", f"{d}/ca.crt", "--cert", f"{d}/client.crt", "--key", f"{d}/client.key"]
    log = open(f"{d}/etcd.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        ["etcd", "--name", "tls", "--data-dir", f"{d}/data", "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"tls=http://127.0.0.1:{peer}", "--cert-file", f"{d}/server.crt",
         "--key-file", f"{d}/server.key", "--trusted-ca-file", f"{d}/ca.crt", "--client-cert-auth",
         "--log-level", "error"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip

    def ctl(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "ETCDCTL_API": "3"}
        return subprocess.run(["etcdctl", "--endpoints", url, *tls, *args], env=env, capture_output=True,
                              text=True, timeout=15, check=False)  # fmt: skip

    try:
        deadline = time.monotonic() + 20
        while ctl("endpoint", "health").returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "etcd.log").read_text()
            time.sleep(0.2)
        for args in (("user", "add", "root:s3cret"), ("auth", "enable")):
            r = ctl(*args)
            assert r.returncode == 0, r.stderr
        yield url, d
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_tls_client_certs_and_auth(tls_etcd):
    url, d = tls_etcd
    tls = EtcdTLS(cafile=f"{d}/ca.crt", certfile=f"{d}/client.crt", keyfile=f"{d}/client.key")

    async def body():
        reg = SubnetRegistry([url], "/coreos.com/network", tls=tls, username="root", password="s3cret")
        try:
            got = await reg.create_lease(IPv4Network("10.5.3.0/24"), LeaseAttrs(IPv4Address("192.168.1.1")), 60)
            assert got is not None
            listing = await reg.list_leases()
            assert [lease.subnet for lease in listing.leases] == [IPv4Network("10.5.3.0/24")]
        finally:
            await reg.close()
        # Wrong password: refused, and said so (no silent success).
        bad = SubnetRegistry([url], "/coreos.com/network", tls=tls, username="root", password="wrong")
        try:
            with pytest.raises(Exception, match=r"(?i)auth"):
                await bad.list_leases()
        finally:
            await bad.close()

    asyncio.run(asyncio.wait_for(body(), 60))


def agent_for(endpoint: str, state_dir, tls: EtcdTLS, username: str = "", password: str = "") -> Agent:
    options = AgentOptions(
        etcd_endpoints=[endpoint], etcd_tls=tls, etcd_username=username, etcd_password=password,
        state_dir=str(state_dir),
    )  # fmt: skip
    options.lease = LeaseOptions(retry_interval=0.1, retry_max=0.2)
    return Agent(options)


def fatal_line(agent: Agent) -> str:
    """What the agent says when it gives up reading the config: one line (FatalError), within seconds."""

    async def body() -> str:
        reg = agent.options.registry()
        try:
            with pytest.raises(FatalError) as info:
                await asyncio.wait_for(agent.wait_for_config(reg), 20)
        finally:
            await reg.close()
        return str(info.value)

    line = asyncio.run(body())
    assert "\n" not in line and "Traceback" not in line
    return line


@pytest.fixture
def other_pki(tmp_path):
    d = tmp_path / "other-pki"
    d.mkdir()
    make_pki(str(d))
    return str(d)


def test_tls_misconfiguration_is_one_line_naming_the_cause(tls_etcd, other_pki, tmp_path):
    """Issue 15 part 6: each mistake is one line that names it, at once, never "etcd unavailable" forever."""
    url, d = tls_etcd
    ca, cert, key = f"{d}/ca.crt", f"{d}/client.crt", f"{d}/client.key"
    cases = {
        "wrong CA": (EtcdTLS(f"{other_pki}/ca.crt", cert, key), f"not signed by the CA in --etcd-cafile {other_pki}"),
        "no client certificate": (EtcdTLS(ca), "requires a TLS client certificate and none was given"),
        "client certificate of another CA": (
            EtcdTLS(ca, f"{other_pki}/client.crt", f"{other_pki}/client.key"),
            f"refused the TLS client certificate {other_pki}/client.crt",
        ),
        "https without any TLS file": (EtcdTLS(), "none of the system's CAs trusts"),
    }
    for name, (tls, expected) in cases.items():
        started = time.monotonic()
        line = fatal_line(agent_for(url, tmp_path, tls))
        print(f"{name} ({time.monotonic() - started:.1f}s): {line}")
        assert expected in line and url in line, f"{name}: {line}"
    # Right certificates, wrong password: the same one line as over plaintext.
    line = fatal_line(agent_for(url, tmp_path, EtcdTLS(ca, cert, key), "root", "wrong"))
    print(f"wrong password over TLS: {line}")
    assert "authentication failed" in line and "--etcd-password" in line


def test_https_to_a_plaintext_etcd_never_falls_back(etcd, tmp_path):
    """An https:// endpoint whose etcd speaks plaintext: refused in one line; no plaintext fallback."""
    url = etcd.endpoint.replace("http://", "https://")
    etcd.ctl("put", "/coreos.com/network/config", '{"Network": "10.5.0.0/16"}')
    line = fatal_line(agent_for(url, tmp_path, EtcdTLS()))
    print(line)
    assert "does not speak TLS" in line and url in line
