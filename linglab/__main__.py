"""`python -m linglab ...`, and so `torchrun --nproc_per_node N -m linglab train ...`: the `linglab` CLI."""

import sys

from linglab.cli import main

sys.exit(main())
