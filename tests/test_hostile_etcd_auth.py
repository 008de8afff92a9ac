"""Issue 14 with etcd authentication on (a loopback etcd of its own): a role made for flanneld, missing
permissions and a wrong password each give one clear line, never a traceback or a silent loop."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from flannel_ebpf.agent import Agent
from flannel_ebpf.config import parse_config
from flannel_ebpf.lab.etcd import EtcdServer
from flannel_ebpf.network import FatalError
from flannel_ebpf.options import AgentOptions
from flannel_ebpf.subnet.lease import LeaseAttrs
from flannel_ebpf.subnet.manager import LeaseManager, LeaseOptions
from flannel_ebpf.subnet.registry import SubnetRegistry

pytestmark = pytest.mark.skipif(not shutil.which("etcd"), reason="needs etcd")

PREFIX = "/coreos.com/network"
ROOT = ("--user", "root:r00t")
CONFIG = '{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}'


@pytest.fixture
def auth_etcd() -> Iterator[EtcdServer]:
    """An etcd with auth on, a user `flannel` whose role grants exactly what flanneld needs (config read,
    subnets/ read-write), and a user `nocfg` whose role grants subnets/ only."""
    server = EtcdServer(name="flannel-ebpf-auth")
    server.start()
    try:
        for args in (
            ("user", "add", "root:r00t"),
            ("role", "add", "flanneld"),
            ("role", "grant-permission", "flanneld", "read", f"{PREFIX}/config"),
            ("role", "grant-permission", "flanneld", "--prefix=true", "readwrite", f"{PREFIX}/subnets/"),
            ("user", "add", "flannel:pw"),
            ("user", "grant-role", "flannel", "flanneld"),
            ("role", "add", "subnetsonly"),
            ("role", "grant-permission", "subnetsonly", "--prefix=true", "readwrite", f"{PREFIX}/subnets/"),
            ("user", "add", "nocfg:pw"),
            ("user", "grant-role", "nocfg", "subnetsonly"),
            ("auth", "enable"),
        ):
            server.ctl(*args)
        server.ctl(*ROOT, "put", f"{PREFIX}/config", CONFIG)
        yield server
    finally:
        server.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def agent(server: EtcdServer, tmp_path, user: str, password: str) -> Agent:
    options = AgentOptions(
        etcd_endpoints=[server.endpoint], etcd_username=user, etcd_password=password, state_dir=str(tmp_path)
    )
    options.lease = LeaseOptions(retry_interval=0.1)
    return Agent(options)


def test_config_permission_denied_is_one_line_and_waited_out(auth_etcd, tmp_path, logs):
    a = agent(auth_etcd, tmp_path, "nocfg", "pw")

    async def body():
        reg = a.options.registry()
        task = asyncio.ensure_future(a.wait_for_config(reg))
        for _ in range(100):
            if a.state.phase == "waiting-config" and "permission denied" in a.state.reason:
                break
            assert not task.done(), task.result()  # used to escape as a ClientError traceback
            await asyncio.sleep(0.05)
        assert f"read access to {PREFIX}/config" in a.state.reason
        state = json.loads((tmp_path / "state.json").read_text())
        assert state["phase"] == "waiting-config" and "permission denied" in state["reason"]
        await asyncio.sleep(1.0)  # several retries...
        denied = [line for line in logs if "permission denied" in line]
        assert len(denied) == 1 and "\n" not in denied[0]  # ...said once
        auth_etcd.ctl(*ROOT, "role", "grant-permission", "subnetsonly", "read", f"{PREFIX}/config")
        config = await asyncio.wait_for(task, 15)
        assert config == parse_config(CONFIG)
        await reg.close()

    run(body())


def test_wrong_password_is_fatal_in_one_line(auth_etcd, tmp_path):
    a = agent(auth_etcd, tmp_path, "flannel", "wrong")

    async def body():
        reg = a.options.registry()
        try:
            with pytest.raises(FatalError, match="authentication failed") as info:
                await a.wait_for_config(reg)
        finally:
            await reg.close()
        assert "\n" not in str(info.value) and "--etcd-password" in str(info.value)

    run(body())


def test_flanneld_role_acquires_a_lease_and_names_the_presence_key(auth_etcd, logs):
    """Under flanneld's role the presence key is refused: one line naming the key and the permission,
    and the agent still gets its lease (as flanneld would) instead of looping on "etcd unavailable"."""
    attrs = LeaseAttrs(IPv4Address("192.168.50.1"), "host-gw")
    presence_key = f"{PREFIX}/flannel-ebpf/hosts/192.168.50.1"

    def registry() -> SubnetRegistry:
        return SubnetRegistry([auth_etcd.endpoint], PREFIX, username="flannel", password="pw")

    async def body():
        m = LeaseManager(parse_config(CONFIG), attrs, registry(), registry(),
                         LeaseOptions(check_interval=0.5, retry_interval=0.1, identity="hostA:1"))  # fmt: skip
        lease = await asyncio.wait_for(m.acquire(), 15)
        assert lease.subnet.subnet_of(parse_config(CONFIG).network)
        assert presence_key in m.presence_denied and "readwrite" in m.presence_denied
        for _ in range(3):
            await m.maintain_once()  # renewal checks under the same role: fine, and nothing said again
        lines = [line for line in logs if presence_key in line]
        assert len(lines) == 1 and "permission denied" in lines[0] and "readwrite" in lines[0]
        assert not any("etcd unavailable" in line for line in logs)
        # once the role covers the key, the guard is on at the next check
        auth_etcd.ctl(*ROOT, "role", "grant-permission", "flanneld", "--prefix=true", "readwrite",
                      f"{PREFIX}/flannel-ebpf/hosts/")  # fmt: skip
        await m.maintain_once()
        assert m.presence_lease and not m.presence_denied
        held = auth_etcd.ctl(*ROOT, "get", "--print-value-only", presence_key).strip()
        assert held == "hostA:1"
        await m.release_presence()
        await m.leases.close()
        await m.watcher.close()

    run(body())


def test_documented_role_runs_the_agent_with_every_guard(auth_etcd, logs):
    """The role docs/SECURITY.md gives: config read, subnets/ and flannel-ebpf/hosts/ read-write."""
    for args in (
        ("role", "add", "flannel-ebpf"),
        ("role", "grant-permission", "flannel-ebpf", "read", f"{PREFIX}/config"),
        ("role", "grant-permission", "flannel-ebpf", "--prefix=true", "readwrite", f"{PREFIX}/subnets/"),
        ("role", "grant-permission", "flannel-ebpf", "--prefix=true", "readwrite", f"{PREFIX}/flannel-ebpf/hosts/"),
        ("user", "add", "fe:pw"),
        ("user", "grant-role", "fe", "flannel-ebpf"),
    ):
        auth_etcd.ctl(*ROOT, *args)
    text = (Path(__file__).resolve().parent.parent / "docs" / "SECURITY.md").read_text()
    assert f"readwrite {PREFIX}/flannel-ebpf/hosts/" in text and f"read {PREFIX}/config" in text

    async def body():
        def registry() -> SubnetRegistry:
            return SubnetRegistry([auth_etcd.endpoint], PREFIX, username="fe", password="pw")

        options = LeaseOptions(check_interval=0.5, retry_interval=0.1, identity="hostB:1")
        attrs = LeaseAttrs(IPv4Address("192.168.50.2"), "host-gw")
        m = LeaseManager(parse_config(CONFIG), attrs, registry(), registry(), options)
        await asyncio.wait_for(m.acquire(), 15)
        await m.maintain_once()
        assert m.presence_lease and not m.presence_denied and m.problem is None
        await m.release_presence()
        await m.leases.close()
        await m.watcher.close()

    run(body())
    assert not any("permission denied" in line for line in logs)
