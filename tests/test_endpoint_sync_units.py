"""The udp backend's endpoint-sync thread (backends.udp.delivery.EndpointSync) when its reconcile keeps failing:
it waits before each retry and does not repeat the same warning, without a lab."""

from __future__ import annotations

import itertools
import time
from ipaddress import IPv4Network

from loguru import logger

from flannel_ebpf.backends.udp import delivery as udp_delivery
from flannel_ebpf.backends.udp.delivery import EndpointSync, retry_delay

SUBNET = IPv4Network("10.254.253.0/24")  # no bridge on this host holds its gateway: no hook, no endpoints


def test_a_reconcile_that_keeps_failing_is_retried_after_a_pause_and_logged_once(tmp_path):
    """The real reconcile, its pinned maps gone (as when they are removed under a running agent): started
    as the backend starts it, the thread retries after a pause, not at once in a loop (it made thousands
    of attempts, and as many warnings, a second), and says the same failure once."""
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    sync = EndpointSync(tmp_path / "no-pins", SUBNET, attach_hook=True)  # resync: the backend's 10 s
    attempts = 0
    reconcile = sync._reconcile

    def counted() -> None:
        nonlocal attempts
        attempts += 1
        reconcile()

    sync._reconcile = counted  # type: ignore[method-assign]
    try:
        sync.start()
        time.sleep(1.0)
    finally:
        sync.stop()
        logger.remove(sink)
    assert sync.last_error is not None
    assert "is not pinned" in sync.last_error or "bpffs is not mounted here" in sync.last_error
    assert 1 <= attempts <= 3, f"{attempts} attempts in 1 s"
    assert len(warnings) == 1, f"{len(warnings)} warnings in 1 s, the first: {warnings[:1]}"


def test_the_pause_doubles_up_to_the_resync_period():
    assert [retry_delay(n, 10.0) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert retry_delay(10_000, 10.0) == 10.0  # no overflow after hours of failures
    assert retry_delay(1, 0.2) == 0.2  # never longer than the resync period


def test_a_failure_is_logged_once_again_when_it_changes_or_lasts_and_the_recovery_once(tmp_path, monkeypatch):
    """reconcile() called in a row (as the thread would after each pause), failing as a script says."""
    lines: list[tuple[str, str]] = []  # (level, message)
    sink = logger.add(lambda m: lines.append((m.record["level"].name, m.record["message"])), level="INFO")
    sync = EndpointSync(tmp_path, SUBNET, attach_hook=False)
    script = ["maps gone", "maps gone", "maps gone", "netlink busy", "netlink busy", None]

    def scripted() -> None:
        error = script.pop(0)
        if error is not None:
            raise RuntimeError(error)

    sync._reconcile = scripted  # type: ignore[method-assign]
    try:
        for _ in range(5):
            sync.reconcile()
        assert sync.failures == 5 and sync.last_error == "RuntimeError: netlink busy"
        assert sync.status()["failures"] == 5
        monkeypatch.setattr(udp_delivery, "_REPEAT_WARNING", 0.0)  # a minute later: said again
        script[:0] = ["netlink busy"]
        sync.reconcile()
        sync.reconcile()  # succeeds
    finally:
        logger.remove(sink)
    assert [level for level, _ in lines] == ["WARNING", "WARNING", "WARNING", "INFO"], lines
    assert lines[0][1].endswith("RuntimeError: maps gone")
    assert lines[1][1].endswith("RuntimeError: netlink busy")
    assert lines[2][1].endswith("RuntimeError: netlink busy (still: 6 attempts in a row)")
    assert "updated again, after 6 failed attempt(s)" in lines[3][1]
    assert sync.failures == 0 and sync.last_error is None and sync.status()["failures"] == 0


def test_the_thread_retries_after_the_pause_and_recovers(tmp_path, monkeypatch):
    """Failing, the thread tries again after each pause, not before (netlink events or not: the host may
    have some), and once the failure is gone it is back to normal."""
    monkeypatch.setattr(udp_delivery, "_RETRY_FIRST", 0.1)
    sync = EndpointSync(tmp_path, SUBNET, attach_hook=False, resync=0.4)
    attempts: list[float] = []

    def failing_thrice() -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 3:
            raise RuntimeError("not yet")
        sync.last_reconcile = time.time()

    sync._reconcile = failing_thrice  # type: ignore[method-assign]
    try:
        sync.start()  # the first attempt, then the thread's
        deadline = time.monotonic() + 10
        while len(attempts) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        sync.stop()
    assert len(attempts) >= 4 and sync.failures == 0 and sync.last_error is None
    gaps = [b - a for a, b in itertools.pairwise(attempts[:4])]
    # 0.1 s, 0.2 s, 0.4 s (the resync period: the cap) after the failures; a loaded machine may be late
    for gap, pause in zip(gaps, [0.1, 0.2, 0.4], strict=True):
        assert gap >= pause * 0.9, (gaps, pause)
