"""`python -m flannel_ebpf.lab demo|cleanup`."""

from __future__ import annotations

import argparse
import sys

from flannel_ebpf.logs import configure_logging

from . import demo
from .cleanup import cleanup, find_leftovers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flannel_ebpf.lab", description="flannel-ebpf namespace lab")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="3 hosts, agents, containers, a ping matrix; then tear down")
    demo.add_demo_args(d)
    c = sub.add_parser("cleanup", help="remove leftovers of crashed or kept labs")
    c.add_argument("--prefix", help="only this lab (fl + 4 hex digits)")
    c.add_argument("--force", action="store_true", help="also labs whose owner process still runs")
    c.add_argument("--list", action="store_true", help="only list what would be removed")
    args = p.parse_args(argv)

    if args.cmd == "demo":
        return demo.main(args)

    configure_logging("DEBUG" if args.verbose else "INFO")
    if args.list:
        for prefix, left in sorted(find_leftovers().items()):
            owner = left.owner_alive()
            print(
                f"{prefix}: {len(left.namespaces)} namespaces, {len(left.pins)} pin dirs, {len(left.dirs)} dirs"
                + (f" (owner pid {owner} alive)" if owner else "")
            )
        return 0
    cleaned = cleanup(args.prefix, args.force)
    print(f"cleaned {len(cleaned)} lab(s){': ' + ' '.join(cleaned) if cleaned else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
