"""flannel's iptables rules: `--ip-masq` (nat FLANNEL-POSTRTG) and `--iptables-forward-rules` (filter
FLANNEL-FWD), the same rules, comments and order as flanneld v0.20.2 (network/iptables.go).

flanneld writes them with one `iptables-restore --noflush` transaction so that no foreign rule can land
between them, and re-checks them every `--iptables-resync` seconds (5). We do the same: `setup()` is one
transaction that declares the chain (which empties it), refills it in order and puts exactly one jump at
the top of the parent chain; `ensure()` is the periodic check and rebuilds on any difference (a missing
rule, a foreign rule inside our chain, a missing or duplicated jump). `teardown()` removes the jumps and
the chains (flanneld leaves empty chains behind; we do not).

iptables runs in the caller's network namespace; tests run this module under `ip netns exec`.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Network

from loguru import logger

KUBE_PROXY_MARK = "0x4000/0x4000"
MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"


class IptablesError(RuntimeError):
    """iptables failed; the message carries its stderr."""


@dataclass(frozen=True)
class FlannelChain:
    """One flannel chain: its table, the built-in chain that jumps to it, and its rules in order."""

    table: str
    parent: str  # built-in chain holding the jump, at position 1
    name: str
    comment: str
    rules: tuple[tuple[str, ...], ...] = field(default_factory=tuple)

    @property
    def jump(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", self.comment, "-j", self.name)


#: iptables' longest chain name (XT_EXTENSION_MAXNAMELEN - 1)
CHAIN_NAME_MAX = 28


def chain_name(base: str, network_name: str = "") -> str:
    """flannel's chain name, or in multi-network mode one per network (`FLANNEL-FWD-BLUE`), so that one
    network's rules never replace another's. A name too long for iptables is shortened with a hash."""
    if not network_name:
        return base
    suffix = re.sub(r"[^A-Za-z0-9_]", "_", network_name).upper()
    room = CHAIN_NAME_MAX - len(base) - 1
    if len(suffix) > room:
        digest = hashlib.sha1(network_name.encode()).hexdigest()[:4].upper()
        suffix = f"{suffix[: room - 5]}_{digest}"
    return f"{base}-{suffix}"


def chain_name_collision(network_names: list[str]) -> str:
    """The one line refusing networks whose chains would be the same ("" when every network gets its own):
    the mapping folds case and `-`, `.` and `_` (`blue`, `Blue`; `a-b`, `a.b`, `a_b`), and a long name is
    cut to fit; two such networks would rewrite each other's rules every few seconds."""
    for base in (MASQ_CHAIN, FORWARD_CHAIN):
        seen: dict[str, str] = {}
        for name in network_names:
            chain = chain_name(base, name)
            if chain in seen and seen[chain] != name:
                return (
                    f"networks {seen[chain]!r} and {name!r} would share the iptables chain {chain}: "
                    "rename one (network names must differ in more than case and - . _)"
                )
            seen[chain] = name
    return ""


def masq_chain(network: IPv4Network, subnet: IPv4Network, random_fully: bool, network_name: str = "") -> FlannelChain:
    """flanneld's MasqRules(network, lease): masquerade traffic leaving the overlay, nothing inside it."""
    n, sn = str(network), str(subnet)
    c = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE", "--random-fully") if random_fully else ("-j", "MASQUERADE")
    return FlannelChain(
        table="nat",
        parent="POSTROUTING",
        name=chain_name(MASQ_CHAIN, network_name),
        comment=MASQ_COMMENT,
        rules=(
            # kube-proxy already masquerades what it marks: a second NAT breaks on some kernels
            ("-m", "mark", "--mark", KUBE_PROXY_MARK, *c, "-j", "RETURN"),
            # overlay to overlay (e.g. out of docker0 to a peer): never NAT
            ("-s", n, "-d", n, *c, "-j", "RETURN"),
            # overlay to the outside world, except multicast: NAT
            ("-s", n, "!", "-d", "224.0.0.0/4", *c, *masq),
            # outside traffic to our own containers arriving from the node that owns them: keep the source
            ("!", "-s", n, "-d", sn, *c, "-j", "RETURN"),
            # the host itself towards other hosts' containers: NAT to an address they can answer
            ("!", "-s", n, "-d", n, *c, *masq),
        ),
    )


