"""rowsft on several processes: torch.distributed, DDP, accelerate — and what is not supported.

The supported path, in order, on every rank::

    scores = rowsft.score(model, local_calibration_batches)   # all-reduces the scores across ranks
    selection = rowsft.select(scores, budget=64)              # same scores -> same rows everywhere
    rowsft.distributed.check_same_selection(selection)        # optional, cheap: raises if ranks disagree
    rowsft.apply(model, selection)                            # BEFORE wrapping
    model = DistributedDataParallel(model)                    # or accelerator.prepare(model, optimizer)
    ... train; DDP averages the gradients of the deltas only (frozen weights have no gradient) ...
    if rowsft.distributed.is_main_process():
        rowsft.save_adapter(rowsft.distributed.unwrap(model), "runs/x")

Wrapping first and applying afterwards does not work: DDP registers its parameters when it is built
and would never synchronise the new deltas. FSDP / DeepSpeed ZeRO shard the weights that the sparse
layers read and fold into; rowsft refuses them with a message naming the supported path
(:func:`check_supported_wrapper`). The model of a row-sparse fine-tune is usually small enough that
plain data parallelism (DDP) is the right tool: only ``k × d_in`` gradients per layer are reduced.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Iterable, Iterator

import torch
from torch import nn

SUPPORTED_PATH = ("rowsft supports single-process training and data parallelism (torch DDP, or accelerate "
                  "with the default multi-GPU/multi-CPU setup): score, select and rowsft.apply(model, selection) "
                  "on every rank first, then wrap the model (DistributedDataParallel(model) or "
                  "accelerator.prepare(model, optimizer)).")


# ---------------------------------------------------------------- process group facts
def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group is initialised (torchrun, accelerate launch, spawn)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the rank that saves adapters and prints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()


# ---------------------------------------------------------------- wrappers
def wrapper_kind(model: nn.Module) -> str | None:
    """How ``model`` is wrapped for parallel training: ``"ddp"``, ``"dataparallel"``, ``"fsdp"`` (FSDP1
    or a submodule of it), ``"fsdp2"`` (``fully_shard``), ``"deepspeed"``, or ``None`` for a plain model."""
    if _is_deepspeed(model):
        return "deepspeed"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    if isinstance(model, nn.DataParallel):
        return "dataparallel"
    fsdp1, fsdp2 = _fsdp_classes()
    for module in model.modules():
        if fsdp1 is not None and isinstance(module, fsdp1):
            return "fsdp"
        if fsdp2 is not None and isinstance(module, fsdp2):
            return "fsdp2"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / accelerate / ``torch.compile`` wrappers (itself otherwise)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_deepspeed(model):
            model = model.module
        elif hasattr(model, "_orig_mod"):          # torch.compile
            model = model._orig_mod
    return model


def check_can_apply(model: nn.Module) -> None:
    """Raise a clear error when ``model`` is already wrapped for parallel training (apply must come first)."""
    kind = wrapper_kind(model)
    if kind is None:
        return
    if kind in ("ddp", "dataparallel"):
        raise RuntimeError(f"rowsft.apply got a model already wrapped in {kind.upper()}: the wrapper registered its "
                           "parameters when it was built and would never synchronise the new deltas. Call "
                           "rowsft.apply(model, selection) on the plain model first, then wrap it "
                           "(DistributedDataParallel(model) / accelerator.prepare(model, optimizer)).")
    check_supported_wrapper(model)


def check_supported_wrapper(model: nn.Module) -> None:
    """Raise a clear error for parallel wrappers rowsft does not support (FSDP, FSDP2, DeepSpeed).

    DDP, DataParallel and plain models pass. Sharded wrappers split the base weights that the sparse
    layers read in the forward pass and fold into on merge, and flatten the frozen weights with the
    trainable deltas; rowsft is not tested under them.
    """
    kind = wrapper_kind(model)
    if kind in (None, "ddp", "dataparallel"):
        return
    name = {"fsdp": "FSDP (FullyShardedDataParallel)", "fsdp2": "FSDP2 (fully_shard)",
            "deepspeed": "DeepSpeed"}[kind]
    raise NotImplementedError(
        f"rowsft does not support {name}: sharding splits the frozen base weights that the sparse layers read "
        f"and merge into. {SUPPORTED_PATH} A row-sparse fine-tune reduces only k x d_in gradients per layer, "
        "so DDP is usually enough; for models too large for one device, load the base weights in bf16/fp16 and "
        "use gradient checkpointing instead of sharding (with accelerate: `accelerate config` -> no FSDP / "
        "DeepSpeed, or `accelerate launch --multi_gpu`).")


def _fsdp_classes():
    fsdp1 = fsdp2 = None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as fsdp1
    except Exception:  # pragma: no cover - torch built without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule as fsdp2
    except Exception:  # pragma: no cover - older torch
        pass
    return fsdp1, fsdp2


def _is_deepspeed(model) -> bool:
    return any(c.__name__ in ("DeepSpeedEngine", "PipelineEngine") for c in type(model).__mro__)


# ---------------------------------------------------------------- selections across ranks
def selection_digest(selection) -> str:
    """A short hash of a Selection's layers, units and indices (the same on ranks that chose the same rows)."""
    layers = {name: [choice.unit, list(choice.shape), choice.indices.tolist()]
              for name, choice in sorted(selection.layers.items())}
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


def check_same_selection(selection) -> str:
    """Raise when the ranks of the process group hold different selections; returns the digest.

    Different rows on different ranks would give deltas of different meaning (or shapes) that DDP
    would average into garbage. A no-op in a single process.
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


# ---------------------------------------------------------------- data sharding
class ShardedBatches:
    """Every ``world_size``-th batch of a re-iterable ``batches``, starting at ``rank``.

    All ranks must iterate the same ``batches`` in the same order (``rowsft.batches`` shuffles by seed
    and epoch, so the same seed on every rank gives the same order); each rank then sees a disjoint
    share. ``len`` is the same on every rank (the last incomplete round is dropped), so DDP's
    collective calls stay in step.
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
