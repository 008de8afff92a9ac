"""A long-running program the lab starts on a host (the agent, flannel's flanneld): one process at a time,
started into a log file of its own, signalled only by its PID."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from loguru import logger

from .netns import stop_process
from .topology import Host

RUN_MARK = "\n==== "  # begins each run's part of a log: `==== <time> start: <argv>`


@dataclass
class HostProcess:
    """The process of one program on one host, while it runs, and the log that outlives it. Subclasses name
    the program (`kind`) and where it logs (`log`)."""

    kind: ClassVar[str] = "process"

    host: Host
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, kw_only=True)
    argv: list[str] = field(default_factory=list, kw_only=True)
    ever_started: bool = field(default=False, kw_only=True)
    #: time.time() of the last start (start-to-ready figures)
    started_at: float = field(default=0.0, kw_only=True)

    @property
    def log(self) -> Path:
        raise NotImplementedError

    @property
    def what(self) -> str:
        return f"{self.kind} on {self.host.name}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ensure_stopped(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.what} already runs (pid {self.proc.pid})")

    def _launch(self, argv: Sequence[str], env: Mapping[str, str], share_bpffs: bool = False) -> None:
        """Start `argv` in the host's namespace, its output appended to the log after a `RUN_MARK` line."""
        self.argv = list(argv)
        self.host.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            log.write(f"{RUN_MARK}{time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.time()
            self.proc = self.host.popen(self.argv, stdout=log, stderr=log, env=env, share_bpffs=share_bpffs)
        self.ever_started = True
        logger.debug("{} started, pid {}", self._started_label(), self.proc.pid)

    def _started_label(self) -> str:
        return self.what

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM by PID and wait (SIGKILL after `timeout`). Returns the exit code (None: not running)."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        return self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        code = stop_process(proc, timeout, sig, what=self.what)
        logger.debug("{} exited with {}", self.what, code)
        return code

    def log_text(self, last_run: bool = True) -> str:
        """The log: every run (each begins with a `==== <time> start:` line), or the last."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[text.rfind(RUN_MARK) :] if last_run and RUN_MARK in text else text

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text(last_run=False).splitlines()[-lines:]) or f"(no {self.kind} log)"