def forward_chain(network: IPv4Network, network_name: str = "") -> FlannelChain:
    """flanneld's ForwardRules(network): accept forwarding to and from the overlay (Docker sets the
    FORWARD policy to DROP)."""
    n = str(network)
    c = ("-m", "comment", "--comment", FORWARD_COMMENT)
    return FlannelChain(
        table="filter",
        parent="FORWARD",
        name=chain_name(FORWARD_CHAIN, network_name),
        comment=FORWARD_COMMENT,
        rules=(("-s", n, *c, "-j", "ACCEPT"), ("-d", n, *c, "-j", "ACCEPT")),
    )


def _quote(arg: str) -> str:
    """Quote an argument for an iptables-restore line (the comments contain a space)."""
    return f'"{arg}"' if re.search(r"\s", arg) else arg


@dataclass
class Iptables:
    """A thin runner for the iptables binaries (`-w`: wait for the xtables lock, never fail on it)."""

    binary: str = "iptables"
    restore_binary: str = "iptables-restore"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, "-w", "5", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise IptablesError(f"{' '.join(cmd)}: {proc.stderr.strip() or proc.returncode}")
        return proc

    def restore(self, payload: str) -> None:
        # --noflush: touch only what the payload names; one transaction for all of it
        proc = subprocess.run(
            [self.restore_binary, "-w", "5", "--noflush"], input=payload, capture_output=True, text=True, timeout=30
        )
        if proc.returncode != 0:
            raise IptablesError(f"iptables-restore failed: {proc.stderr.strip()}\n--- payload ---\n{payload}")

    def chain_exists(self, table: str, chain: str) -> bool:
        return self.run("-t", table, "-S", chain, check=False).returncode == 0

    def rule_exists(self, table: str, chain: str, spec: tuple[str, ...]) -> bool:
        return self.run("-t", table, "-C", chain, *spec, check=False).returncode == 0

    def count_rules(self, table: str, chain: str) -> int:
        proc = self.run("-t", table, "-S", chain, check=False)
        if proc.returncode != 0:
            return 0
        return sum(1 for line in proc.stdout.splitlines() if line.startswith("-A "))

    def version(self) -> tuple[int, int, int]:
        out = self.run("--version", check=False).stdout
        m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
        return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else (0, 0, 0)

    def has_random_fully(self) -> bool:
        """As flanneld (go-iptables): iptables >= 1.6.2 supports MASQUERADE --random-fully."""
        return self.version() >= (1, 6, 2)


def iptables_available() -> bool:
    return shutil.which("iptables") is not None and shutil.which("iptables-restore") is not None


