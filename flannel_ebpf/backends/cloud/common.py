"""What the cloud route backends (aws-vpc, gce) share: reading an instance metadata service with short
timeouts, so that a config naming a cloud backend on a host outside that cloud fails in one line within
seconds instead of hanging (169.254.169.254 is often unroutable and silently drops packets)."""

from __future__ import annotations

import importlib
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from flannel_ebpf.backends.base import BackendError

#: per request: a metadata service answers in milliseconds; it is on the instance's own hypervisor
METADATA_TIMEOUT = 2.0


#: the cloud SDKs (pip extras, installed only where those backends run): module -> its PyPI distribution
AWS_SDK = {"boto3": "boto3", "botocore": "botocore"}
GCE_SDK = {
    "googleapiclient.discovery": "google-api-python-client",
    "google.auth": "google-auth",
    "google_auth_httplib2": "google-auth-httplib2",
    "httplib2": "httplib2",
}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_sdk(backend: str, extra: str, modules: Mapping[str, str]) -> None:
    """Import a cloud backend's SDK, or fail in one line naming the pip extra that brings it.

    botocore loads urllib3's pyOpenSSL support, and Debian 12's python3-openssl warns (a
    CryptographyDeprecationWarning about DSA) the moment it is imported: that warning, from that module,
    is not shown; it is about the system's pyOpenSSL, not about anything the operator can act on here."""
    with warnings.catch_warnings():
        try:
            from cryptography.utils import CryptographyDeprecationWarning
        except ImportError:
            pass
        else:
            warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"OpenSSL(\.|$)")
        for module, distribution in modules.items():
            try:
                importlib.import_module(module)
            except ImportError as e:
                missing = e.name or module
                named = next((d for m, d in modules.items() if _within(missing, m) or _within(m, missing)), None)
                # a module none of the extra's packages is (a broken install) is named as it is
                what = named or f"{distribution} (no module {missing})"
                raise BackendError(f"the {backend} backend needs {what}: pip install 'flannel-ebpf[{extra}]'") from None


class MetadataUnreachable(BackendError):
    """No metadata service answered: this host is most likely not an instance of that cloud."""


@dataclass
class MetadataClient:
    """GET (and PUT, for IMDSv2's token) against one metadata service root, with short timeouts."""

    root: str  # e.g. http://169.254.169.254
    cloud: str  # "AWS" | "GCE", for messages
    headers: dict[str, str] = field(default_factory=dict)
    timeout: float = METADATA_TIMEOUT

    def request(self, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> str:
        url = self.root.rstrip("/") + "/" + path.lstrip("/")
        req = urllib.request.Request(url, method=method, headers={**self.headers, **(headers or {})})
        try:
            # urllib follows proxies from the environment; a metadata service is link-local: never proxied
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(req, timeout=self.timeout) as resp:
                body: str = resp.read(65536).decode()
                return body
        except urllib.error.HTTPError as e:
            raise BackendError(f"{self.cloud} metadata service at {self.root}: {path}: HTTP {e.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MetadataUnreachable(
                f"{self.cloud} instance metadata service {self.root} unreachable ({reason}): "
                f"this host does not look like {'an' if self.cloud == 'AWS' else 'a'} {self.cloud} instance"
            ) from None
