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

from flannel_ebpf.lab.etcd import free_port
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.registry import EtcdTLS, SubnetRegistry

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
