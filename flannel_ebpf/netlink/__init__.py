"""rtnetlink for the routed backends: our routes (proto 102) and how they are reconciled (`routes`), and
packed requests and dumps in bulk for full syncs (`bulk`)."""
