"""The declared dependencies match what the code uses, and the places that lean on a dependency's
internals or optionality hold: aetcd's private fields behind registry._Client.connect(), the cloud SDK
extras' one-line message when missing, and no pyOpenSSL deprecation noise when a cloud SDK loads."""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata
import inspect
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import aetcd
import aetcd.exceptions
import aetcd.utils
import aetcd.watcher
import pytest
from aetcd import rpc

from flannel_ebpf.subnet.registry import _Client
from flannel_ebpf.subnet.store import EtcdTLS

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: imported but deliberately not declared: bcc is Debian's python3-bpfcc (PyPI's "bcc" is another project);
#: cryptography only to silence its warning, when present (backends/cloud/common.py)
UNDECLARED_OK = {"bcc", "cryptography"}


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")


def declared(*extras: str) -> set[str]:
    names = {requirement_name(s) for s in PROJECT["dependencies"]}
    for extra in extras:
        names |= {requirement_name(s) for s in PROJECT["optional-dependencies"][extra]}
    return names


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the files importing it, for every non-stdlib import in flannel_ebpf/."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "flannel_ebpf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "flannel_ebpf":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_imported_package_is_declared() -> None:
    providers = importlib.metadata.packages_distributions()
    allowed = declared("aws", "gce", "dev")
    missing = {}
    for module, files in third_party_imports().items():
        if module in UNDECLARED_OK:
            continue
        distributions = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not distributions & allowed:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_netaddr_is_neither_declared_nor_imported() -> None:
    assert "netaddr" not in declared("aws", "gce", "dev")
    assert "netaddr" not in third_party_imports()


def test_cloud_sdks_are_extras_not_core_dependencies() -> None:
    core = declared()
    assert not core & {"boto3", "botocore", "google-api-python-client", "google-auth", "httplib2"}
    assert {"boto3", "botocore"} <= declared("aws")
    assert {"google-api-python-client", "google-auth", "google-auth-httplib2", "httplib2"} <= declared("gce")
    assert "flannel-ebpf[aws,gce]" in PROJECT["optional-dependencies"]["dev"]  # the tests run both clouds


def test_aetcd_is_bounded_and_the_installed_one_is_in_the_bound() -> None:
    from packaging.requirements import Requirement

    spec = next(Requirement(s) for s in PROJECT["dependencies"] if requirement_name(s) == "aetcd")
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec.specifier), f"aetcd is not bounded: {spec}"
    installed = importlib.metadata.version("aetcd")
    assert spec.specifier.contains(installed, prereleases=True), f"aetcd {installed} is outside {spec}"


def assigned_self_attributes(function: object) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))  # type: ignore[arg-type]
    return {
        target.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"
    }


AETCD_CHANGED = (
    "aetcd changed the internals registry._Client.connect() (the TLS connect) relies on: check that method "
    "against aetcd.Client.connect() and move the aetcd bound in pyproject.toml"
)


def test_aetcd_client_internals_that_the_tls_connect_uses() -> None:
    async def construct() -> _Client:
        return _Client("127.0.0.1", 2379, EtcdTLS(cafile="ca.pem"), username="u", password="p", timeout=5)

    client = asyncio.run(construct())
    private = {"_host": str, "_port": int, "_username": str, "_password": str, "_options": dict}
    for name, kind in private.items():
        assert isinstance(getattr(client, name, None), kind), f"{AETCD_CHANGED}: Client.{name}"
    assert client._timeout == 5, f"{AETCD_CHANGED}: Client._timeout"
    assert isinstance(getattr(client, "_connected", None), asyncio.Event), f"{AETCD_CHANGED}: Client._connected"
    assert hasattr(client, "metadata"), f"{AETCD_CHANGED}: Client.metadata"
    for name in ("secure_channel", "AuthStub", "AuthenticateRequest", "KVStub", "ClusterStub", "LeaseStub",
                 "MaintenanceStub", "WatchStub", "AioRpcError", "RangeRequest", "WatchRequest",
                 "WatchCreateRequest"):  # fmt: skip
        assert hasattr(rpc, name), f"{AETCD_CHANGED}: aetcd.rpc.{name}"
    assert list(inspect.signature(aetcd.watcher.Watcher).parameters) == ["watchstub", "timeout", "metadata"], (
        f"{AETCD_CHANGED}: aetcd.watcher.Watcher's parameters"
    )
    assert callable(getattr(aetcd.exceptions, "_handle_exception", None)), f"{AETCD_CHANGED}: _handle_exception"
    assert aetcd.utils.prefix_range_end(b"/a/") == b"/a0"


def test_the_tls_connect_sets_up_everything_aetcds_own_connect_does() -> None:
    """A stub or field aetcd's connect() starts setting (and its calls then use) must be set by ours too."""
    theirs = assigned_self_attributes(aetcd.Client.connect) - {"_is_connecting"}
    ours = assigned_self_attributes(_Client.connect)
    assert theirs <= ours, f"{AETCD_CHANGED}: aetcd's connect sets {sorted(theirs - ours)}, ours does not"


BLOCK_IMPORT = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Hide())
from flannel_ebpf.backends import make_backend
from flannel_ebpf.backends.base import BackendError
from flannel_ebpf.host.types import BackendOptions
try:
    make_backend({backend!r}, {{}}, BackendOptions())
except BackendError as e:
    print(e)
"""


@pytest.mark.parametrize(
    ("backend", "hidden", "line"),
    [
        ("aws-vpc", {"boto3"}, "the aws-vpc backend needs boto3: pip install 'flannel-ebpf[aws]'"),
        ("aws-vpc", {"botocore"}, "the aws-vpc backend needs botocore: pip install 'flannel-ebpf[aws]'"),
        ("gce", {"googleapiclient"}, "the gce backend needs google-api-python-client: pip install 'flannel-ebpf[gce]'"),
        ("gce", {"httplib2"}, "the gce backend needs httplib2: pip install 'flannel-ebpf[gce]'"),
        ("gce", {"uritemplate"}, "the gce backend needs google-api-python-client (no module uritemplate): "
                                 "pip install 'flannel-ebpf[gce]'"),
    ],
)  # fmt: skip
def test_a_cloud_backend_without_its_sdk_says_which_extra_to_install(backend: str, hidden: set[str], line: str) -> None:
    code = BLOCK_IMPORT.format(hidden=hidden, backend=backend)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.stdout.strip() == line, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr


LOAD_BACKEND = """
from flannel_ebpf.backends import make_backend
from flannel_ebpf.host.types import BackendOptions
make_backend({backend!r}, {{}}, BackendOptions())
print("loaded")
"""


@pytest.mark.parametrize("backend", ["aws-vpc", "gce"])
def test_loading_a_cloud_backend_prints_no_cryptography_deprecation_warning(backend: str) -> None:
    code = LOAD_BACKEND.format(backend=backend)
    r = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=ROOT)  # fmt: skip
    assert r.stdout.strip() == "loaded", r.stdout + r.stderr
    assert "CryptographyDeprecationWarning" not in r.stderr, r.stderr
    assert "Warning" not in r.stderr, r.stderr


def test_the_cli_help_prints_no_warning() -> None:
    r = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import sys; from flannel_ebpf.cli import main; sys.exit(main())",
         "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0 and "usage" in r.stdout.lower(), r.stdout + r.stderr
    assert "Warning" not in r.stderr, r.stderr
