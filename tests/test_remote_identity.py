"""Who may write which lease through the client/server API (issue 25, item 1), against a real etcd with the
server in-process on loopback: with mutual TLS a client writes only the leases of the IPv4 addresses in its
certificate's IP SANs, without it only those of its source address; a PublicIP holds one lease per network.
A refusal is 403 and leaves etcd's value and etcd lease untouched."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import aiohttp
import pytest

from flannel_ebpf.remote import wire
from flannel_ebpf.remote.server import ServerOptions, certificate_identity, serve, source_identity
from flannel_ebpf.subnet.registry import SubnetRegistry
from flannel_ebpf.subnet.store import EtcdTLS
from tests.test_remote_api import free_port
from tests.test_subnet_etcd import run

VICTIM, ATTACKER = "192.168.60.7", "192.168.60.8"
PAIR = ("192.168.60.21", "192.168.60.22")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(d: Path, server_ip: str, clients: dict[str, str]) -> None:
    """A CA, a server certificate for `server_ip`, and a client certificate `<name>.crt` per entry of
    `clients` with that subjectAltName ("" for none), all signed by the CA (EC keys: quick to make)."""
    d.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    for name, san in {"server": f"IP:{server_ip}", **clients}.items():
        openssl("req", *key, "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)
        ext = "extendedKeyUsage=serverAuth" if name == "server" else "extendedKeyUsage=clientAuth"
        (d / f"{name}.ext").write_text(ext + "\n" + (f"subjectAltName={san}\n" if san else ""))
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_pki(d, "127.0.0.1", {
        "victim": f"IP:{VICTIM}",
        "attacker": f"IP:{ATTACKER},DNS:node-8.example",
        "pair": f"IP:{PAIR[0]},IP:{PAIR[1]}",
        "nosan": "",
        "v6only": "IP:fd00::7,DNS:node-7.example",
    })  # fmt: skip
    return d


@pytest.fixture
def prefix(etcd):
    p = f"/test-{uuid.uuid4().hex[:8]}/network"
    etcd.ctl("put", f"{p}/config", '{"Network": "10.5.0.0/22", "Backend": {"Type": "vxlan"}}')
    return p


@dataclass(frozen=True)
class Record:
    """A lease key as etcd holds it: the exact value bytes and the etcd lease it is attached to."""

    value: bytes
    lease_id: int
    granted_ttl: int
    remaining_ttl: int
    read_at: float


def etcd_record(ctl: Callable[..., str], key: str) -> Record | None:
    got = json.loads(ctl("get", key, "-w", "json")).get("kvs") or []
    if not got:
        return None
    lease_id = int(got[0].get("lease", 0))
    ttl = json.loads(ctl("lease", "timetolive", f"{lease_id:x}", "-w", "json"))
    assert "granted-ttl" in ttl, ttl
    return Record(base64.b64decode(got[0]["value"]), lease_id, int(ttl["granted-ttl"]), int(ttl["ttl"]), time.time())


def assert_untouched(before: Record, after: Record | None) -> None:
    """Same bytes, same etcd lease, granted the same TTL and counting down since (not renewed, not moved)."""
    assert after is not None, "the victim's lease is gone"
    assert after.value == before.value, (before.value, after.value)
    assert (after.lease_id, after.granted_ttl) == (before.lease_id, before.granted_ttl), (before, after)
    elapsed = after.read_at - before.read_at
    assert before.remaining_ttl - elapsed - 2 <= after.remaining_ttl <= before.remaining_ttl, (before, after, elapsed)


def client_ssl(pki: Path, name: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    return ctx


@contextlib.asynccontextmanager
async def server(etcd, prefix, *, pki: Path | None = None, trust_any_client: bool = False):
    """The server on 127.0.0.1 (mutual TLS with `pki`, else plain HTTP); yields its base URL."""
    port = free_port()
    stop = asyncio.Event()
    tls = EtcdTLS()
    if pki is not None:
        tls = EtcdTLS(cafile=str(pki / "ca.crt"), certfile=str(pki / "server.crt"), keyfile=str(pki / "server.key"))
    options = ServerOptions(listen=f"127.0.0.1:{port}", tls=tls, ttl=600, trust_any_client=trust_any_client)
    task = asyncio.ensure_future(serve(lambda p: SubnetRegistry([etcd.endpoint], p), prefix, options, stop))
    for _ in range(100):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            break
        await asyncio.sleep(0.05)
    try:
        yield f"{'https' if pki else 'http'}://127.0.0.1:{port}/v1"
    finally:
        stop.set()
        assert await task == 0


def session(pki: Path | None = None, name: str = "") -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(pki, name) if pki else False))


def attrs(public_ip: str, mac: str = "aa:bb:cc:dd:ee:07") -> dict:
    return {"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}}


async def call(http: aiohttp.ClientSession, method: str, url: str, body=None) -> tuple[int, str]:
    async with http.request(method, url, json=body) as r:
        return r.status, await r.text()


def assert_refused(got: tuple[int, str], *names: str) -> None:
    status, text = got
    assert status == 403, got
    assert text.endswith("\n") and text.count("\n") == 1, f"not one line: {text!r}"
    for name in names:
        assert name in text, (name, text)


def test_attacker_with_a_certificate_for_another_address_cannot_touch_a_victims_lease(etcd, prefix, pki, logs):
    async def main():
        async with server(etcd, prefix, pki=pki) as base:
            async with session(pki, "victim") as victim, session(pki, "attacker") as attacker:
                # flanneld v0.5's client: path.Join drops the trailing slash of /v1/_/leases/
                status, text = await call(victim, "POST", f"{base}/_/leases", attrs(VICTIM))
                assert status == 200, text
                lease = json.loads(text)
                key = f"{prefix}/subnets/{lease['Subnet'].replace('/', '-')}"
                before = etcd_record(etcd.ctl, key)
                assert before is not None and b'"aa:bb:cc:dd:ee:07"' in before.value
                keys_before = etcd.ctl("get", f"{prefix}/subnets/", "--prefix", "--keys-only")

                stolen = attrs(VICTIM, mac="aa:bb:cc:dd:ee:08")
                for path in ("leases", "leases/"):
                    got = await call(attacker, "POST", f"{base}/_/{path}", stolen)
                    assert_refused(got, "CN=attacker", ATTACKER, f"PublicIP {VICTIM}")
                url = f"{base}/_/leases/{lease['Subnet'].replace('/', '-')}"
                got = await call(attacker, "PUT", f"{url}?ttl=10", {**lease, "Attrs": stolen})
                assert_refused(got, "CN=attacker", VICTIM)
                got = await call(attacker, "DELETE", f"{url}?PublicIP={VICTIM}")
                assert_refused(got, "CN=attacker", VICTIM)
                for i in range(5):  # made-up addresses: the drain of a /22 the issue reproduced
                    assert_refused(await call(attacker, "POST", f"{base}/_/leases", attrs(f"192.168.61.{i + 1}")))
                # reads stay open to every authenticated client
                assert (await call(attacker, "GET", f"{base}/_/config"))[0] == 200
                status, text = await call(attacker, "GET", f"{base}/_/leases")
                assert status == 200 and VICTIM in text

                await asyncio.sleep(1.1)  # a moved or renewed etcd lease would show in the remaining TTL
                assert_untouched(before, etcd_record(etcd.ctl, key))
                assert etcd.ctl("get", f"{prefix}/subnets/", "--prefix", "--keys-only") == keys_before
                refusals = [line for line in logs if "may not write leases" in line]
                assert len(refusals) == 9 and all(line.startswith("WARNING") for line in refusals), refusals

                # the attacker's own address works; the victim still renews and releases its own lease
                status, text = await call(attacker, "POST", f"{base}/_/leases", attrs(ATTACKER, "aa:bb:cc:dd:ee:08"))
                assert status == 200 and json.loads(text)["Subnet"] != lease["Subnet"], text
                status, text = await call(victim, "PUT", f"{url}?ttl=30", lease)
                assert status == 200, text
                renewed = etcd_record(etcd.ctl, key)
                assert renewed is not None and renewed.granted_ttl == 30
                assert (await call(victim, "DELETE", f"{url}?PublicIP={VICTIM}"))[0] == 200
                assert etcd_record(etcd.ctl, key) is None

            for name in ("nosan", "v6only"):  # a certificate that names no IPv4 address writes nothing
                async with session(pki, name) as other:
                    got = await call(other, "POST", f"{base}/_/leases", attrs(VICTIM))
                    assert_refused(got, f"CN={name}", "no IPv4 address", VICTIM)
                    assert (await call(other, "GET", f"{base}/_/config"))[0] == 200

    run(main())


def test_one_lease_per_public_ip_per_network(etcd, prefix, pki):
    """A certificate with two addresses holds at most two leases per network, one per address: a PUT that
    would give an address a second subnet is refused, also when several race."""
    etcd.ctl("put", f"{prefix}/config", '{"Network": "10.5.0.0/20", "Backend": {"Type": "vxlan"}}')
    etcd.ctl("put", f"{prefix}/blue/config", '{"Network": "10.6.0.0/22", "Backend": {"Type": "vxlan"}}')
    subnets = [f"10.5.{i}.0/24" for i in range(1, 16)]

    def subnets_of(network_prefix: str, public_ip: str) -> list[str]:
        out = json.loads(etcd.ctl("get", f"{network_prefix}/subnets/", "--prefix", "-w", "json"))
        return [base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1] for kv in out.get("kvs") or []
                if json.loads(base64.b64decode(kv["value"]))["PublicIP"] == public_ip]  # fmt: skip

    async def main():
        async with server(etcd, prefix, pki=pki) as base, session(pki, "pair") as http:
            first = [json.loads((await call(http, "POST", f"{base}/_/leases", attrs(ip)))[1]) for ip in PAIR]
            again = json.loads((await call(http, "POST", f"{base}/_/leases", attrs(PAIR[0])))[1])
            assert again["Subnet"] == first[0]["Subnet"]  # reused, not a second one
            # a free subnet for an address that holds one already
            taken = {lease["Subnet"] for lease in first}
            free = next(s for s in subnets if s not in taken)
            lease = {"Subnet": free, "Attrs": attrs(PAIR[0]), "Expiration": wire.ZERO_TIME}
            got = await call(http, "PUT", f"{base}/_/leases/{free.replace('/', '-')}", lease)
            assert_refused(got, PAIR[0], first[0]["Subnet"], "one lease per PublicIP")
            assert subnets_of(prefix, PAIR[0]) == [first[0]["Subnet"].replace("/", "-")]
            # concurrent creations for an address without a lease: exactly one wins
            url = f"{base}/_/leases/{first[1]['Subnet'].replace('/', '-')}?PublicIP={PAIR[1]}"
            assert (await call(http, "DELETE", url))[0] == 200
            free = [s for s in subnets if s not in taken][:6]
            results = await asyncio.gather(*(
                call(http, "PUT", f"{base}/_/leases/{s.replace('/', '-')}",
                     {"Subnet": s, "Attrs": attrs(PAIR[1]), "Expiration": wire.ZERO_TIME})
                for s in free
            ))  # fmt: skip
            assert sorted(status for status, _ in results) == [200] + [403] * (len(free) - 1), results
            assert len(subnets_of(prefix, PAIR[1])) == 1
            # the limit counts per network: the same address holds one lease in another network too
            status, text = await call(http, "POST", f"{base}/blue/leases", attrs(PAIR[0]))
            assert status == 200 and json.loads(text)["Subnet"].startswith("10.6."), text
            assert len(subnets_of(f"{prefix}/blue", PAIR[0])) == 1 and len(subnets_of(prefix, PAIR[0])) == 1

    run(main())


def test_plain_http_identity_is_the_source_address(etcd, prefix, logs):
    """Without client certificates a client writes only its source address's leases (here 127.0.0.1, which
    is never a valid PublicIP: every write refused); --listen-trust-any-client accepts any, with a warning."""

    async def main():
        async with server(etcd, prefix) as base, session() as http:
            got = await call(http, "POST", f"{base}/_/leases", attrs(VICTIM))
            assert_refused(got, "source address [127.0.0.1]", f"PublicIP {VICTIM}")
            lease = {"Subnet": "10.5.1.0/24", "Attrs": attrs(VICTIM), "Expiration": wire.ZERO_TIME}
            assert_refused(await call(http, "PUT", f"{base}/_/leases/10.5.1.0-24?ttl=10", lease), VICTIM)
            etcd.ctl("put", f"{prefix}/subnets/10.5.2.0-24", json.dumps(attrs(VICTIM)))
            assert_refused(await call(http, "DELETE", f"{base}/_/leases/10.5.2.0-24?PublicIP={VICTIM}"), VICTIM)
            assert (await call(http, "GET", f"{base}/_/config"))[0] == 200
            assert etcd.ctl("get", f"{prefix}/subnets/", "--prefix", "--keys-only").split() == [
                f"{prefix}/subnets/10.5.2.0-24"]  # fmt: skip
        assert not any("trust-any" in line for line in logs)
        async with server(etcd, prefix, trust_any_client=True) as base, session() as http:
            status, text = await call(http, "POST", f"{base}/_/leases", attrs(VICTIM))
            assert status == 200 and json.loads(text)["Subnet"] == "10.5.2.0/24", text  # reuses VICTIM's lease
            status, _ = await call(http, "DELETE", f"{base}/_/leases/10.5.2.0-24?PublicIP={VICTIM}")
            assert status == 200
        warnings = [line for line in logs if line.startswith("WARNING --listen-trust-any-client")]
        assert len(warnings) == 1 and "ANY PublicIP" in warnings[0], logs

    run(main())


def test_identity_of_a_source_address_and_a_certificate():
    assert source_identity(("10.0.0.1", 4242)).addresses == {IPv4Address("10.0.0.1")}
    mapped = source_identity(("::ffff:10.0.0.1", 4242, 0, 0))  # a dual-stack listener's IPv4 client
    assert [str(a) for a in mapped.addresses] == ["10.0.0.1"] and str(mapped) == "source address [10.0.0.1]"
    assert source_identity(("fd00::1", 4242, 0, 0)).addresses == frozenset()
    assert source_identity(None).addresses == frozenset()
    cert = {
        "subject": ((("commonName", "node\n7"),),),
        "subjectAltName": (("DNS", "10.0.0.9"), ("IP Address", "10.0.0.7"), ("IP Address", "FD00:0:0:0:0:0:0:7\n")),
    }
    identity = certificate_identity(cert)
    assert [str(a) for a in identity.addresses] == ["10.0.0.7"]  # a DNS name that looks like an IP is no IP
    assert str(identity) == "certificate CN=node?7 [10.0.0.7]"
    many = certificate_identity({"subjectAltName": tuple(("IP Address", f"10.0.0.{i}") for i in range(1, 8))})
    assert str(many) == "certificate [10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4,+3]"
