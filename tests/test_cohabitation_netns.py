"""XDP attach next to another tool, in a namespace of its own (no agent, no etcd): a foreign program is
refused by name and id unless replacing it was asked, ours is swapped in place, and a program attached
meanwhile by someone else is never clobbered (the kernel checks the expected program).

"Ours" is foreign_progs.c compiled with its XDP function renamed flannel_xdp_in: the agent knows its
programs by their kernel name, so this is exactly what it would see."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flannel_ebpf.lab.agent import cli_env
from flannel_ebpf.lab.netns import Netns, create_netns, delete_netns, new_prefix
from tests.foreign import compile_foreign, xdp_prog

pytestmark = [
    pytest.mark.bpf,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]

# Runs inside the namespace: attach with the real Loader.attach_xdp / attach.xdp_attach, print JSON.
DRIVER = r"""
import json, socket, sys
from flannel_ebpf.datapath import bpfsys
from flannel_ebpf.loaders import attach
from flannel_ebpf.loaders.base import Loader, LoaderError

class ById(Loader):
    '''A loader whose programs are already in the kernel (put there by iproute2): fds by id.'''
    def __init__(self, ids, policy=None):
        super().__init__("/nonexistent", policy)
        self.ids = ids
    def load(self, programs):
        pass
    def program_fd(self, program):
        return bpfsys.prog_fd_by_id(self.ids[program])

step, dev, prog_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
index = socket.if_nametoindex(dev)
loader = ById({"flannel_xdp_in": prog_id})
out = {}
try:
    if step == "attach":
        a = loader.attach_xdp("flannel_xdp_in", index, "auto")
        out["attached"] = a.prog_id
    elif step == "attach-replace-flag":
        a = loader.attach_xdp("flannel_xdp_in", index, "auto", replace_foreign=True)
        out["attached"] = a.prog_id
    elif step == "attach-replace-policy":
        loader = ById({"flannel_xdp_in": prog_id}, attach.HostPolicy(replace_foreign_xdp=True))
        a = loader.attach_xdp("flannel_xdp_in", index, "generic")
        out["attached"], out["mode"] = a.prog_id, a.xdp_mode
    elif step == "attach-stale":
        attach.xdp_attach(index, loader.program_fd("flannel_xdp_in"), "auto", expected_id=int(sys.argv[4]))
        out["attached"] = prog_id
except (LoaderError, attach.AttachError) as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Netns]:
    n = create_netns(f"{new_prefix()}-xdp", tmp_path)
    try:
        n.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        n.ip("link", "add", "eth2", "type", "veth", "peer", "name", "eth3")
        for dev in ("eth0", "eth1", "eth2", "eth3"):
            n.ip("link", "set", dev, "up")
        yield n
    finally:
        delete_netns(n.name)


def drive(ns: Netns, *args: object) -> dict:
    r = ns.exec([sys.executable, "-c", DRIVER, *map(str, args)], env=cli_env())
    return json.loads(r.stdout)


def test_foreign_xdp_is_refused_by_name_unless_asked_and_ours_is_swapped(ns: Netns, tmp_path: Path) -> None:
    foreign_obj = compile_foreign(tmp_path)
    ours_v1 = compile_foreign(tmp_path, {"foreign_xdp": "flannel_xdp_in"}, "ours1.o")
    ours_v2 = compile_foreign(tmp_path, {"foreign_xdp": "flannel_xdp_in", "FOREIGN_XDP_MARK": "999"}, "ours2.o")
    # Our two program versions sit on spare devices (eth1, eth3) only to have them in the kernel.
    ns.ip("link", "set", "dev", "eth1", "xdp", "obj", str(ours_v1), "sec", "xdp")
    ns.ip("link", "set", "dev", "eth3", "xdp", "obj", str(ours_v2), "sec", "xdp")
    v1, v2 = xdp_prog(ns, "eth1"), xdp_prog(ns, "eth3")
    assert v1 is not None and v2 is not None and v1.name == v2.name == "flannel_xdp_in"
    ns.ip("link", "set", "dev", "eth0", "xdp", "obj", str(foreign_obj), "sec", "xdp")
    foreign = xdp_prog(ns, "eth0")
    assert foreign is not None and foreign.name == "foreign_xdp"

    # 1. Refused, one line naming the program that is there; it stays.
    out = drive(ns, "attach", "eth0", v1.prog_id)
    print(out)
    assert "error" in out and "\n" not in out["error"]
    assert f"foreign_xdp (id {foreign.prog_id}, native)" in out["error"]
    assert "--xdp-replace-foreign" in out["error"]
    assert xdp_prog(ns, "eth0") == foreign

    # 2. Asked for (the flag as the agent gets it: the process's policy): replaced.
    out = drive(ns, "attach-replace-flag", "eth0", v1.prog_id)
    assert out == {"attached": v1.prog_id}, out
    assert xdp_prog(ns, "eth0").prog_id == v1.prog_id

    # 3. Ours (same kernel name, another version: a restarted agent) is replaced without asking.
    out = drive(ns, "attach", "eth0", v2.prog_id)
    assert out == {"attached": v2.prog_id}, out
    assert xdp_prog(ns, "eth0").prog_id == v2.prog_id

    # 4. An attach that expects a program which is no longer there (another tool swapped it
    #    meanwhile) replaces nothing.
    out = drive(ns, "attach-stale", "eth0", v1.prog_id, v1.prog_id)
    assert "changed while we attached" in out.get("error", ""), out
    assert xdp_prog(ns, "eth0").prog_id == v2.prog_id

    # 5. --xdp-replace-foreign through the loader's policy (as `up`'s backend makes it), and a
    #    mode change (native -> generic) of a foreign program: detached only as the expected one.
    ns.ip("link", "set", "dev", "eth0", "xdp", "off")
    ns.ip("link", "set", "dev", "eth0", "xdp", "obj", str(foreign_obj), "sec", "xdp")
    out = drive(ns, "attach-replace-policy", "eth0", v1.prog_id)
    assert out == {"attached": v1.prog_id, "mode": "generic"}, out
    now = xdp_prog(ns, "eth0")
    assert now is not None and now.prog_id == v1.prog_id and now.mode == 2  # generic
