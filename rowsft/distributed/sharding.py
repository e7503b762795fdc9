"""Sharded training with torch FSDP2 (``fully_shard``): shard a model after ``rowsft.apply``, move sharded
tensors between their full and their per-rank forms, and count what each rank holds.

FSDP2 turns every parameter of a module it shards into a ``DTensor`` holding one slice of dim 0 per rank
(``torch.chunk``: ``ceil(n / world)`` rows on the first ranks), gathers a block's full parameters just
before the block runs (forward, and again in backward) and frees them afterwards. rowsft's layers need
nothing more:

- the frozen weight ``W (d_out, d_in)`` is sharded like any weight and gathered for the block's matmul;
- the update ``delta (k, d_in)`` (rows), ``(d_out, k)`` (columns) or ``values (k,)`` (elements) is a
  parameter of the same block: sharded on dim 0, gathered with the block, its gradient reduce-scattered
  (averaged over ranks), stepped by the optimizer slice by slice, so its optimizer state is sharded too;
- the index buffers (``indices (k,)``, ``bias_indices``) are buffers, which FSDP2 never shards: each rank
  keeps them whole, equal on every rank because the selection is (``rowsft.score`` all-reduces the scores;
  `rowsft.distributed.check_same_selection` verifies).

Order, on every rank: score, select, ``rowsft.apply`` (or ``rowsft.load_adapter``), then :func:`shard`
(``fully_shard`` on each transformer block, then on the root), then the optimizer over the parameters that
require grad (the sharded deltas). ``rowsft.save_adapter`` gathers the full deltas (:func:`full_tensor`, a
collective: call it on every rank; rank 0 writes); ``rowsft.load_adapter`` into a sharded model copies each
rank's slice in (:func:`copy_full_into`, no communication).

Rebuilt inputs (`rowsft.layers.rebuild`), gradient checkpointing (reentrant or not) and bf16
``MixedPrecisionPolicy`` work under :func:`shard` (tests/test_fsdp.py). ``merge`` does not: it folds into
weights a rank holds only a slice of (:func:`check_not_sharded`); merge an unsharded copy loaded from the
saved adapter instead.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch import nn

from rowsft.distributed.ranks import is_distributed, world_size
from rowsft.distributed.wrappers import SHARD_ORDER, wrapper_kind


# ---------------------------------------------------------------- DTensors
def dtensor_class():
    """torch's ``DTensor`` class once ``torch.distributed.tensor`` is loaded; None before (no DTensor exists yet)."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(tensor) -> bool:
    cls = dtensor_class()
    return cls is not None and isinstance(tensor, cls)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard is gathered from every rank (a collective: all ranks must call this
    for the same tensors in the same order); a plain tensor is returned as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@torch.no_grad()
def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` for a full ``value`` of ``target``'s global shape; a DTensor ``target`` takes
    only this rank's slice of it (no communication: every rank must hold the same ``value``)."""
    value = value.to(device=target.device, dtype=target.dtype)
    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor
        value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


# ---------------------------------------------------------------- sharded models
def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` (FSDP2) was applied to ``model`` or to one of its submodules."""
    return wrapper_kind(model) == "fsdp2"


def check_not_sharded(model: nn.Module, action: str) -> None:
    """Raise a clear error when ``action`` (e.g. ``"rowsft.merge"``), which rewrites whole base weights, meets a
    model sharded with FSDP2, where each rank holds only a slice of them."""
    if is_sharded(model):
        raise RuntimeError(f"{action} cannot run on a model sharded with FSDP2 (fully_shard): each rank holds only a "
                           "slice of the base weights. Save the adapter (rowsft.save_adapter(model, path) on every "
                           "rank), load it into an unsharded copy of the base model (rowsft.load_adapter) and "
                           f"run {action} there.")


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to, in model order."""
    cls = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    return [m for m in model.modules() if cls is not None and isinstance(m, cls)]


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module's sharded parameters back in place (frees gathered ones; no communication), so
    that reading or writing parameters sees the DTensor shards the optimizer steps."""
    for module in fsdp_modules(model):
        module.reshard()


def _sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """rowsft's sparse layers, by the contract `rowsft.layers.sparse.is_sparse_layer` checks (a ``unit`` and an
    ``indices`` tensor): rowsft.distributed is a foundation module and imports no stage package."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "unit", None), str) and torch.is_tensor(getattr(m, "indices", None))}


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks to shard one by one: modules whose class the model names in ``_no_split_modules``
    (transformers' models do), else the children of the longest ``nn.ModuleList`` of one module class;
    outermost only, in model order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in names]
    if not found:
        lists = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1]
        if lists:
            prefix, longest = max(lists, key=lambda item: len(item[1]))
            found = [(f"{prefix}.{i}" if prefix else str(i), child) for i, child in enumerate(longest)]
    return [(n, m) for n, m in found if not any(n.startswith(o + ".") for o, _ in found if o != n)]


def _blocks_given(model: nn.Module, blocks: Iterable) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for block in blocks:
        if isinstance(block, str):
            out.append((block, model.get_submodule(block)))
        elif isinstance(block, nn.Module) and id(block) in names:
            out.append((names[id(block)], block))
        else:
            raise ValueError(f"blocks must be module names or submodules of the model, got {type(block).__name__}")
    return out


