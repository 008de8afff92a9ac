"""What container runtimes read from flannel, made from `subnet.env` as flannel's users make it.

- `docker_opts`: the options file flannel's mk-docker-opts.sh writes for dockerd (`--bip`, `--mtu`,
  `--ip-masq`), same options, same output.
- `bridge`: a Linux bridge (docker0, lxcbr0, cni0) holding the lease's gateway address with the overlay
  MTU, as `dockerd --bip` or LXD/LXC's bridge would hold it; recorded for `flannel-ebpf health`.
- `cni`: the conflist flannel's CNI plugin amounts to (bridge + host-local + portmap).

These read the subnet file only; none talks to etcd or to the agent.
"""
