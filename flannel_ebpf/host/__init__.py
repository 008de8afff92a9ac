"""The host below the backends: its underlay interface, the lease it holds, the agent's options for a
backend, and writing its files. Nothing here knows a backend."""