def check_can_shard(model: nn.Module, mp_policy=None, blocks: Iterable | None = None) -> list[tuple[str, nn.Module]]:
    """Raise a clear error, before anything changes, when :func:`shard` cannot shard ``model``; returns the
    blocks it would shard one by one."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch without FSDP2
        raise RuntimeError(f"rowsft.distributed.shard needs torch's FSDP2 (torch.distributed.fsdp.fully_shard, "
                           f"torch >= 2.6): {e}") from None
    if not is_distributed():
        raise RuntimeError("rowsft.distributed.shard needs an initialised process group: start the processes with "
                           "torchrun / accelerate launch and call torch.distributed.init_process_group() (gloo on "
                           "CPU, nccl on GPUs) before sharding")
    kind = wrapper_kind(model)
    if kind is not None:
        what = "already sharded with FSDP2" if kind == "fsdp2" else f"wrapped in {kind.upper()}"
        raise RuntimeError(f"rowsft.distributed.shard got a model {what}; shard the plain model once. Order: "
                           f"{SHARD_ORDER}.")
    layers = _sparse_layers(model)
    if not layers:
        raise ValueError("rowsft.distributed.shard got a model without rowsft sparse layers: fully_shard takes over "
                         "the parameters that exist when it runs, so deltas added later would never be sharded or "
                         f"averaged. Order: {SHARD_ORDER}.")
    merged = [n for n, layer in layers.items() if getattr(layer, "merged", False)]
    if merged:
        raise RuntimeError(f"{merged[:3]} are merged into their base weights; call rowsft.unmerge(model) before "
                           "sharding (a sharded model cannot merge or unmerge: each rank holds a slice of the weights)")
    in_weight = [n for n, layer in layers.items() if getattr(layer, "in_weight", False)]
    if in_weight:
        raise RuntimeError(f"{in_weight[:3]} train their rows inside the base weight (train_in_weight=True), which a "
                           "sharded weight cannot take; apply with train_in_weight=False before sharding")
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got "
                        f"{type(mp_policy).__name__}")
    found = transformer_blocks(model) if blocks is None else _blocks_given(model, blocks)
    if not found:
        raise ValueError(f"found no transformer blocks to shard in {type(model).__name__} (no _no_split_modules and no "
                         "ModuleList of one module class); pass them: shard(model, blocks=model.model.layers)")
    return found


def shard(model: nn.Module, mp_policy=None, *, mesh=None, reshard_after_forward: bool = True, offload_policy=None,
          blocks: Iterable | None = None) -> nn.Module:
    """Shard a model after ``rowsft.apply`` with FSDP2, as one writes it by hand: ``fully_shard`` on each
    transformer block, then on the root; returns ``model`` (sharded in place). Call it on every rank.

    ``mp_policy``: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16,
    reduce_dtype=torch.float32``: bf16 compute, float32 deltas and optimizer state), default none.
    ``mesh``: a 1-D device mesh, default every rank on the parameters' device type. ``reshard_after_forward``:
    free each block's gathered weights after its forward (the least memory; ``False`` keeps them until backward).
    ``offload_policy``: e.g. ``CPUOffloadPolicy()``. ``blocks``: module names or submodules to shard one by one
    (default: :func:`transformer_blocks`). Everything is checked first (:func:`check_can_shard`).

    Then build the optimizer over ``[p for p in model.parameters() if p.requires_grad]`` (the sharded deltas),
    train on each rank's share of the batches (`rowsft.distributed.ShardedBatches`), and call
    ``rowsft.save_adapter(model, path)`` on every rank.
    """
    found = check_can_shard(model, mp_policy, blocks)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard
    if mesh is None:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (world_size(),))
    options = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(), offload_policy=offload_policy or OffloadPolicy())
    for layer in _sparse_layers(model).values():   # a cast kept under autocast would be a whole weight on each rank
        if hasattr(layer, "keep_cast_weight"):
            layer.keep_cast_weight = False
    for _, block in found:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, **options)   # the root: embeddings, final norm, head (kept gathered from forward to backward)
    return model


# ---------------------------------------------------------------- what a rank holds
def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of storage this rank holds for ``model``: ``frozen`` and ``trainable`` parameters (their local
    shards under FSDP2, padding included; tied parameters once) and ``buffers``. Call it outside forward and
    backward (or after :func:`reshard`), when FSDP2 holds only the shards."""
    out = {"frozen": 0, "trainable": 0, "buffers": 0}
    seen: set[int] = set()

    def add(key: str, tensor: torch.Tensor) -> None:
        local = tensor.to_local() if is_dtensor(tensor) else tensor
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen or storage.data_ptr() == 0:
            seen.add(storage.data_ptr())
            out[key] += storage.nbytes()

    for p in model.parameters():
        add("trainable" if p.requires_grad else "frozen", p)
    for b in model.buffers():
        add("buffers", b)
    return out


__all__ = ["shard", "check_can_shard", "check_not_sharded", "transformer_blocks", "is_sharded", "reshard", "fsdp_modules", "full_tensor",
           "copy_full_into", "is_dtensor", "dtensor_class", "local_bytes"]
