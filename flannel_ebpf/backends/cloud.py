"""What the cloud route backends (aws-vpc, gce) share: reading an instance metadata service with short
timeouts, so that a config naming a cloud backend on a host outside that cloud fails in one line within
seconds instead of hanging (169.254.169.254 is often unroutable and silently drops packets)."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field

from flannel_ebpf.backends.base import BackendError

#: per request: a metadata service answers in milliseconds; it is on the instance's own hypervisor
METADATA_TIMEOUT = 2.0


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
                return resp.read(65536).decode()
        except urllib.error.HTTPError as e:
            raise BackendError(f"{self.cloud} metadata service at {self.root}: {path}: HTTP {e.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MetadataUnreachable(
                f"{self.cloud} instance metadata service {self.root} unreachable ({reason}): "
                f"this host does not look like {'an' if self.cloud == 'AWS' else 'a'} {self.cloud} instance"
            ) from None
