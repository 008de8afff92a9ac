"""The agent as a user runs it: the real `flannel-ebpf` CLI, as a subprocess inside a host namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from .netns import ExecResult, stop_process
from .topology import Host

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_MARK = "\n==== "  # begins each run's part of an agent log: `==== <time> start: <argv>`


def cli_command() -> list[str]:
    """How to run `flannel-ebpf`: the console script next to this interpreter (the venv's), else the
    module through this interpreter (a checkout that is not pip-installed)."""
    exe = Path(sys.executable).parent / "flannel-ebpf"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from flannel_ebpf.cli import main; sys.exit(main())"]


def cli_env(extra: Mapping[str, str] | None = None, checkout: bool = True) -> dict[str, str]:
    """The CLI's environment; `checkout`: the checkout on PYTHONPATH (not for an installed command, whose
    own package must be the one imported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}  # no stray flags
    if checkout:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    else:
        env.pop("PYTHONPATH", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


@dataclass
class Agent:
    """The agent of one host: its command lines and, while running, its process."""

    host: Host
    etcd_endpoint: str
    pin_dir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    argv: list[str] = field(default_factory=list)
    ever_started: bool = False
    #: the `flannel-ebpf` command to run (None: this checkout's, see cli_command), e.g. an installed one
    command: Sequence[str] | None = None
    #: time.time() of the last start (start-to-ready figures)
    started_at: float = 0.0
    etcd_api: str = "v3"  # v2: the agent runs with --etcd-api v2 (the lab's etcd serves the v2 API)

    def _command(self) -> list[str]:
        return list(self.command) if self.command is not None else cli_command()

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return cli_env(extra, checkout=self.command is None)

    def common_flags(self) -> list[str]:
        """The flags that name this host's files: the same for up, down, status."""
        return [
            "--etcd-endpoints", self.etcd_endpoint,
            "--subnet-file", str(self.host.subnet_file),
            "--state-dir", str(self.host.state_dir),
            "--bpf-pin-dir", str(self.pin_dir),
            *(["--etcd-api", self.etcd_api] if self.etcd_api != "v3" else []),
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(
        self,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        go_style: bool = False,
        flanneld_flags: Sequence[str] | None = None,
    ) -> None:
        """`go_style`: the command line as flanneld's unit files and the etcd-era tutorials write it: no
        subcommand, one dash, `-flag=value` (`flannel-ebpf -etcd-endpoints=http://... -iface=eth0`).
        `flanneld_flags`: a flanneld's own command line (a takeover: the unit's ExecStart kept, only the
        binary swapped), then this agent's --state-dir and --bpf-pin-dir (lab isolation), then `extra_args`."""
        if self.running:
            raise RuntimeError(f"agent on {self.host.name} already runs (pid {self.proc.pid})")  # type: ignore[union-attr]
        self.host.dir.mkdir(parents=True, exist_ok=True)
        flags = [*self.common_flags(), "--iface", self.host.iface]
        if flanneld_flags is not None:
            lab_dirs = ["--state-dir", str(self.host.state_dir), "--bpf-pin-dir", str(self.pin_dir)]
            self.argv = [*self._command(), *flanneld_flags, *lab_dirs, *extra_args]
        elif go_style:
            pairs = zip(flags[::2], flags[1::2], strict=True)
            self.argv = [*self._command(), *(f"-{name.lstrip('-')}={value}" for name, value in pairs), *extra_args]
        else:
            self.argv = [*self._command(), "up", *flags, *extra_args]
        with open(self.host.agent_log, "ab") as log:
            log.write(f"{RUN_MARK}{time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.time()
            self.proc = self.host.popen(self.argv, stdout=log, stderr=log, env=self._env(env), share_bpffs=True)
        self.ever_started = True
        logger.debug("agent on {} started, pid {}", self.host.name, self.proc.pid)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it does not exit in time). Returns the exit code."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        return self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        code = stop_process(proc, timeout, sig, what=f"agent on {self.host.name}")
        logger.debug("agent on {} exited with {}", self.host.name, code)
        return code

    def cli(self, *args: str, timeout: float = 30.0, check: bool = False) -> ExecResult:
        """Any other subcommand (`health`, `status --json`, `down`, ...) in the host's namespace."""
        argv = [*self._command(), *args]
        return self.host.exec(argv, timeout=timeout, check=check, env=self._env(), share_bpffs=True)

    def health(self) -> ExecResult:
        return self.cli("health", "--state-dir", str(self.host.state_dir), timeout=15)

    def down(self, extra_args: Sequence[str] = (), timeout: float = 60.0, check: bool = False) -> ExecResult:
        return self.cli("down", *self.common_flags(), *extra_args, timeout=timeout, check=check)

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Until `health` prints `ready ...` (returned); if this CLI has no `health` yet, until the
        subnet file exists. Fails early, with the log's tail, if the agent exits."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"agent on {self.host.name} exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            r = self.health()
            out = r.stdout.strip()
            if r.ok and out.startswith("ready"):
                return out
            if out.startswith("not-ready"):
                last = out
            elif self._subnet_file_written():
                # `health` is missing or broken in this CLI: the subnet file is the next best sign.
                return f"subnet-file {self.host.subnet_file}"
            else:
                msg = (r.stderr.strip() or out).splitlines()
                last = msg[-1] if msg else f"health exit {r.returncode}"
            time.sleep(0.3)
        raise TimeoutError(f"agent on {self.host.name} not ready after {timeout}s ({last}):\n{self.log_tail()}")

    def _subnet_file_written(self) -> bool:
        """The subnet file was written by this run (not left by flanneld before a takeover)."""
        try:
            return self.host.subnet_file.stat().st_mtime >= self.started_at - 1
        except FileNotFoundError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.host.agent_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no agent log)"
        return "\n".join(text.splitlines()[-lines:])
