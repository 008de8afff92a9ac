"""`flannel-ebpf`: up / down / status / health. Flags and FLANNELD_* variables, all in one place.

As with flanneld, every flag can be set in the environment: `--etcd-endpoints` is FLANNELD_ETCD_ENDPOINTS.
A flag on the command line wins over the environment. With no sub-command, `flannel-ebpf --flags...` runs
`up`, so that it starts like flanneld. Flags are read as Go's flag package reads flanneld's: `-iface=eth0`,
`-iface eth0`, `--iface=eth0` and `--iface eth0` are the same, a boolean alone (`-ip-masq`) is true.
The flag table itself (shared with the runtime sub-commands) is flannel_ebpf.flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from ipaddress import IPv4Address
from typing import Any

from loguru import logger

from flannel_ebpf import package_version, status_view
from flannel_ebpf import state as state_file
from flannel_ebpf.flags import FALSE_WORDS, FLAGS, TRUE_WORDS, UNSUPPORTED, Flag
from flannel_ebpf.host.types import BackendOptions
from flannel_ebpf.logs import configure_logging, printable
from flannel_ebpf.runtimes import commands as runtime_commands
from flannel_ebpf.subnet.manager import LeaseOptions
from flannel_ebpf.subnet.store import EtcdTLS

COMMANDS = ("up", "down", "status", "health", *runtime_commands.COMMANDS)


_GO_FLAG = re.compile(r"--?([A-Za-z][A-Za-z0-9_.-]*)(=.*)?", re.DOTALL)


def go_style_argv(argv: list[str]) -> list[str]:
    """Rewrite Go flag-package spellings into the one argparse reads, before argparse sees them.

    Go's flag package (flanneld's) takes `-name` and `--name` alike, a value as `-name=v` or `-name v`,
    and a boolean only as `-name` (true) or `-name=v`: `-ip-masq false` is ip-masq=true followed by a
    stray argument. So every `-name...` becomes `--name...`; a boolean given alone becomes `--name=true`
    (argparse must not take the next word as its value); a flag that takes a value and the word after it
    become one `--name=word` (argparse would refuse a value starting with a dash, such as a password);
    `-h`/`-help` become `--help`. One-letter options stay as they are: argparse reads `-v`, `-v 2` and
    `-v=2` (flanneld's klog verbosity) itself, and sub-commands may have short options of their own."""
    booleans = {f.name for f in FLAGS if f.kind == "bool"} | {n for n, u in UNSUPPORTED.items() if u.boolean}
    takes_value = {f.name for f in FLAGS if f.kind != "bool"} | {n for n, u in UNSUPPORTED.items() if not u.boolean}
    out: list[str] = []
    rest = iter(argv)
    for token in rest:
        if token == "--":  # Go's end of flags: the rest is passed on as it is
            out += [token, *rest]
            break
        match = _GO_FLAG.fullmatch(token)
        if match is None:  # a sub-command, a value, `-` or a negative number
            out.append(token)
            continue
        name, value = match.group(1), match.group(2)
        if name in ("h", "help") and value is None:
            out.append("--help")
        elif len(name) == 1:
            out.append(token)
        elif value is not None:
            out.append(f"--{name}{value}")
        elif name in booleans:
            out.append(f"--{name}=true")
        elif name in takes_value:
            word = next(rest, None)  # missing at the very end: argparse says "expected one argument"
            out.append(f"--{name}" if word is None else f"--{name}={word}")
        else:  # not one of ours (a sub-command's own flag, or unknown): argparse decides
            out.append(f"--{name}")
    return out


def refuse_unsupported(argv: list[str], environ: dict[str, str]) -> list[str]:
    """One line naming a flanneld flag (or its FLANNELD_* variable) flannel-ebpf lacks, and exit 2, before
    argparse could print its generic usage error. `argv` is in go_style_argv's form (`--name=value`).
    Returns `argv` without the unsupported flags whose value changes nothing in flanneld either."""
    kept: list[str] = []
    found: list[tuple[str, str, str]] = []  # (how it was given, flag name, value)
    tokens = iter(argv)
    for token in tokens:
        if token == "--":
            kept += [token, *tokens]
            break
        name, _, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if name in UNSUPPORTED:
            found.append((f"flag --{name}", name, value if "=" in token else "(missing)"))
        else:
            kept.append(token)
    for name in UNSUPPORTED:
        env = "FLANNELD_" + name.upper().replace("-", "_")
        if env in environ:
            found.append((f"{env} (flag --{name})", name, environ[env]))
    for how, name, value in found:
        spec = UNSUPPORTED[name]
        if value.strip().lower() in spec.harmless:
            continue  # flanneld's own default (or a no-op there): accepted, as flanneld would
        print(f"flannel-ebpf: {how} of flanneld is not supported by flannel-ebpf ({spec.why})", file=sys.stderr)
        raise SystemExit(2)
    return kept


def _env_value(flag: Flag, raw: str) -> Any:
    """Convert a FLANNELD_* value; a bad one is a clear error, not a traceback."""
    if flag.kind == "bool":
        if raw.lower() in TRUE_WORDS | FALSE_WORDS:
            return raw.lower() in TRUE_WORDS
    elif flag.kind == "int":
        if raw.strip().lstrip("-").isdigit():
            return int(raw)
    elif flag.kind == "float":
        try:
            return float(raw)
        except ValueError:
            pass
    elif flag.kind == "list":
        return [item.strip() for item in raw.split(",") if item.strip()]
    elif flag.kind == "choice":
        if raw in flag.choices:
            return raw
    else:
        return raw
    raise SystemExit(f"flannel-ebpf: invalid {flag.env}={raw!r} ({flag.kind} expected)")


def _bool_arg(raw: str) -> bool:
    if raw.lower() in TRUE_WORDS | FALSE_WORDS:
        return raw.lower() in TRUE_WORDS
    raise argparse.ArgumentTypeError(f"not a boolean: {raw!r}")


def _add_flags(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    for flag in FLAGS:
        default = _env_value(flag, environ[flag.env]) if flag.env in environ else flag.default
        opt = "--" + flag.name
        help_text = f"{flag.help} [{flag.env}]"
        if flag.kind == "bool":
            # `--ip-masq` alone means true, as in flanneld; `--ip-masq=false` is accepted too.
            parser.add_argument(opt, type=_bool_arg, nargs="?", const=True, default=default, help=help_text)
        elif flag.kind == "list":
            parser.add_argument(opt, action="append", default=None, help=help_text)
            parser.set_defaults(**{flag.name.replace("-", "_") + "_env": default})
        elif flag.kind == "choice":
            parser.add_argument(opt, choices=flag.choices, default=default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(flag.kind, str)
            parser.add_argument(opt, type=kind, default=default, help=help_text)
    verbose = environ.get("FLANNELD_V", "0") or "0"
    if not verbose.isdigit():
        raise SystemExit(f"flannel-ebpf: invalid FLANNELD_V={verbose!r} (int expected)")
    parser.add_argument(
        "-v", "--v", dest="verbose", type=int, nargs="?", const=1, default=int(verbose), help="log more [FLANNELD_V]"
    )
    # flanneld's -version works among its other flags: here after the sub-command (or the implied `up`) too
    parser.add_argument("--version", action="version", version=f"flannel-ebpf {package_version()}")


def build_parser(environ: dict[str, str] | None = None) -> argparse.ArgumentParser:
    environ = dict(os.environ if environ is None else environ)
    common = argparse.ArgumentParser(add_help=False)
    _add_flags(common, environ)
    parser = argparse.ArgumentParser(prog="flannel-ebpf", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"flannel-ebpf {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", parents=[common], help="run the agent (the default)")
    down = sub.add_parser("down", parents=[common], help="remove everything `up` made on this host")
    down.add_argument("--release-lease", action="store_true", help="also delete this host's lease in etcd")
    down.add_argument(
        "--keep-datapath",
        action="store_true",
        help="hand the host back to flanneld: leave vxlan's device, host-gw/vxlan routes, neighbours, FDB "
        "entries, the iptables chains and the subnet file for flanneld to adopt; udp's eBPF path goes, its "
        "route moved onto a flanneld TUN started beforehand",
    )
    status = sub.add_parser("status", parents=[common], help="lease, peers, data path and counters")
    status.add_argument("--json", action="store_true", help="machine-readable output (`summary`: docs/OPERATIONS.md)")
    status.add_argument("--watch", action="store_true", help="refresh the summary and its rates every 2 s")
    status.add_argument("--long", action="store_true", help="everything: every peer, program, map and counter")
    status.add_argument("--watch-count", type=int, default=None, help=argparse.SUPPRESS)  # tests: redraws, then exit
    sub.add_parser("health", parents=[common], help="`ready ...` or `not-ready <reason>` (exit 0/1)")
    runtime_commands.add_parsers(sub, environ)  # docker-opts, bridge, cni-config: subnet.env for runtimes
    return parser


def _list_flag(args: argparse.Namespace, name: str) -> list[str]:
    given = getattr(args, name)
    if given is None:
        return list(getattr(args, name + "_env"))
    return [item.strip() for value in given for item in value.split(",") if item.strip()]


def agent_options(args: argparse.Namespace) -> Any:
    from flannel_ebpf.options import AgentOptions

    if not 1 <= args.subnet_lease_renew_margin <= 1439:
        raise SystemExit("flannel-ebpf: --subnet-lease-renew-margin must be between 1 and 1439 minutes")
    if args.subnet_lease_ttl < 10:
        raise SystemExit("flannel-ebpf: --subnet-lease-ttl must be at least 10 seconds")
    if args.public_ip:
        try:
            IPv4Address(args.public_ip)
        except ValueError:
            raise SystemExit(f"flannel-ebpf: --public-ip {args.public_ip!r} is not an IPv4 address") from None
    if args.iface_can_reach:
        try:
            IPv4Address(args.iface_can_reach)
        except ValueError:
            raise SystemExit(
                f"flannel-ebpf: --iface-can-reach {args.iface_can_reach!r} is not an IPv4 address"
            ) from None
    for pattern in _list_flag(args, "iface_regex"):
        try:
            re.compile(pattern)
        except re.error as e:
            raise SystemExit(f"flannel-ebpf: --iface-regex {pattern!r} is not a valid regex: {e}") from None
    for path in (args.etcd_cafile, args.etcd_certfile, args.etcd_keyfile):
        if path and not os.access(path, os.R_OK):
            raise SystemExit(f"flannel-ebpf: cannot read etcd TLS file {path}")
    if args.listen and args.remote:
        raise SystemExit("flannel-ebpf: --listen and --remote are mutually exclusive")
    for path in (args.remote_cafile, args.remote_certfile, args.remote_keyfile):
        if path and not os.access(path, os.R_OK):
            raise SystemExit(f"flannel-ebpf: cannot read TLS file {path}")
    if (
        args.listen
        and (args.remote_cafile or args.remote_keyfile)
        and not (args.remote_certfile and args.remote_keyfile)
    ):
        raise SystemExit("flannel-ebpf: a TLS server (--listen) needs --remote-certfile and --remote-keyfile")
    if args.etcd_retry_max <= 0 or args.subnet_relist_interval < 0:
        raise SystemExit("flannel-ebpf: --etcd-retry-max must be > 0 and --subnet-relist-interval >= 0")
    networks = network_names(args)
    if networks and args.net_config_path:
        raise SystemExit("flannel-ebpf: --net-config-path and --networks exclude each other (each network's "
                         "config is <etcd-prefix>/<network>/config)")  # fmt: skip
    return AgentOptions(
        networks=networks,
        subnet_dir=args.subnet_dir,
        etcd_endpoints=[e.strip() for e in args.etcd_endpoints.split(",") if e.strip()],
        etcd_prefix=args.etcd_prefix,
        etcd_tls=EtcdTLS(cafile=args.etcd_cafile, certfile=args.etcd_certfile, keyfile=args.etcd_keyfile),
        etcd_username=args.etcd_username,
        etcd_password=args.etcd_password,
        etcd_api=args.etcd_api,
        subnet_len_rule=args.subnet_len_rule,
        ifaces=_list_flag(args, "iface"),
        iface_regexes=_list_flag(args, "iface_regex"),
        iface_can_reach=args.iface_can_reach,
        net_config_path=args.net_config_path,
        public_ip=args.public_ip,
        subnet_file=args.subnet_file,
        state_dir=args.state_dir,
        ip_masq=args.ip_masq,
        iptables_forward_rules=args.iptables_forward_rules,
        iptables_resync=float(args.iptables_resync),
        healthz_ip=args.healthz_ip,
        healthz_port=args.healthz_port,
        resync_interval=args.resync_interval,
        listen=args.listen,
        remote=args.remote,
        remote_network=getattr(args, "network_name", ""),  # one network of a multi-network agent (down)
        remote_tls=EtcdTLS(cafile=args.remote_cafile, certfile=args.remote_certfile, keyfile=args.remote_keyfile),
        listen_trust_any_client=args.listen_trust_any_client,
        lease=LeaseOptions(
            ttl=args.subnet_lease_ttl,
            renew_margin=args.subnet_lease_renew_margin * 60.0,
            check_interval=args.lease_check_interval,
            allow_subnet_change=args.allow_subnet_change,
            retry_max=args.etcd_retry_max,
            relist_interval=args.subnet_relist_interval,
        ),
        backend=BackendOptions(
            state_dir=args.state_dir,
            bpf_pin_dir=args.bpf_pin_dir,
            udp_datapath=args.udp_datapath,
            udp_decap=args.udp_decap,
            udp_delivery=args.udp_delivery,
            udp_encap=args.udp_encap,
            udp_allow_foreign_source=args.udp_allow_foreign_source,
            xdp_mode=args.xdp_mode,
            loader=args.loader,
            xdp_replace_foreign=args.xdp_replace_foreign,
            clsact_record_dir=args.state_dir,
        ),
    )


NETWORK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def network_names(args: argparse.Namespace) -> list[str]:
    """--networks (FLANNELD_NETWORKS) as a list; each name becomes an etcd key part, a file name and a
    directory name, so only plain names are taken."""
    names = [n.strip() for n in (args.networks or "").split(",") if n.strip()]
    for name in names:
        if not NETWORK_NAME.fullmatch(name):
            raise SystemExit(f"flannel-ebpf: --networks: {name!r} is not a network name (letters, digits, _ . -)")
    if len(set(names)) != len(names):
        raise SystemExit(f"flannel-ebpf: --networks names a network twice: {args.networks}")
    from flannel_ebpf import ipmasq

    if collision := ipmasq.chain_name_collision(names):
        raise SystemExit(f"flannel-ebpf: --networks: {collision}")
    return names


def recorded_networks(args: argparse.Namespace, beside_classic: bool = False) -> list[str]:
    """The networks `status`, `health` and `down` look at: --networks when given, else those a
    multi-network agent left state for under --state-dir (none: classic mode). A classic agent's state
    there wins over networks of an earlier multi-network run, except for `down` (`beside_classic`),
    which removes both."""
    names = network_names(args)
    if names:
        return names
    if not beside_classic and os.path.exists(state_file.path(args.state_dir)):
        return []
    from flannel_ebpf.options import NETWORKS_STATE_SUBDIR

    base = os.path.join(args.state_dir, NETWORKS_STATE_SUBDIR)
    try:
        found = sorted(d for d in os.listdir(base) if os.path.exists(state_file.path(os.path.join(base, d))))
    except OSError:
        return []
    return found


def network_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """The arguments as one network of a multi-network agent sees them (its state dir, env file, pins)."""
    from flannel_ebpf.options import network_state_dir

    return argparse.Namespace(
        **{
            **vars(args),
            "state_dir": network_state_dir(args.state_dir, name),
            "subnet_file": os.path.join(args.subnet_dir, f"{name}.env"),
            "bpf_pin_dir": os.path.join(args.bpf_pin_dir, name),
            "etcd_prefix": f"{args.etcd_prefix.rstrip('/')}/{name}",
            "networks": "",
            "network_name": name,
        }
    )


def setup_logging(verbose: int) -> None:
    configure_logging("DEBUG" if verbose else "INFO")


# --- commands ---------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from flannel_ebpf.agent import run_agent

    options = agent_options(args)
    if options.listen:  # the server of client/server mode: no networking, no state dir (as flanneld v0.5)
        from flannel_ebpf.remote.server import run_server

        return run_server(options)
    try:
        lock = state_file.InstanceLock.acquire(args.state_dir, "up")
    except state_file.AlreadyRunning as e:
        print(f"flannel-ebpf: {e}", file=sys.stderr)
        return 1
    with lock:  # held for the agent's whole life
        return run_agent(options)


def cmd_health(args: argparse.Namespace) -> int:
    """`ready ...` only while the agent that wrote the state runs (same PID and start time), is ready,
    keeps its heartbeat, and (udp eBPF) the programs it reported are still attached. Multi-network mode:
    one `<network>: <line>` per network, exit 0 only when every network is ready."""
    networks = recorded_networks(args)
    if not networks:
        ok, line = _health(args.state_dir, args.resync_interval)
        print(line)
        return 0 if ok else 1
    all_ok = True
    for name in networks:
        ok, line = _health(network_args(args, name).state_dir, args.resync_interval)
        print(f"{name}: {line}")
        all_ok = all_ok and ok
    return 0 if all_ok else 1


def _health(state_dir: str, resync_interval: float) -> tuple[bool, str]:
    st = state_file.load(state_dir)
    if st is None:
        return False, f"not-ready no agent state in {state_dir} (is flannel-ebpf up running?)"
    gone = state_file.agent_gone(st)
    if gone:
        return False, f"not-ready {gone}; last phase {st.phase}"
    if st.phase != "ready":
        return False, f"not-ready {st.phase}: {st.reason}"
    age, limit = time.time() - st.updated, state_file.heartbeat_limit(resync_interval)
    if age > limit:
        return (
            False,
            f"not-ready no heartbeat from the agent (pid {st.pid}) for {age:.0f}s (limit {limit:.0f}s): stuck?",
        )
    missing = _missing_programs(st)
    if missing:
        return False, f"not-ready {missing}"
    # With a bridge made by `flannel-ebpf bridge`: its form (`ready lxcbr:10.10.16.1 subnet:... mtu:...`).
    return runtime_commands.health_line(state_dir, st.iface.get("name", "?"), st.subnet, st.mtu)


def _missing_programs(st: state_file.AgentState) -> str | None:
    """For the udp eBPF backend: which of the programs the agent reported attached (its heartbeat's
    status) are no longer where it saw them, as the kernel has them now; None when all are there."""
    options = st.options()
    if st.backend_type != "udp" or options.udp_datapath != "ebpf":
        return None
    from flannel_ebpf.backends import make_backend
    from flannel_ebpf.backends.udp.device import DEVICE
    from flannel_ebpf.backends.udp_ebpf import UdpEbpfBackend
    from flannel_ebpf.datapath import layout

    local = st.local_network()
    recorded = [p for p in (st.backend_status or {}).get("programs") or [] if isinstance(p, dict)]
    if not recorded and local is not None:  # no status reported yet: at least encap and a decap
        recorded = [{"program": layout.PROG_ENCAP, "device": DEVICE, "hook": "tc-egress"}]
    try:
        backend = make_backend(st.backend_type, st.backend_config, options)
        assert isinstance(backend, UdpEbpfBackend)
        devices = None
        if local is not None:  # look where the agent looks (underlay, flannel0, its bridge), not everywhere
            bridge = (st.backend_status or {}).get("container_bridge") or {}
            index, name = bridge.get("bridge_index"), bridge.get("bridge")
            devices = backend.watched_devices(local.ext, (index, name) if index and name else None)
        live = backend.programs_in_kernel(devices)
    except Exception as e:
        return f"cannot check the eBPF programs: {e}"

    def same(want: dict[str, Any], have: dict[str, Any]) -> bool:
        where = all(want.get(k) == have.get(k) for k in ("program", "device", "hook"))
        ids = (want.get("prog_id") or 0, have.get("prog_id") or 0)
        return where and (0 in ids or ids[0] == ids[1])

    gone = [w for w in recorded if not any(same(w, h) for h in live)]
    if local is not None and not any(p.get("device") == local.ext.name for p in live):
        gone.append({"program": "decap", "device": local.ext.name, "hook": "xdp or tc-ingress"})
    if not gone:
        return None
    what = ", ".join(f"{g.get('program')} ({g.get('hook')} on {g.get('device')})" for g in gone)
    return f"eBPF programs gone: {what}"


def cmd_status(args: argparse.Namespace) -> int:
    """The agent's state; multi-network mode: every network's (`--json`: {"networks": {name: doc}}). By
    default a short summary with rates over one second (`--watch`: refreshed every 2 s); `--long`: all."""
    networks = recorded_networks(args)
    if not args.json and not args.long:
        dirs = [(name, network_args(args, name).state_dir) for name in networks] or [("", args.state_dir)]
        if args.watch or args.watch_count:
            return status_view.watch(lambda window: _summaries(dirs, args.resync_interval, window)[1], 2.0,
                                     args.watch_count)  # fmt: skip
        code, text = _summaries(dirs, args.resync_interval, 1.0)
        print(text, file=sys.stdout if code == 0 else sys.stderr)
        return code
    if not networks:
        return _status(args.state_dir, args.json, args.resync_interval)
    if args.json:
        docs = {name: _status_doc(network_args(args, name).state_dir, args.resync_interval) for name in networks}
        print(json.dumps({"networks": docs}, indent=2, default=str))
        return 0 if all(docs.values()) else 1
    code = 0
    for name in networks:
        print(f"=== network {name}")
        code |= _status(network_args(args, name).state_dir, False, args.resync_interval)
    return code


def _summaries(dirs: list[tuple[str, str]], resync_interval: float, window: float) -> tuple[int, str]:
    """The summary of each network (name, state dir), rates over `window` seconds: (exit code, text)."""
    states = [(name, d, state_file.load(d)) for name, d in dirs]
    before = {d: status_view.read_counters(st) for _, d, st in states if st is not None}
    if any(v is not None for v in before.values()):
        time.sleep(window)
    parts, code = [], 0
    for name, d, st in states:
        head = f"=== network {name}\n" if name else ""
        if st is None:
            parts.append(f"{head}no agent state in {d}: flannel-ebpf is not running here")
            code = 1
            continue
        after = status_view.read_counters(st) if before.get(d) is not None else None
        doc = status_view.summary(st, _health(d, resync_interval), before.get(d), after, window)
        parts.append(head + status_view.format_summary(doc))
    return code, "\n\n".join(parts)


def _status_doc(state_dir: str, resync_interval: float = 10.0) -> dict[str, Any] | None:
    st = state_file.load(state_dir)
    if st is None:
        return None
    live = _live_backend_status(st) if st.backend_type else {}
    summary = status_view.summary(st, _health(state_dir, resync_interval), status_view.read_counters(st))
    return {"running": state_file.agent_gone(st) is None, **st.__dict__, "live": live, "summary": summary}


def _status(state_dir: str, as_json: bool, resync_interval: float = 10.0) -> int:
    st = state_file.load(state_dir)
    if st is None:
        print(f"no agent state in {state_dir}: flannel-ebpf is not running here", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(_status_doc(state_dir, resync_interval), indent=2, default=str))
        return 0
    running = state_file.agent_gone(st) is None
    live: dict[str, Any] = {}
    if st.backend_type:
        live = _live_backend_status(st)
    expires = st.lease.get("expiration")
    left = f"{(expires - time.time()) / 3600:.1f} h left" if expires else "no expiry (reservation)"
    print(f"agent      pid {st.pid} {'running' if running else 'NOT running'}, phase {st.phase} {st.reason}")
    if st.remote:  # client mode: the leases are the server's; this host talks to no etcd
        print(f"server     {st.remote} network {st.network_name or '_'}")
    else:
        print(f"etcd       {','.join(st.etcd_endpoints)} prefix {st.etcd_prefix}")
    print(f"network    {st.network}  backend {st.backend_type}  mtu {st.mtu}")
    lease_id = st.lease.get("lease_id", 0)
    held = "(through the server)" if st.remote else f"(etcd lease {lease_id:x})"
    print(f"lease      {st.subnet or '-'}  {left if st.lease else ''}  {held}")
    print(
        f"interface  {st.iface.get('name', '-')} {st.iface.get('address', '')} public {st.iface.get('public_ip', '')}"
    )
    print(f"watch      last revision {st.last_revision}, {st.relists} listing(s)")
    print(f"peers      {len(st.peers)}")
    if st.peers_refused:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(st.peers_refused.items()))
        print(f"refused    {sum(st.peers_refused.values())} lease(s) not taken as peers: {counts}")
        for peer in st.refused_peers:  # what lease writers wrote: escaped, never terminal controls
            print(f"  {printable(str(peer['subnet'])):<18} of  {printable(str(peer['public_ip'])):<15} "
                  f"{printable(str(peer['reason']))}")  # fmt: skip
    for peer in st.peers:
        print(f"  {printable(str(peer['subnet'])):<18} via {printable(str(peer['public_ip'])):<15} "
              f"{printable(str(peer['backend_type']))}")  # fmt: skip
    shown = live or st.backend_status
    if shown:
        print("data path" + ("" if live else " (as of the agent's last update)"))
        print(format_backend_status(shown))
    return 0


def format_backend_status(status: dict[str, Any]) -> str:
    """Readable lines for what a backend's status() returned: programs, maps and counters get their own
    layout, anything else one `key: value` line each (JSON for nested values)."""
    lines = []
    for program in status.get("programs") or []:
        ident = f" id {program['prog_id']}" if program.get("prog_id") else ""
        mode = f" ({program['xdp_mode']})" if program.get("xdp_mode") else ""
        lines.append(
            f"  program  {program.get('program')} on {program.get('device')} {program.get('hook')}{mode}{ident}"
        )
    maps = status.get("maps") or {}
    if maps:
        lines.append(f"  maps     {maps.get('pin_dir', '')}: {len(maps.get('peers') or {})} peer(s), "
                     f"{len(maps.get('members') or {})} member(s), "
                     f"{len(maps.get('endpoints') or {})} local endpoint(s)")  # fmt: skip
        for subnet, public_ip in (maps.get("peers") or {}).items():
            lines.append(f"           {subnet:<18} -> {public_ip}")
        counters = maps.get("counters") or {}
        if counters:
            lines.append(f"  {'counter':<24} {'packets':>12} {'bytes':>16}")
            for name, value in counters.items():
                lines.append(f"  {name:<24} {value.get('packets', 0):>12} {value.get('bytes', 0):>16}")
    for key, value in status.items():
        if key in ("programs", "maps"):
            continue
        text = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
        lines.append(f"  {key}: {text}")
    return "\n".join(lines)


def _live_backend_status(st: state_file.AgentState) -> dict[str, Any]:
    """Ask the backend about the kernel now (counters keep moving while the agent is down)."""
    from flannel_ebpf.backends import make_backend

    try:
        backend = make_backend(st.backend_type, st.backend_config, st.options())
        live = backend.status() if backend.status_from_kernel else {}
        # Known only to the agent that loaded the programs: taken from its last heartbeat.
        agent_view = st.backend_status or {}
        for key in ("loader", "decap", "kernel_features", "container_bridge"):
            if key in agent_view:
                live[key] = agent_view[key]
        return live
    except Exception as e:
        return {"error": f"cannot read the data path: {e}"}


def cmd_down(args: argparse.Namespace) -> int:
    # The state dir's lock: no agent runs (nor starts) while we remove its data path. No dir, no agent.
    lock = None
    if os.path.isdir(args.state_dir):
        try:
            lock = state_file.InstanceLock.acquire(args.state_dir, "down")
        except state_file.AlreadyRunning as e:
            print(f"flannel-ebpf: {e}", file=sys.stderr)
            return 1
    try:
        networks = recorded_networks(args, beside_classic=True)
        if not networks:
            return _down(args)
        # Multi-network mode: every network's data path, rules, env file and state; a classic agent's
        # state left in the same state dir goes too.
        failures = _down(args) if os.path.exists(state_file.path(args.state_dir)) else 0
        for name in networks:
            logger.info("network {}: removing its data path", name)
            failures += _down(network_args(args, name))
        return 1 if failures else 0
    finally:
        if lock is not None:
            lock.release()


#: backends whose kernel state flanneld adopts as it is, so `down --keep-datapath` leaves it: vxlan's
#: flannel.<VNI> (flanneld keeps a compatible device, its VtepMAC and so its lease value unchanged) and the
#: per-peer routes, neighbour and FDB entries both write alike. udp's eBPF path and its flannel0 go; a flanneld
#: started before `down` (its TUN is then flannel1, by its name pattern flannel%d) gets the Network's route.
HANDED_BACK = ("vxlan", "host-gw")


def _down(args: argparse.Namespace) -> int:
    from flannel_ebpf.backends import make_backend
    from flannel_ebpf.backends.udp_ebpf import UdpEbpfBackend

    st = state_file.load(args.state_dir)
    opts = agent_options(args)
    network_name = getattr(args, "network_name", "")
    if st is None and network_name:
        # A network of a multi-network agent that left no state: nothing of it is known to remove (the
        # classic by-name sweep would take the other networks' devices and routes too).
        logger.info("network {}: no state in {}; nothing to remove", network_name, args.state_dir)
        return 0
    if st is None:
        logger.info("no state in {}; removing what can be found by name", args.state_dir)
        backend_types = ["udp", "vxlan", "host-gw"]
        local = None
        backend_options = opts.backend
    else:
        backend_types = [st.backend_type] if st.backend_type else []
        local = st.local_network()
        backend_options = st.options()
    failures = 0
    keep = getattr(args, "keep_datapath", False)
    for backend_type in backend_types:
        if keep and backend_type in HANDED_BACK:
            logger.info("kept the {} data path for flanneld to adopt (--keep-datapath)", backend_type)
            continue
        try:
            backend = make_backend(backend_type, st.backend_config if st else {}, backend_options)
            if keep and isinstance(backend, UdpEbpfBackend):
                backend.teardown(local, hand_over=True)  # the route onto a running flanneld's TUN first
            else:
                backend.teardown(local)
            logger.info("removed the {} data path", backend_type)
        except Exception as e:
            failures += 1
            logger.error("removing the {} data path failed: {}", backend_type, e)
    from flannel_ebpf import ipmasq

    if keep:
        logger.info("kept the iptables chains: flanneld adds the same ones")
    elif ipmasq.iptables_available():
        try:
            ipmasq.teardown_chains(ipmasq.all_flannel_chains(network_name))
        except Exception as e:
            failures += 1
            logger.error("removing iptables rules failed: {}", e)
    if args.release_lease and st is not None and st.subnet:
        failures += not asyncio.run(_release_lease(opts, st))
    if failures:
        # Keep the record: a `down` run again after fixing the cause still knows the underlay and dirs.
        logger.error("down did not finish; kept {} for another try", state_file.path(args.state_dir))
        return 1
    subnet_path = st.subnet_file if st else args.subnet_file
    # Handed back: the subnet file stays for the container runtime until flanneld rewrites it (same lease).
    for path in ([] if keep else [subnet_path]) + [state_file.path(args.state_dir)]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return 0


async def _release_lease(opts: Any, st: state_file.AgentState) -> bool:
    from ipaddress import IPv4Network

    registry = opts.registry()
    try:
        lease = await registry.get_lease(IPv4Network(st.subnet))
        if lease is None:
            logger.info("lease {} is already gone from {}", st.subnet, "the lease server" if opts.remote else "etcd")
            return True
        if str(lease.public_ip) != st.iface.get("public_ip"):
            logger.error("lease {} is held by {} now, not by this host; leaving it", st.subnet, lease.public_ip)
            return False
        ok: bool = await registry.delete_lease(lease)
        logger.info("released lease {}", st.subnet) if ok else logger.error("lease {} changed; kept", st.subnet)
        return ok
    except Exception as e:
        logger.error("releasing lease {} failed: {}", st.subnet, e)
        return False
    finally:
        await registry.close()


def parse_argv(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    """The command line as flanneld would read it (Go flag spellings, FLANNELD_*), into argparse's."""
    environ = dict(os.environ if environ is None else environ)
    if argv and argv[0] in runtime_commands.COMMANDS:  # getopt-style short options (-ic, -kKEY), not Go's
        return build_parser(environ).parse_args(argv)
    argv = refuse_unsupported(go_style_argv(list(argv)), environ)
    if not argv or argv[0] not in (*COMMANDS, "--help", "--version"):
        argv.insert(0, "up")  # `flannel-ebpf --flags` starts the agent, like flanneld
    return build_parser(environ).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_argv(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.verbose)
    handlers = {"up": cmd_up, "down": cmd_down, "status": cmd_status, "health": cmd_health}
    handler = {**handlers, **runtime_commands.HANDLERS}[args.command]
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
