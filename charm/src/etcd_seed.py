"""Put the network config at <prefix>/config when etcd has none; report what etcd holds otherwise.

Run by the charm's leader with the agent's own Python (the flannel-ebpf venv: its etcd client and TLS
handling), as the seed charm ran `etcdctl set /coreos.com/network/config`:

    python etcd_seed.py --endpoints https://10.0.0.1:2379 --prefix /coreos.com/network \
        --cafile ca.pem --certfile cert.pem --keyfile key.pem --config '{"Network": "10.10.0.0/16", ...}'

Prints one JSON object: {"result": "created" | "same" | "different", "key": ..., "existing": <json or text>}
(exit 0), or {"result": "error", "error": "..."} (exit 1). An existing, different config is never
overwritten: leases already handed out belong to it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any


def same_config(a: Any, b: Any) -> bool:
    return isinstance(a, dict) and isinstance(b, dict) and a == b


async def seed(args: argparse.Namespace) -> dict[str, Any]:
    from flannel_ebpf.subnet.registry import SubnetRegistry, describe_etcd_error
    from flannel_ebpf.subnet.store import EtcdTLS

    wanted = json.loads(args.config)
    registry = SubnetRegistry(
        [e.strip() for e in args.endpoints.split(",") if e.strip()],
        args.prefix,
        EtcdTLS(args.cafile, args.certfile, args.keyfile),
        timeout=args.timeout,
    )
    key = registry.config_key
    last = ""
    try:
        for _ in registry.endpoints:  # each endpoint once
            try:
                raw = await registry.get_config()
                if raw is None:
                    await registry.client.put(key.encode(), json.dumps(wanted).encode())
                    return {"result": "created", "key": key}
                try:
                    existing: Any = json.loads(raw)
                except ValueError:
                    existing = raw.decode(errors="replace")
                return {"result": "same" if same_config(existing, wanted) else "different", "key": key,
                        "existing": existing}  # fmt: skip
            except Exception as e:
                last = f"{registry.endpoint}: {describe_etcd_error(e)}"
                await registry.reconnect()
        return {"result": "error", "key": key, "error": last}
    finally:
        await registry.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="etcd_seed.py")
    p.add_argument("--endpoints", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--config", required=True, help="the network config, JSON")
    p.add_argument("--cafile", default="")
    p.add_argument("--certfile", default="")
    p.add_argument("--keyfile", default="")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    try:
        out = asyncio.run(seed(args))
    except Exception as e:  # a bad argument or a missing file: one line, for the charm's status
        out = {"result": "error", "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    return 0 if out["result"] != "error" else 1


if __name__ == "__main__":
    sys.exit(main())
