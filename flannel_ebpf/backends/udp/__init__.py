"""The udp backend's own parts: the flannel0 device, the guard that makes it again, delivery of
decapsulated packets into containers (eBPF path) and the TUN forwarding process (TUN path)."""
