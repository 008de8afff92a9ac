"""flannel's client/server mode (flanneld v0.5's `--listen` / `--remote`): server.py serves the lease API
over etcd, client.py is the registry an agent uses instead of etcd."""
