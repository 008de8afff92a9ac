"""The eBPF udp data path as Python sees it: map layout, drop reasons, bpf(2) map access.

One definition, used by the udp_ebpf backend, by `flannel-ebpf status`, by both loaders and by tests.
"""
