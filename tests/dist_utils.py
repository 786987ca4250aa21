"""Run a test body on several CPU processes joined by a gloo process group (the OLMo-core way: every parallel
feature is tested on a laptop).

    run_on_ranks(body, tmp_path, world_size=2)     # body(rank, world_size) on each process; raises on failure

A file store under the test's tmp_path rendezvouses the ranks, so no port has to be found free.
"""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

requires_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                   reason="torch.distributed with the gloo backend is not available")


def _entry(rank: int, body, store: str, world_size: int) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.manual_seed(0)
    # A short timeout turns a rank stuck in a collective into a failure instead of a hung test run.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        body(rank, world_size)
        # Leave together: a rank that tears gloo down while its peer is still finishing the last collective
        # can abort the peer at exit ("terminate called without an active exception", ~1 run in 10 without).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(body, tmp_path, world_size: int = 2) -> None:
    """`body(rank, world_size)` on `world_size` spawned processes; an exception on any rank fails the test.

    `body` must be a module-level function (spawned processes import it by name).
    """
    mp.spawn(_entry, args=(body, str(tmp_path / "store"), world_size), nprocs=world_size, join=True)
