"""One selection on every rank: a digest to compare, a check that raises when ranks differ, a broadcast.

Different rows on different ranks would give deltas of different meaning (or shapes) that DDP would
average, or FSDP2 would shard, into garbage. ``rowsft.score`` all-reduces the scores under an
initialised process group, so every rank selects the same rows; these helpers verify or enforce it.
"""
from __future__ import annotations

import hashlib
import json

import torch

from rowsft.distributed.ranks import is_distributed, rank, world_size


def selection_digest(selection) -> str:
    """A short hash of a Selection's layers, units and indices (the same on ranks that chose the same rows)."""
    layers = {name: [choice.unit, list(choice.shape), choice.indices.tolist()]
              for name, choice in sorted(selection.layers.items())}
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


def check_same_selection(selection) -> str:
    """Raise when the ranks of the process group hold different selections; returns the digest.

    A no-op in a single process.
    """
    digest = selection_digest(selection)
    if not is_distributed():
        return digest
    digests: list = [None] * world_size()
    torch.distributed.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks selected different rows (selection digests per rank: {digests}). Score with "
                           "rowsft.score under the initialised process group (it all-reduces the scores, so every "
                           "rank selects the same rows), or share rank 0's choice with "
                           "rowsft.distributed.broadcast_selection(selection).")
    return digest


def broadcast_selection(selection, src: int = 0):
    """Rank ``src``'s Selection on every rank (the selection itself in a single process)."""
    if not is_distributed():
        return selection
    payload = [selection.to_dict() if rank() == src else None]
    torch.distributed.broadcast_object_list(payload, src=src)
    return type(selection).from_dict(payload[0])


__all__ = ["selection_digest", "check_same_selection", "broadcast_selection"]
