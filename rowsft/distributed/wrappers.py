"""Which parallel wrapper a model is in, the model inside it, and the wrappers rowsft refuses.

Supported: a plain model, DDP / DataParallel (wrap after ``rowsft.apply``), FSDP2 (``fully_shard``,
shard after ``rowsft.apply``: :func:`rowsft.distributed.shard`). Refused with a message naming the
supported path: FSDP1 (``FullyShardedDataParallel``) and DeepSpeed, and any wrapper that already
exists when ``rowsft.apply`` runs (it registered its parameters before the deltas existed).
"""
from __future__ import annotations

import sys

from torch import nn

SHARD_ORDER = ("score, select and rowsft.apply(model, selection) (or rowsft.load_adapter(model, path)) on every rank "
               "first, then shard the model: rowsft.distributed.shard(model) (fully_shard on each transformer block, "
               "then on the root), or accelerator.prepare(model, optimizer) under an FSDP2 config (fsdp_version: 2, "
               "see examples/accelerate_fsdp2.yaml)")
SUPPORTED_PATH = ("rowsft supports single-process training, data parallelism (torch DDP, or accelerate with the default "
                  "multi-GPU/multi-CPU setup) and sharded data parallelism with torch FSDP2 (fully_shard, or accelerate "
                  "with fsdp_version: 2): score, select and rowsft.apply(model, selection) on every rank first, then "
                  "wrap or shard the model (DistributedDataParallel(model), rowsft.distributed.shard(model), or "
                  "accelerator.prepare(model, optimizer)).")


def _loaded_class(module: str, name: str):
    """``module.name`` if torch has already imported ``module`` (else no instance of it can exist), or None."""
    return getattr(sys.modules.get(module), name, None)


def wrapper_kind(model: nn.Module) -> str | None:
    """How ``model`` is wrapped for parallel training: ``"ddp"``, ``"dataparallel"``, ``"fsdp"`` (FSDP1
    or a submodule of it), ``"fsdp2"`` (``fully_shard`` on it or on a submodule), ``"deepspeed"``, or
    ``None`` for a plain model."""
    if _is_deepspeed(model):
        return "deepspeed"
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "ddp"
    if isinstance(model, nn.DataParallel):
        return "dataparallel"
    fsdp1 = _loaded_class("torch.distributed.fsdp", "FullyShardedDataParallel")
    fsdp2 = _loaded_class("torch.distributed.fsdp", "FSDPModule")
    if fsdp1 is None and fsdp2 is None:
        return None
    for module in model.modules():
        if fsdp1 is not None and isinstance(module, fsdp1):
            return "fsdp"
        if fsdp2 is not None and isinstance(module, fsdp2):
            return "fsdp2"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / DataParallel / accelerate / ``torch.compile`` wrappers (itself otherwise; FSDP2
    keeps the model itself, so a sharded model is returned as it is)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or _is_deepspeed(model):
            model = model.module
        elif hasattr(model, "_orig_mod"):          # torch.compile
            model = model._orig_mod
    return model


def check_can_apply(model: nn.Module) -> None:
    """Raise a clear error when ``model`` is already wrapped or sharded for parallel training (apply must come first)."""
    kind = wrapper_kind(model)
    if kind is None:
        return
    if kind in ("ddp", "dataparallel"):
        raise RuntimeError(f"rowsft.apply got a model already wrapped in {kind.upper()}: the wrapper registered its "
                           "parameters when it was built and would never synchronise the new deltas. Call "
                           "rowsft.apply(model, selection) on the plain model first, then wrap it "
                           "(DistributedDataParallel(model) / accelerator.prepare(model, optimizer)).")
    if kind == "fsdp2":
        raise RuntimeError("rowsft.apply got a model already sharded with FSDP2 (fully_shard): fully_shard took over "
                           "the parameters that existed when it ran, so new deltas would be neither sharded nor "
                           f"averaged across ranks. Order: {SHARD_ORDER}.")
    check_supported_wrapper(model)


def check_supported_wrapper(model: nn.Module) -> None:
    """Raise a clear error for parallel wrappers rowsft does not support (FSDP1, DeepSpeed).

    Plain models, DDP, DataParallel and FSDP2 (``fully_shard``) pass.
    """
    kind = wrapper_kind(model)
    if kind in (None, "ddp", "dataparallel", "fsdp2"):
        return
    if kind == "fsdp":
        raise NotImplementedError(
            "rowsft does not support FSDP1 (FullyShardedDataParallel): it flattens each wrapped block's frozen "
            "weights and trainable deltas into one FlatParameter, and rowsft is tested under FSDP2 only. Use FSDP2: "
            f"{SHARD_ORDER}. {SUPPORTED_PATH}")
    raise NotImplementedError(
        "rowsft does not support DeepSpeed (ZeRO): DeepSpeed partitions the parameters inside its own engine, and "
        "rowsft is not tested under it (it needs a GPU build). For sharded training use torch FSDP2, which shards the "
        f"frozen weights, the deltas and their optimizer state as ZeRO-3 does: {SHARD_ORDER}. {SUPPORTED_PATH}")


def _is_deepspeed(model) -> bool:
    return any(c.__name__ in ("DeepSpeedEngine", "PipelineEngine") for c in type(model).__mro__)


__all__ = ["wrapper_kind", "unwrap", "check_can_apply", "check_supported_wrapper", "SUPPORTED_PATH", "SHARD_ORDER"]
