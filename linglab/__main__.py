"""`python -m linglab ...`, and so `torchrun --nproc_per_node N -m linglab train ...`: the `linglab` CLI."""

import sys

from linglab.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports it (`linglab pipeline`'s parallel RL seeds)
    sys.exit(main())
