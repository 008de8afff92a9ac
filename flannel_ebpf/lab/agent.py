"""The agent as a user runs it: the real `flannel-ebpf` CLI, as a subprocess inside a host namespace."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .netns import ExecResult
from .process import HostProcess

REPO_ROOT = Path(__file__).resolve().parents[2]


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
class Agent(HostProcess):
    """The agent of one host: its command lines and, while running, its process."""

    kind = "agent"

    etcd_endpoint: str
    pin_dir: Path
    #: the `flannel-ebpf` command to run (None: this checkout's, see cli_command), e.g. an installed one
    command: Sequence[str] | None = None
    etcd_api: str = "v3"  # v2: the agent runs with --etcd-api v2 (the lab's etcd serves the v2 API)

    @property
    def log(self) -> Path:
        return self.host.agent_log

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
        self._ensure_stopped()
        flags = [*self.common_flags(), "--iface", self.host.iface]
        if flanneld_flags is not None:
            lab_dirs = ["--state-dir", str(self.host.state_dir), "--bpf-pin-dir", str(self.pin_dir)]
            argv = [*self._command(), *flanneld_flags, *lab_dirs, *extra_args]
        elif go_style:
            pairs = zip(flags[::2], flags[1::2], strict=True)
            argv = [*self._command(), *(f"-{name.lstrip('-')}={value}" for name, value in pairs), *extra_args]
        else:
            argv = [*self._command(), "up", *flags, *extra_args]
        self._launch(argv, self._env(env), share_bpffs=True)

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
