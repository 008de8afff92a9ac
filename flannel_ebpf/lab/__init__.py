"""The namespace lab: hosts, an underlay, etcd, agents and containers for tests, demo and benchmark.

Never imported by the agent. `from flannel_ebpf.lab.lab import Lab` is the entry point; see lab.py.
"""
