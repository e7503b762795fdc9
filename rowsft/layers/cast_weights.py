"""Frozen base weights kept in the autocast dtype between steps: cast once, not twice every step.

Under autocast (bf16 over a float32 model) a frozen product casts its weight to the compute dtype. A stock
``nn.Linear`` casts in forward and autograd keeps that copy until backward, so the frozen model itself (the
methods benchmark's floor) holds a compute-dtype copy of every weight from its forward to its backward. rowsft's
autograd functions kept the float32 weight instead and cast it a second time in backward: no copies alive at the
peak, but two casts of every trained layer's weight a step, for weights that never change.

With ``keep_cast_weights`` (`rowsft.apply`'s, on by default) a trained row or column layer's base weight is cast
once and the copy kept across steps (`cast_weight`); forward and backward read it as they are. The copy is the
cast of the weight, bit for bit, so results do not change. It is cast again when the weight is another tensor, at
another version (an in-place edit, ``load_state_dict``, a merge), on another device or in another dtype. Rows
trained in the weight (`rowsft.layers.in_weight`) are copied into it before each forward (`refresh_rows`), and
putting the pretrained rows back drops it (`forget`).

Memory: one compute-dtype copy of every trained layer's weight for as long as the layer lives, where the frozen
model keeps such copies only between its forward and its backward: the training peak is the floor's plus the
update's (SmolLM2-135M, 4 × 256 tokens, bf16 autocast: about 200 MiB of copies). ``keep_cast_weights=False`` keeps
nothing (the lean peak, below the floor's) and casts twice a step; so does a model sharded with FSDP2 (a copy would
be the whole weight on every rank). Without autocast, or when the weight is already in the compute dtype (a bf16
model), nothing is cast or kept.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from rowsft.targets import weight_out_in

_COPIES = WeakIdKeyDictionary()       # base weight (the Parameter) → (its key when cast, the (d_out, d_in) copy)


def _key(weight: torch.Tensor, dtype: torch.dtype) -> tuple:
    return weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape), dtype


@torch.no_grad()
def cast_weight(base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``weight_out_in(base_layer)`` ``(d_out, d_in)`` in ``dtype``: the kept copy while it is the cast of the weight
    as it stands, else a new one (kept in its place). The copy keeps the weight's strides (a Conv1D's stays
    transposed), so the frozen product takes the same kernel."""
    weight = base_layer.weight
    key = _key(weight, dtype)
    kept = _COPIES.get(weight)
    if kept is not None and kept[0] == key:
        return kept[1]
    copy = weight_out_in(base_layer).detach().to(dtype)            # (d_out, d_in), strides kept
    _COPIES[weight] = (key, copy)
    return copy


@torch.no_grad()
def refresh_rows(copy: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> None:
    """Write ``rows (k, d_in)`` (rows trained in the weight, as just written into it) into a kept ``copy`` at
    ``indices``, cast to the copy's dtype: the copy stays the cast of the weight. Through ``.data``: a graph that saved
    the copy (two forwards before one backward, checkpointing) is not refused for rows written with the same values."""
    copy.data.index_copy_(0, indices, rows.to(copy.dtype))


def forget(base_layer: nn.Module) -> None:
    """Drop ``base_layer``'s kept copy (its memory comes back once no graph holds it)."""
    _COPIES.pop(base_layer.weight, None)


def kept_copies(model: nn.Module) -> list[torch.Tensor]:
    """The copies kept for ``model``'s weights (memory that is neither a parameter nor a buffer)."""
    return [kept[1] for p in model.parameters() if (kept := _COPIES.get(p)) is not None]


def kept_bytes(model: nn.Module) -> int:
    """The bytes of the copies kept for ``model``'s weights."""
    return sum(copy.untyped_storage().nbytes() for copy in kept_copies(model))


__all__ = ["cast_weight", "refresh_rows", "forget", "kept_copies", "kept_bytes"]
