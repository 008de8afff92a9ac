"""`make charm`: the .charm archive, built without charmcraft (which needs LXD or multipass and the store).

The archive has charmcraft's layout for a machine charm with the Operator Framework:
- `dispatch` (executable), `src/` (the charm), `venv/` (ops and its dependencies, pure Python or with
  a pure fallback, installed for the base's Python), `health` (for `juju exec ... ./health`);
- `metadata.yaml`, `config.yaml`, `actions.yaml` and `manifest.yaml`, generated from `charmcraft.yaml`
  as charmcraft packs them (juju reads those), and `charmcraft.yaml` itself;
- `wheels/`: the flannel-ebpf wheel that `make wheel` built, its dependencies' wheels for each Python the
  supported bases run (binary wheels per version: hosts have no internet and no compiler), and pip's
  own wheel (the charm installs with `python3 pip.whl/pip install --no-index`);
- `files/flannel-ebpf.service`: the packaged systemd unit.

Python packages come from pip's configured index (or PIP_FIND_LINKS, PIP_NO_INDEX for a wheelhouse);
nothing else is fetched.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# ubuntu@22.04 runs Python 3.10, 24.04 3.12; 3.11 is Debian 12's (this lab's hosts).
DEFAULT_PYTHONS = ("3.10", "3.11", "3.12")
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64", "manylinux1_x86_64",
             "manylinux_2_5_x86_64")  # fmt: skip
EXECUTABLE = ("dispatch", "health", "src/charm.py")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def binary_args(python: str) -> list[str]:
    return ["--only-binary=:all:", "--implementation", "cp", "--python-version", python,
            *(a for p in PLATFORMS for a in ("--platform", p))]  # fmt: skip


def agent_requirements() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def generated_yaml(meta: dict) -> dict[str, str]:
    """metadata/config/actions/manifest.yaml as charmcraft packs them from charmcraft.yaml."""
    keys = ("name", "summary", "description", "subordinate", "requires", "provides", "peers", "title")
    metadata = {k: meta[k] for k in keys if k in meta}
    base = str(meta.get("base", "ubuntu@22.04"))
    name, channel = base.split("@")
    manifest = {
        "charmcraft-version": "build_charm.py",
        "bases": [{"name": name, "channel": channel, "architectures": list(meta.get("platforms", {"amd64": None}))}],
    }
    dump = lambda d: yaml.safe_dump(d, sort_keys=False)  # noqa: E731
    return {
        "metadata.yaml": dump(metadata),
        "config.yaml": dump(meta.get("config", {})),
        "actions.yaml": dump(meta.get("actions", {})),
        "manifest.yaml": dump(manifest),
    }


def stage(dist: Path, pythons: list[str], root: Path) -> None:
    wheels = sorted(glob.glob(str(dist / "flannel_ebpf-*.whl")))
    if not wheels:
        raise SystemExit(f"build_charm: no flannel_ebpf-*.whl in {dist}: run `make wheel` first")
    meta = yaml.safe_load((HERE / "charmcraft.yaml").read_text())
    for rel in ("charmcraft.yaml", "dispatch", "health", "README.md", "requirements.txt"):
        shutil.copy2(HERE / rel, root / rel)
    shutil.copy2(REPO / "LICENSE", root / "LICENSE")
    (root / "src").mkdir()
    for py in sorted((HERE / "src").glob("*.py")):
        shutil.copy2(py, root / "src" / py.name)
    for name, text in generated_yaml(meta).items():
        (root / name).write_text(text)
    (root / "files").mkdir()
    shutil.copy2(REPO / "packaging" / "systemd" / "flannel-ebpf.service", root / "files" / "flannel-ebpf.service")
    # ops for the base's Python (the oldest listed: its pure-Python code runs on the newer ones too).
    pip("install", "--target", str(root / "venv"), *binary_args(pythons[0]), "-r", str(HERE / "requirements.txt"))
    wheel_dir = root / "wheels"
    wheel_dir.mkdir()
    shutil.copy2(wheels[-1], wheel_dir)
    for python in pythons:
        pip("download", "-d", str(wheel_dir), *binary_args(python), *agent_requirements(), "pip")
    for rel in EXECUTABLE:
        p = root / rel
        p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def pack(root: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts:
                continue
            info = zipfile.ZipInfo.from_file(path, path.relative_to(root).as_posix())
            info.compress_type = zipfile.ZIP_DEFLATED
            info.date_time = (2026, 1, 1, 0, 0, 0)  # reproducible
            with open(path, "rb") as f:
                z.writestr(info, f.read())
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="build_charm.py", description=__doc__.splitlines()[0])
    p.add_argument("--dist", default=str(REPO / "dist"), help="where `make wheel` put the wheel (%(default)s)")
    p.add_argument("--out", default=str(REPO / "build" / "flannel-ebpf_amd64.charm"))
    p.add_argument("--pythons", default=",".join(DEFAULT_PYTHONS), help="Pythons to ship wheels for (%(default)s)")
    args = p.parse_args(argv)
    pythons = [v.strip() for v in args.pythons.split(",") if v.strip()]
    with tempfile.TemporaryDirectory(prefix="flannel-ebpf-charm-") as tmp:
        stage(Path(args.dist), pythons, Path(tmp))
        pack(Path(tmp), Path(args.out))
    print(f"build_charm: {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
