"""The `docker-opts`, `bridge` and `cni-config` subcommands (registered by flannel_ebpf.cli)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping

from flannel_ebpf.flags import FLAGS
from flannel_ebpf.host.files import atomic_write

from . import bridge as bridge_mod
from . import cni as cni_mod
from . import docker_opts as docker_mod

COMMANDS = ("docker-opts", "bridge", "cni-config")


def _default(environ: Mapping[str, str], flag: str) -> str:
    """A flag's default as `up` has it: FLANNELD_<NAME> from the environment, else flannel-ebpf's own."""
    spec = next(f for f in FLAGS if f.name == flag)
    return environ.get(spec.env, spec.default)


def add_parsers(sub: argparse._SubParsersAction, environ: Mapping[str, str]) -> None:  # type: ignore[type-arg]
    subnet_file = _default(environ, "subnet-file")
    state_dir = _default(environ, "state-dir")

    def common(p: argparse.ArgumentParser, short_f: bool = False) -> None:
        names = ["-f", "--subnet-file"] if short_f else ["--subnet-file"]
        p.add_argument(*names, default=subnet_file, help=f"flannel's subnet file (default {subnet_file})")
        p.add_argument("-v", "--v", dest="verbose", type=int, nargs="?", const=1, default=0, help="log more")

    d = sub.add_parser(
        "docker-opts",
        help="write dockerd's --bip/--mtu/--ip-masq from subnet.env, as flannel's mk-docker-opts.sh",
        description="Options and output as flannel's mk-docker-opts.sh: neither -i nor -c means both.",
    )
    common(d, short_f=True)
    d.add_argument("-d", "--output", default=docker_mod.DEFAULT_OUTPUT, help="file to write (default %(default)s)")
    d.add_argument("-i", dest="individual", action="store_true", help="each option as its own DOCKER_OPT_* variable")
    d.add_argument("-c", dest="combined", action="store_true", help="all options in one variable (see -k)")
    d.add_argument("-k", dest="key", default=docker_mod.DEFAULT_KEY, help="the combined variable's name (%(default)s)")
    d.add_argument("-m", dest="no_ip_masq", action="store_true", help="no --ip-masq (older Docker)")

    b = sub.add_parser(
        "bridge",
        help="create or fix a bridge (docker0, lxcbr0, cni0) with the lease's gateway address and MTU",
    )
    b.add_argument("name", nargs="?", default=bridge_mod.DEFAULT_BRIDGE, help="bridge name (default %(default)s)")
    common(b)
    b.add_argument("--state-dir", default=state_dir, help="where the bridge is recorded for `health` (%(default)s)")

    c = sub.add_parser("cni-config", help="write the CNI conflist flannel's CNI plugin would produce")
    common(c)
    c.add_argument("-o", "--output", default=cni_mod.DEFAULT_OUTPUT, help="file to write, - for stdout (%(default)s)")
    c.add_argument("--network-name", default=cni_mod.DEFAULT_NETWORK_NAME, help="CNI network name (%(default)s)")
    c.add_argument("--bridge", default=cni_mod.DEFAULT_BRIDGE, help="bridge name (%(default)s)")
    c.add_argument("--cni-version", default=cni_mod.DEFAULT_CNI_VERSION, help="cniVersion (%(default)s)")
    c.add_argument("--no-portmap", action="store_true", help="leave the portmap plugin out")


def _read_subnet_env(path: str) -> dict[str, str] | None:
    try:
        with open(path) as f:
            return docker_mod.parse_subnet_env(f.read())
    except OSError as e:
        print(f"flannel-ebpf: cannot read the subnet file {path}: {e.strerror} (is flannel-ebpf up running?)",
              file=sys.stderr)  # fmt: skip
        return None


def cmd_docker_opts(args: argparse.Namespace) -> int:
    env = _read_subnet_env(args.subnet_file)
    if env is None:
        return 1
    opts = docker_mod.DockerOptsOptions(args.individual, args.combined, args.key, not args.no_ip_masq)
    try:
        text = docker_mod.render(env, opts, os.environ)
    except docker_mod.DockerOptsError as e:
        print(e, file=sys.stderr)
        return 1
    atomic_write(args.output, text)
    subnet = docker_mod.own_subnet({**os.environ, **env})
    if subnet is not None:
        clash = docker_mod.conflicting_routes(subnet, docker_mod.main_table_routes())
        if clash:
            r = clash[0]
            print(f"Your routing table already contains the subnet: {r.dst} via {r.gateway} dev {r.dev}",
                  file=sys.stderr)  # fmt: skip
            return 1
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    env = _read_subnet_env(args.subnet_file)
    if env is None:
        return 1
    try:
        spec = bridge_mod.BridgeSpec.from_subnet_env(args.name, env)
        result = bridge_mod.ensure_bridge(spec, bridge_mod.load_record(args.state_dir))
    except bridge_mod.BridgeError as e:
        print(f"flannel-ebpf: bridge: {e}", file=sys.stderr)
        return 1
    bridge_mod.save_record(args.state_dir, spec, os.path.abspath(args.subnet_file))
    print(result.summary())
    return 0


def cmd_cni_config(args: argparse.Namespace) -> int:
    env = _read_subnet_env(args.subnet_file)
    if env is None:
        return 1
    options = cni_mod.CniOptions(args.network_name, args.bridge, args.cni_version, not args.no_portmap)
    try:
        text = cni_mod.render(env, options)
    except cni_mod.CniConfigError as e:
        print(f"flannel-ebpf: cni-config: {e}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(text)
    else:
        atomic_write(args.output, text)
        print(f"wrote {args.output}")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "docker-opts": cmd_docker_opts,
    "bridge": cmd_bridge,
    "cni-config": cmd_cni_config,
}


def health_line(state_dir: str, iface: str, subnet: str, mtu: int) -> tuple[bool, str]:
    """`health`'s line for a ready agent: (True, "ready ...") or (False, "not-ready ...").

    Without a bridge recorded: `ready <iface> subnet:<lease network> mtu:<overlay MTU>`.
    With one (`flannel-ebpf bridge` ran): `ready <bridge name without its number>:<gateway>
    subnet:<FLANNEL_SUBNET> mtu:<MTU>`, e.g. `ready lxcbr:10.10.16.1 subnet:10.10.16.1/24 mtu:1472`, and
    not-ready when the bridge no longer matches the lease (see bridge.live_problem)."""
    record = bridge_mod.load_record(state_dir)
    if record is None:
        return True, f"ready {iface} subnet:{subnet} mtu:{mtu}"
    try:
        problem = bridge_mod.live_problem(record, subnet, mtu)
    except Exception as e:  # netlink unreadable: say so rather than guess
        problem = f"cannot read bridge {record.name}: {e}"
    if problem:
        return False, f"not-ready {problem}"
    return True, f"ready {bridge_mod.health_fields(record)}"
