"""`python -m flannel_ebpf.bench [--quick] [--out DIR] [--backends a,b,...]`: run the benchmark."""

import sys

from flannel_ebpf.bench.runner import main

sys.exit(main())
