"""A real Prometheus (Debian's package) inside a lab namespace, scraping the lab agents' /metrics.

It runs in a namespace on the lab's underlay (the etcd one), listens on that namespace's loopback, keeps its
config and data in a temporary dir of its own, and is stopped by its PID (the dir removed) on `stop()`.
Queries go through its HTTP API from inside the same namespace (`query`, `api`): nothing leaves the lab.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from .netns import Netns, stop_process

PORT = 9090

#: run inside the namespace: GET the API path given, print the JSON answer (or the error) as one line
_GET = f"""
import sys, urllib.error, urllib.request
url = "http://127.0.0.1:{PORT}" + sys.argv[1]
try:
    print(urllib.request.urlopen(url, timeout=10).read().decode())
except urllib.error.HTTPError as e:
    print(e.read().decode())
"""


class Prometheus:
    """`Prometheus(ns, targets, rule_files).start()`; `query("up")`; `stop()` (also on failure)."""

    def __init__(self, ns: Netns, targets: Sequence[str], rule_files: Sequence[str | Path] = (),
                 scrape_interval: str = "1s") -> None:  # fmt: skip
        self.ns = ns
        self.targets = list(targets)
        self.rule_files = [str(p) for p in rule_files]
        self.scrape_interval = scrape_interval
        self.dir = Path(tempfile.mkdtemp(prefix="flannel-ebpf-prometheus-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": "flannel-ebpf",
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    def start(self, timeout: float = 30.0) -> Prometheus:
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        with open(self.dir / "prometheus.log", "wb") as log:
            self.proc = self.ns.popen(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{PORT}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=log,
            )
        logger.debug("prometheus pid {} in {} scraping {}", self.proc.pid, self.ns.name, self.targets)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if self.api("/-/ready", raw=True).strip().startswith("Prometheus Server is Ready"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"prometheus was not ready within {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")
        except OSError:
            return ""

    def api(self, path: str, raw: bool = False) -> Any:
        r = self.ns.exec(["python3", "-c", _GET, path], check=False, timeout=20)
        if raw:
            return r.stdout
        try:
            return json.loads(r.stdout)
        except ValueError:
            return {"status": "error", "error": r.stdout + r.stderr}

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on a query error)."""
        from urllib.parse import quote

        answer = self.api(f"/api/v1/query?query={quote(promql)}")
        if answer.get("status") != "success":
            raise RuntimeError(f"query {promql!r}: {answer.get('error') or answer}")
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str, **labels: str) -> float | None:
        """The value of the one series of `promql` whose labels include `labels` (None: no such series)."""
        for series in self.query(promql):
            if all(series["metric"].get(k) == v for k, v in labels.items()):
                return float(series["value"][1])
        return None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10, what="prometheus")
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
