"""A sparse update outside the forward pass: as a dense tensor, folded into a weight, and what of its input a
layer keeps for backward.

Shared by `rowsft.layers.sparse` (merge, unmerge, the dense references of the tests) and the peft layer of
`rowsft.integrations`, and by the memory predictor (`kept_input_width`, `input_kept_elsewhere`).
"""
from __future__ import annotations

import torch

from rowsft.layers.autograd import input_columns
from rowsft.layers.lent_rows import LENDING_LOCK
from rowsft.layers.products import cast
from rowsft.targets import role


def element_positions(indices: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of flat element positions ``r * d_in + c``."""
    flat = indices.long()
    rows = torch.div(flat, d_in, rounding_mode="floor")
    return rows, flat - rows * d_in


def folded(base: torch.Tensor, update: torch.Tensor, sign: int = 1) -> torch.Tensor:
    """``base + sign * update`` computed in the wider of the two dtypes and stored in ``base``'s: how every fold of an
    update into weights rounds (a merge, and rows written into the weight by `rowsft.layers.in_weight`), so the two
    give the same bits."""
    wide = torch.promote_types(base.dtype, update.dtype)
    return cast(torch.add(cast(base, wide), cast(update.detach(), wide), alpha=sign), base.dtype)


@torch.no_grad()
def fold_update(unit: str, weight: torch.Tensor, update: torch.Tensor, indices: torch.Tensor, sign: int) -> None:
    """``weight (d_out, d_in) += sign * update`` in place at ``indices`` (``weight`` may be a transposed view, as
    `weight_out_in` gives for Conv1D); computed in the wider of the two dtypes, stored in the weight's (`folded`).
    Under `rowsft.layers.lent_rows.LENDING_LOCK`: never onto rows another thread has lent to the weight."""
    with LENDING_LOCK:
        if unit == "row":
            weight.index_copy_(0, indices, folded(weight.index_select(0, indices), update, sign))   # (k, d_in)
        elif unit == "column":
            weight.index_copy_(1, indices, folded(weight.index_select(1, indices), update, sign))   # (d_out, k)
        else:
            rows, cols = element_positions(indices, weight.shape[1])
            weight.index_put_((rows, cols), folded(weight[rows, cols], update, sign))              # (k,)


def dense_update(unit: str, update: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The update as a dense ``shape = (d_out, d_in)`` tensor in the update's dtype (detached)."""
    d_out, d_in = shape
    update = update.detach()
    if unit == "element":
        dense = torch.zeros(d_out * d_in, dtype=update.dtype, device=update.device)
        return dense.index_copy_(0, indices.long(), update).view(d_out, d_in)
    dense = torch.zeros(d_out, d_in, dtype=update.dtype, device=update.device)
    return dense.index_copy_(0 if unit == "row" else 1, indices, update)


class KeptColumns:
    """Element updates: the touched input columns kept for backward (`input_columns`), computed once per mask and
    again when the indices change (another tensor, or the same one modified in place)."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, indices: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        key = (indices.data_ptr(), indices._version, indices.device)
        if self.key != key:
            self.key, self.value = key, input_columns(indices, d_in)
        return self.value


def kept_input_width(unit: str, indices: torch.Tensor, d_in: int, lean_input: bool = True) -> int:
    """Features per token of a layer's input that a sparse update of ``unit`` at ``indices`` keeps for
    backward: the ``k`` selected columns (column), the touched columns (element, when ``lean_input`` and
    `rowsft.layers.autograd.input_columns` finds them few enough), else the whole input, ``d_in``."""
    if unit == "column":
        return int(indices.numel())
    columns = input_columns(indices, d_in) if unit == "element" and lean_input else None
    return d_in if columns is None else int(columns[0].numel())


def input_kept_elsewhere(name: str | None) -> bool:
    """Whether the input of the linear layer ``name`` is kept whole for backward by something else: a
    sibling sharing it (q/k/v, gate/up) or the attention kernel (the output projection's input is the
    fused kernel's saved output). Only then is a subset of it no saving."""
    if name is None:
        return False
    return role(name) in ("qkv", "up", "o")
