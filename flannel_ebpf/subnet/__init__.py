"""The control plane: flannel's leases in etcd (registry), this host's lease and its peers (manager)."""

import os

# gRPC's C core writes its own lines to stderr (e.g. `E1130 ... Decryption error: TSI_DATA_CORRUPTED` on a
# refused client certificate) beside the one line the agent says about the same failure. Read when gRPC
# initialises, so set before aetcd imports it; an operator's GRPC_VERBOSITY still wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
