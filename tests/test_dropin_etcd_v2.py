"""The etcd v2 hint's pieces that need no etcd: the copy command for every kind of endpoint, and a probe
that finds nothing where nothing answers. (The lab test runs the command against a real etcd.)"""

from __future__ import annotations

import time

from flannel_ebpf.lab.etcd import free_port
from flannel_ebpf.subnet.etcd_v2 import V2Config, copy_command, find_v2_config, hint
from flannel_ebpf.subnet.registry import EtcdTLS

KEY = "/coreos.com/network/config"


def test_copy_command_plaintext():
    assert copy_command("http://10.0.0.1:2379", KEY) == (
        f"ETCDCTL_API=2 etcdctl --endpoints=http://10.0.0.1:2379 get {KEY} | "
        f"ETCDCTL_API=3 etcdctl --endpoints=http://10.0.0.1:2379 put {KEY}"
    )


def test_copy_command_names_tls_files_and_user_as_each_etcdctl_wants_them():
    tls = EtcdTLS(cafile="/etc/ca.pem", certfile="/etc/c.pem", keyfile="/etc/k.pem")
    cmd = copy_command("https://e:2379", "/my net/config", tls, "flannel")
    get, put = cmd.split(" | ")
    assert get == (
        "ETCDCTL_API=2 etcdctl --endpoints=https://e:2379 --ca-file=/etc/ca.pem --cert-file=/etc/c.pem "
        "--key-file=/etc/k.pem --username=flannel get '/my net/config'"
    )
    assert put == (
        "ETCDCTL_API=3 etcdctl --endpoints=https://e:2379 --cacert=/etc/ca.pem --cert=/etc/c.pem "
        "--key=/etc/k.pem --user=flannel put '/my net/config'"
    )


def test_hint_is_one_line_with_the_command():
    text = hint(V2Config("http://e:2379", KEY, '{"Network":"10.5.0.0/16"}'))
    assert "\n" not in text and text.endswith(copy_command("http://e:2379", KEY))
    assert text.startswith(f"no network config at {KEY} in etcd v3, but etcd's v2 store at http://e:2379 has one")


def test_probe_finds_nothing_where_nothing_answers_and_does_not_linger():
    began = time.monotonic()
    assert find_v2_config([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"], KEY) is None
    assert time.monotonic() - began < 3
