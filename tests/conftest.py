"""Shared fixtures: a loopback etcd (`etcd`) and namespace labs that are always torn down (`lab_factory`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from flannel_ebpf.lab.etcd import EtcdServer


def _missing_for_lab() -> str | None:
    """Why namespace labs cannot run here (None when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "etcd", "etcdctl", "ping", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


#: Set by `make test`: on a machine that `make setup` prepared, a skipped test is a setup bug (no root,
#: no etcd, a missing tool), so every skip is reported as a failure instead of passing quietly.
NO_SKIPS = os.environ.get("FLANNEL_EBPF_NO_SKIPS", "") not in ("", "0")


def pytest_configure(config: pytest.Config) -> None:
    # Tests import boto3 directly (the agent goes through backends.cloud.common.import_sdk): the same filter, so
    # Debian's pyOpenSSL deprecation warning does not end every run.
    try:
        import cryptography.utils  # noqa: F401
    except ImportError:
        return
    config.addinivalue_line("filterwarnings", "ignore::cryptography.utils.CryptographyDeprecationWarning:OpenSSL")


#: Test files named so need root (network namespaces, TUN, iptables); `make test-unit` runs the others.
ROOT_FILE_SUFFIXES = ("_lab", "_netns")


#: Fixtures that start a real service (etcd, moto's EC2 server, a charm build): a test using one is not a
#: unit test. Files that start processes themselves say so with `pytestmark = pytest.mark.service`.
SERVICE_FIXTURES = frozenset(
    {"etcd_server", "moto", "tls_etcd", "auth_etcd", "etcd2", "etcd_v2", "short_token_etcd", "built_charm"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # One marker for "needs root", from the file's name and the lab and bpf markers, so that
    # `pytest -m "not root"` selects every test that runs as any user; and one for "starts a service",
    # so that `make test-unit` (neither) runs in seconds.
    for item in items:
        marked = any(item.iter_markers("lab")) or any(item.iter_markers("bpf"))
        if marked or item.path.stem.endswith(ROOT_FILE_SUFFIXES):
            item.add_marker(pytest.mark.root)
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Remember each phase's report on the test item so that fixtures can tell whether the test failed.
    rep = yield
    if NO_SKIPS and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped, but FLANNEL_EBPF_NO_SKIPS is set (`make test`): {reason}; run `make setup`"
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # Skips outside a test (a whole module skipped at collection) fail the run too.
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if NO_SKIPS and skipped and session.exitstatus == 0:
        session.exitstatus = 1


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One real etcd on loopback for the whole session (started lazily by the first test needing it)."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian: etcd-server)")
    server = EtcdServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> EtcdServer:
    """A running, empty loopback etcd: restarted if a previous test stopped it, every key deleted."""
    etcd_server.start()  # no-op while it runs
    etcd_server.ctl("del", "", "--from-key")
    return etcd_server


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """Every log line (level and message) the code under test writes while the test runs."""
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"), level="DEBUG")
    try:
        yield lines
    finally:
        logger.remove(sink)


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """`lab_factory(hosts=3, topology="flat", network_config={...}, ...)` -> a Lab that is up.

    Every lab made is closed when the test ends, passed or failed; after a failure the lab directory
    (agent logs, etcd log) is kept and the agents' log tails are printed.
    """
    why = _missing_for_lab()
    if why:
        pytest.skip(f"namespace lab {why}")
    from flannel_ebpf.lab.lab import Lab  # the lab needs root tools; import only when used

    labs: list[Lab] = []

    def make(*args: Any, **kwargs: Any) -> Lab:
        lab = Lab(*args, **kwargs)
        labs.append(lab)
        return lab.up()

    yield make

    failed = _failed(request)
    for lab in labs:
        if failed:
            for name, agent in lab.agents.items():
                if agent.ever_started:
                    print(f"\n---- {lab.prefix} agent log of {name} (tail) ----\n{agent.log_tail()}")
            for name, fd in lab.flanneld.items():
                print(f"\n---- {lab.prefix} flanneld {fd.version} log of {name} (tail) ----\n{fd.log_tail()}")
        lab.close(remove_dir=not failed)
        if failed:
            logger.warning("lab {} files kept in {}", lab.prefix, lab.dir)
