"""The Vagrant lab's Vagrantfile is valid (`vagrant validate`), for both of its shapes: the local box in
qemu:///session with qemu's own networks, and a public box with the providers' private networks. No VM is
booted here (`make vagrant-up` does that). Skipped only where vagrant is not installed (`make setup`
installs it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flannel_ebpf.lab.traffic import parse_cpu_times
from flannel_ebpf.lab.vagrant import VagrantNode

VAGRANT_DIR = Path(__file__).resolve().parents[1] / "vagrant"

pytestmark = [
    pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed (make setup)"),
    pytest.mark.service,  # runs vagrant
]


def _validate(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, VAGRANT_CWD=str(VAGRANT_DIR), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
             VAGRANT_CHECKPOINT_DISABLE="1", **env)  # fmt: skip
    return subprocess.run(["vagrant", "validate"], env=e, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("box", "backend", "hosts"),
    [("flannel-ebpf/debian12", "udp", "3"), ("flannel-ebpf/debian12", "vxlan", "2"),
     ("debian/bookworm64", "host-gw", "3")],
)  # fmt: skip
def test_vagrantfile_validates(tmp_path: Path, box: str, backend: str, hosts: str) -> None:
    r = _validate(tmp_path, FLANNEL_VAGRANT_BOX=box, FLANNEL_VAGRANT_BACKEND=backend, FLANNEL_VAGRANT_HOSTS=hosts)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


def test_vagrantfile_refuses_unknown_backend(tmp_path: Path) -> None:
    r = _validate(tmp_path, FLANNEL_VAGRANT_BACKEND="ipsec")
    assert "FLANNEL_VAGRANT_BACKEND must be udp, vxlan or host-gw" in r.stdout + r.stderr


TCG_LINE = "/dev/kvm is PVM here"


def test_on_a_pvm_host_the_lab_says_once_that_it_uses_tcg(tmp_path: Path) -> None:
    pvm = tmp_path / "kvm_pvm"
    pvm.mkdir()
    r = _validate(tmp_path, FLANNEL_VAGRANT_PVM_MODULE=str(pvm))
    assert r.returncode == 0, r.stdout + r.stderr
    said = [line for line in (r.stdout + r.stderr).splitlines() if TCG_LINE in line]
    assert len(said) == 1 and "using TCG (driver qemu, cpu mode custom" in said[0], r.stdout + r.stderr


@pytest.mark.parametrize("driver", ["kvm", "qemu"])
def test_a_chosen_driver_or_a_host_without_pvm_gets_no_tcg_notice(tmp_path: Path, driver: str) -> None:
    pvm = tmp_path / "kvm_pvm"
    pvm.mkdir()
    chosen = _validate(tmp_path, FLANNEL_VAGRANT_PVM_MODULE=str(pvm), FLANNEL_VAGRANT_DRIVER=driver)
    plain = _validate(tmp_path, FLANNEL_VAGRANT_PVM_MODULE=str(tmp_path / "absent"))
    for r in (chosen, plain):
        assert r.returncode == 0 and TCG_LINE not in r.stdout + r.stderr, r.stdout + r.stderr


def test_scripts_parse() -> None:
    for script in ("build-box.sh", "provision.sh"):
        subprocess.run(["bash", "-n", str(VAGRANT_DIR / script)], check=True, timeout=10)
    out = subprocess.run(["bash", str(VAGRANT_DIR.parent / "scripts" / "setup.sh"), "--print-packages"],
                         capture_output=True, text=True, check=True, timeout=10).stdout.split()  # fmt: skip
    assert "python3-bpfcc" in out and "etcd-server" in out


def test_bench_refuses_an_unknown_data_path() -> None:
    # argument checking happens before any vagrant call: no VM is needed
    r = subprocess.run([sys.executable, "-m", "flannel_ebpf.lab.vagrant", "bench", "--variants", "udp-xdp,ipsec"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2
    assert "unknown variant(s) ipsec; choose from udp-xdp, udp-tc, vxlan, host-gw" in r.stderr


def test_vm_cpu_times_parse_from_proc_stat_text() -> None:
    # what the bench reads from each VM's /proc/stat (USER_HZ 100): busy = user nice system irq softirq steal
    text = "cpu  100 5 50 1000 20 3 7 2 0 0\ncpu0 100 5 50 1000 20 3 7 2 0 0\nintr 1\n"
    times = parse_cpu_times(text)
    assert times.busy == pytest.approx(1.67) and times.idle == pytest.approx(10.2)
    with pytest.raises(RuntimeError, match="no aggregate cpu line in host1:/proc/stat"):
        parse_cpu_times("intr 1\n", "host1:/proc/stat")


def test_vm_commands_go_through_the_lab_namespace_with_a_terminal_only_for_long_ones(tmp_path: Path) -> None:
    node = VagrantNode("host1/c1", "host1", tmp_path / "ssh-config", tmp_path, "c1", ("/lab-ns.sh",))
    argv = node.wrap(["iperf3", "-s"], env={"A": "1"}, tty=True)
    # the prefix runs ssh (a "-tt" before "ssh" would be run as the command: exit 127)
    assert argv[:3] == ["/lab-ns.sh", "ssh", "-tt"]
    assert argv[-4:] == ["host1", "--", "sudo", "env A=1 ip netns exec c1 iperf3 -s"]
    assert "-tt" not in node.wrap(["true"])
