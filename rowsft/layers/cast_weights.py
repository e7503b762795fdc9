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
putting the pretrained rows back drops it (`forget`). Rows trained *in the cast* (the default for row layers
under autocast: `rowsft.layers.in_weight`) are written into a copy of their own (`cast_with_rows`), which records
which rows it holds: the plain cast is never handed out with trained rows in it.

A copy made under ``torch.inference_mode`` is an inference tensor, which autograd cannot save: outside inference
mode it is cast again.

Memory: one compute-dtype copy of every trained layer's weight for as long as the layer lives, where the frozen
model keeps such copies only between its forward and its backward: the training peak is the floor's plus the
update's (SmolLM2-135M, 4 × 256 tokens, bf16 autocast: about 200 MiB of copies). ``keep_cast_weights=False`` keeps
nothing (the lean peak, below the floor's) and casts twice a step; so does a model sharded with FSDP2 (a copy would
be the whole weight on every rank). Without autocast, or when the weight is already in the compute dtype (a bf16
model), nothing is cast or kept.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from rowsft.layers.lent_rows import LENDING_LOCK
from rowsft.targets import weight_out_in

# base weight (the Parameter) → (its key when cast, the (d_out, d_in) copy, which trained rows it holds or None)
_COPIES = WeakIdKeyDictionary()


def _key(weight: torch.Tensor, dtype: torch.dtype) -> tuple:
    return weight.data_ptr(), weight._version, weight.device, weight.dtype, tuple(weight.shape), dtype


def _usable(kept, key: tuple, indices: torch.Tensor | None) -> bool:
    """A kept entry is still the cast of the weight as it stands, holding the trained rows of exactly ``indices``
    (None: none), and autograd may save it (not an inference tensor outside inference mode)."""
    if kept is None or kept[0] != key or (kept[1].is_inference() and not torch.is_inference_mode_enabled()):
        return False
    if indices is None or kept[2] is None:
        return indices is None and kept[2] is None
    return kept[2][0]() is indices and kept[2][1] == indices._version


def _rows_key(indices: torch.Tensor) -> tuple:
    """Which rows a copy holds: the very index tensor (a weak reference: a new tensor at the same address is another
    one) at its version."""
    return weakref.ref(indices), indices._version


@torch.no_grad()
def cast_weight(base_layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``weight_out_in(base_layer)`` ``(d_out, d_in)`` in ``dtype``: the kept copy while it is the cast of the weight
    as it stands, else a new one (kept in its place). The copy keeps the weight's strides (a Conv1D's stays
    transposed), so the frozen product takes the same kernel."""
    return _kept_cast(base_layer, dtype, None)


@torch.no_grad()
def cast_with_rows(base_layer: nn.Module, dtype: torch.dtype, indices: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """The cast of ``weight_out_in(base_layer)`` ``(d_out, d_in)`` in ``dtype`` with ``rows (k, d_in)`` written at
    ``indices`` (cast to ``dtype``): rows trained in the cast. The base weight is not touched. The copy is kept while
    the weight and the indices stay as they are, and only its rows are written at each call; another weight, other
    indices, or a kept plain cast give a new copy (a graph that saved the old one keeps it as it was). Written through
    ``.data``, as `refresh_rows`: a graph that saved the copy with the same rows (checkpointing) is not refused."""
    copy = _kept_cast(base_layer, dtype, indices)
    refresh_rows(copy, indices, rows)
    return copy


def _kept_cast(base_layer: nn.Module, dtype: torch.dtype, indices: torch.Tensor | None) -> torch.Tensor:
    """The kept ``(d_out, d_in)`` copy of ``base_layer``'s weight in ``dtype`` holding the trained rows of ``indices``
    (None: a plain cast) while it is usable (`_usable`), else a new cast, kept in its place, recorded as holding those
    rows (the caller writes them)."""
    weight = base_layer.weight
    key = _key(weight, dtype)
    kept = _COPIES.get(weight)
    if _usable(kept, key, indices):
        return kept[1]
    with LENDING_LOCK:                                              # never a weight holding lent rows
        copy = weight_out_in(base_layer).detach().to(dtype)        # (d_out, d_in), strides kept
    _COPIES[weight] = (key, copy, None if indices is None else _rows_key(indices))
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


__all__ = ["cast_weight", "cast_with_rows", "refresh_rows", "forget", "kept_copies", "kept_bytes"]
