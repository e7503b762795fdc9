"""Each rank's share of the batches: every ``world_size``-th batch, starting at the rank."""
from __future__ import annotations

import math
from typing import Iterable, Iterator

from rowsft.distributed.ranks import rank, world_size


class ShardedBatches:
    """Every ``world_size``-th batch of a re-iterable ``batches``, starting at ``rank``.

    All ranks must iterate the same ``batches`` in the same order (``rowsft.batches`` shuffles by seed
    and epoch, so the same seed on every rank gives the same order); each rank then sees a disjoint
    share. ``len`` is the same on every rank (the last incomplete round is dropped), so the collective
    calls of DDP and FSDP2 stay in step.
    """

    def __init__(self, batches: Iterable[dict], rank_: int | None = None, world_size_: int | None = None):
        self.batches = batches
        self.rank = rank() if rank_ is None else int(rank_)
        self.world_size = world_size() if world_size_ is None else int(world_size_)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")

    def __len__(self) -> int:
        return len(self.batches) // self.world_size  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict]:
        rounds = len(self) if hasattr(self.batches, "__len__") else math.inf
        for i, batch in enumerate(self.batches):
            if i // self.world_size >= rounds:
                return
            if i % self.world_size == self.rank:
                yield batch

    def __repr__(self) -> str:
        return f"<ShardedBatches rank {self.rank}/{self.world_size} of {self.batches!r}>"


__all__ = ["ShardedBatches"]
