"""rowsft on several processes: torch.distributed, DDP, accelerate and FSDP2, and what is not supported.

Data parallel (DDP), on every rank::

    scores = rowsft.score(model, local_calibration_batches)   # all-reduces the scores across ranks
    selection = rowsft.select(scores, budget=64)              # same scores -> same rows everywhere
    rowsft.distributed.check_same_selection(selection)        # optional, cheap: raises if ranks disagree
    rowsft.apply(model, selection)                            # BEFORE wrapping
    model = DistributedDataParallel(model)                    # or accelerator.prepare(model, optimizer)
    ... train; DDP averages the gradients of the deltas only (frozen weights have no gradient) ...
    if rowsft.distributed.is_main_process():
        rowsft.save_adapter(rowsft.distributed.unwrap(model), "runs/x")

Sharded (FSDP2) when the frozen model does not fit one device, on every rank::

    rowsft.apply(model, selection)                            # BEFORE sharding, as for DDP
    rowsft.distributed.shard(model)                           # fully_shard per block, then the root
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ... train on ShardedBatches; FSDP2 gathers each block's weights when it runs ...
    rowsft.save_adapter(model, "runs/x")                      # on EVERY rank: gathers the deltas, rank 0 writes

Wrapping or sharding first and applying afterwards does not work: DDP and ``fully_shard`` take over the
parameters that exist when they run and would never synchronise the new deltas (refused with a message,
:func:`check_can_apply`). FSDP1 and DeepSpeed are refused with a message naming FSDP2
(:func:`check_supported_wrapper`).

Modules: `ranks` (process group facts, rank 0 does it and the others wait), `wrappers` (DDP / FSDP
detection, unwrap, refusals), `selections` (one selection on every rank), `batches` (each rank's share),
`sharding` (FSDP2: shard, gather and scatter, bytes per rank).
"""
from __future__ import annotations

from rowsft.distributed.batches import ShardedBatches
from rowsft.distributed.ranks import barrier, is_distributed, is_main_process, rank, run_on_main_process, world_size
from rowsft.distributed.selections import broadcast_selection, check_same_selection, selection_digest
from rowsft.distributed.sharding import (
    check_can_shard,
    check_not_sharded,
    copy_full_into,
    dtensor_class,
    fsdp_modules,
    full_tensor,
    is_dtensor,
    is_sharded,
    local_bytes,
    reshard,
    shard,
    transformer_blocks,
)
from rowsft.distributed.wrappers import (
    SHARD_ORDER,
    SUPPORTED_PATH,
    check_can_apply,
    check_supported_wrapper,
    unwrap,
    wrapper_kind,
)

__all__ = ["ShardedBatches", "barrier", "is_distributed", "is_main_process", "rank", "run_on_main_process", "world_size",
           "broadcast_selection", "check_same_selection", "selection_digest", "check_can_shard", "check_not_sharded",
           "copy_full_into",
           "dtensor_class", "fsdp_modules", "full_tensor", "is_dtensor", "is_sharded", "local_bytes", "reshard", "shard",
           "transformer_blocks", "SHARD_ORDER", "SUPPORTED_PATH", "check_can_apply", "check_supported_wrapper", "unwrap",
           "wrapper_kind"]