@dataclass
class ChainManager:
    """Owns a set of flannel chains: set them up, keep them right, remove them."""

    chains: list[FlannelChain]
    ipt: Iptables = field(default_factory=Iptables)

    def _count_jumps(self, chain: FlannelChain) -> int:
        return len(jump_positions(self.ipt, chain))

    def setup(self) -> None:
        """Install every chain in one iptables-restore transaction. Idempotent: running it again leaves
        the same rules (never duplicates), and it repairs anything that drifted."""
        by_table: dict[str, list[str]] = {}
        for chain in self.chains:
            lines = by_table.setdefault(chain.table, [])
            # declaring a user chain with --noflush creates it, or empties it if it exists
            lines.append(f":{chain.name} - [0:0]")
            # drop every existing jump (ours, or an older one of another shape), bottom up so that the
            # positions stay valid, then put exactly one at the top
            for pos in sorted(jump_positions(self.ipt, chain), reverse=True):
                lines.append(f"-D {chain.parent} {pos}")
            lines.append(" ".join(["-I", chain.parent, "1", *map(_quote, chain.jump)]))
            for rule in chain.rules:
                lines.append(" ".join(["-A", chain.name, *map(_quote, rule)]))
        payload = "".join(f"*{table}\n" + "\n".join(lines) + "\nCOMMIT\n" for table, lines in by_table.items())
        self.ipt.restore(payload)
        logger.info("iptables: set up {}", ", ".join(f"{c.table}/{c.name}" for c in self.chains))

    def problems(self) -> list[str]:
        """What differs from the wanted state (empty when all is right): the resync check."""
        found: list[str] = []
        for chain in self.chains:
            if not self.ipt.chain_exists(chain.table, chain.name):
                found.append(f"{chain.table}/{chain.name} is missing")
                continue
            jumps = self._count_jumps(chain)
            if jumps != 1:
                found.append(f"{chain.table}/{chain.parent} has {jumps} jumps to {chain.name}, want 1")
            for rule in chain.rules:
                if not self.ipt.rule_exists(chain.table, chain.name, rule):
                    found.append(f"{chain.table}/{chain.name} lacks: {' '.join(rule)}")
            count = self.ipt.count_rules(chain.table, chain.name)
            if count != len(chain.rules):
                found.append(f"{chain.table}/{chain.name} has {count} rules, want {len(chain.rules)}")
        return found

    def ensure(self) -> bool:
        """The periodic check (flanneld: every 5 s). Rebuilds when anything drifted; True if it did."""
        found = self.problems()
        if not found:
            return False
        logger.warning("iptables: rules drifted ({}); recreating them", "; ".join(found))
        self.setup()
        return True

    def teardown(self) -> None:
        """Remove the jumps and the chains. Safe to run when they are already gone."""
        teardown_chains(self.chains, self.ipt)


def jump_positions(ipt: Iptables, chain: FlannelChain) -> list[int]:
    """1-based positions in the parent chain of every rule jumping to `chain`, whatever else it says."""
    proc = ipt.run("-t", chain.table, "-S", chain.parent, check=False)
    rules = [line for line in proc.stdout.splitlines() if line.startswith("-A ")]
    target = re.compile(rf"(^|\s)-j {re.escape(chain.name)}(\s|$)")
    return [i + 1 for i, line in enumerate(rules) if target.search(line)]


def teardown_chains(chains: list[FlannelChain], ipt: Iptables | None = None) -> None:
    ipt = ipt or Iptables()
    for chain in chains:
        # every jump to our chain (an older flanneld's too), bottom up so positions stay valid
        for pos in sorted(jump_positions(ipt, chain), reverse=True):
            ipt.run("-t", chain.table, "-D", chain.parent, str(pos))
        if ipt.chain_exists(chain.table, chain.name):
            ipt.run("-t", chain.table, "-F", chain.name)
            ipt.run("-t", chain.table, "-X", chain.name)
            logger.info("iptables: removed {}/{}", chain.table, chain.name)


def all_flannel_chains(network_name: str = "") -> list[FlannelChain]:
    """The chains `flannel-ebpf down` removes when it does not know the network (rules do not matter
    for a teardown: it removes by chain name); `network_name`: that network's (multi-network mode)."""
    any_net = IPv4Network("0.0.0.0/32")
    return [masq_chain(any_net, any_net, False, network_name), forward_chain(any_net, network_name)]


def make_manager(
    network: IPv4Network,
    subnet: IPv4Network,
    *,
    ip_masq: bool,
    forward_rules: bool,
    ipt: Iptables | None = None,
    network_name: str = "",
) -> ChainManager:
    """The agent's entry point: the chains flanneld would install for these flags."""
    ipt = ipt or Iptables()
    chains: list[FlannelChain] = []
    if ip_masq:
        chains.append(masq_chain(network, subnet, ipt.has_random_fully(), network_name))
    if forward_rules:
        chains.append(forward_chain(network, network_name))
    return ChainManager(chains, ipt)
