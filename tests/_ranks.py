"""Running a test's work on several gloo ranks in child processes, without the transport's teardown race.

gloo's TCP transport throws from a background thread when a peer closes its socket while this rank still
holds the connection, and the uncaught C++ exception aborts the process (SIGABRT, no Python traceback).
A rank that finished early and destroyed its process group could so kill a slower one. ``gloo_ranks`` ends
with a barrier, so no rank closes before every rank is done; ``run_ranks`` starts the ranks and, if one was
killed by a signal (never a Python exception: that fails the test at once), runs them once more with a
warning, so a transport crash on a loaded machine does not read as a wrong result.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp

RANK_TIMEOUT = timedelta(minutes=5)     # a rank waiting on a dead peer fails after this, not after gloo's 30 min


@contextmanager
def gloo_ranks(rank: int, world: int, init_file: str):
    """A gloo process group for this rank; on success every rank meets at a barrier before any tears down."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=RANK_TIMEOUT)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(worker, out_dir: str, nprocs: int, start_method: str = "spawn") -> None:
    """Run ``worker(rank, init_file, out_dir)`` on ``nprocs`` processes; once more if a rank died of a signal.

    Each try meets at its own rendezvous file in ``out_dir``: a file store left by a crashed try is not reused.
    """
    for attempt in (1, 2):
        init_file = os.path.join(out_dir, f"init-{attempt}")
        try:
            mp.start_processes(worker, args=(init_file, out_dir), nprocs=nprocs, join=True, start_method=start_method)
            return
        except mp.ProcessExitedException as crash:
            if not crash.signal_name or attempt == 2:
                raise
            warnings.warn(f"a rank was killed by {crash.signal_name} (gloo transport); running the ranks once more",
                          RuntimeWarning, stacklevel=2)
