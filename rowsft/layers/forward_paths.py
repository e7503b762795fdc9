"""How one sparse layer's forward runs: fused with the frozen matmul, or added into the base layer's own output.

`sparse_forward` is what every rowsft sparse layer (and the peft tuner layer of `rowsft.integrations`) computes:
``base_layer(x)`` plus one sparse update. A plain, frozen, hook-free ``nn.Linear`` / ``Conv1D`` (`fusable`) runs its
matmul inside the update's autograd function (`rowsft.layers.autograd.sparse_linear`; a row update over a float32 or
float64 weight with its rows lent to the weight for each product, `lends_rows`, `rowsft.layers.lent_rows`); any other
base layer runs as is and the update is added into its output (`writable` makes that output safe to write into).
`input_source` decides whether the update keeps its input or a recipe to rebuild it (`rowsft.layers.rebuild`).
"""
from __future__ import annotations

import torch
from torch import nn

from rowsft.layers.autograd import add_sparse_update, sparse_linear
from rowsft.layers.cast_weights import cast_weight
from rowsft.layers.group_products import lent_rows_outputs
from rowsft.layers.lent_rows import lendable
from rowsft.layers.products import compute_dtype
from rowsft.layers.rebuild import global_forward_hooks, source_of
from rowsft.targets import is_transposed, linear_shape, weight_out_in

try:
    from transformers.pytorch_utils import Conv1D as _Conv1D
    _PLAIN_LINEAR = (nn.Linear, _Conv1D)
except Exception:  # pragma: no cover
    _PLAIN_LINEAR = (nn.Linear,)



def fusable(base_layer: nn.Module) -> bool:
    """True when the frozen matmul of ``base_layer`` may run inside the update's autograd function: a plain
    nn.Linear / Conv1D, frozen, without forward hooks (otherwise the base layer runs as is)."""
    return (type(base_layer) in _PLAIN_LINEAR and not base_layer.weight.requires_grad
            and (base_layer.bias is None or not base_layer.bias.requires_grad)
            and not (base_layer._forward_hooks or base_layer._forward_pre_hooks or global_forward_hooks()))


def lends_rows(unit: str, lend: bool, base_layer: nn.Module, x: torch.Tensor, update: torch.Tensor) -> bool:
    """True when an update of ``unit`` over ``base_layer`` runs with its rows lent to the weight for each product
    (`rowsft.layers.lent_rows`) for ``x``: a row update, asked to (``lend``), over a plain, hook-free base
    (`fusable`) of float32/float64 weights, ``update`` (its delta) in the weight's dtype, no autocast, not compiled."""
    return unit == "row" and lend and fusable(base_layer) and lendable(base_layer.weight.dtype, update, x)


def frozen_weight(base_layer: nn.Module, x: torch.Tensor, keep_cast: bool) -> torch.Tensor:
    """``weight_out_in(base_layer)`` ``(d_out, d_in)``, or (``keep_cast``, under autocast to another dtype) its copy
    in the compute dtype kept across steps (`rowsft.layers.cast_weights`). Not under ``torch.compile``: a compiled
    graph casts inside itself, and the kept copy is state outside the graph."""
    weight = weight_out_in(base_layer)
    if keep_cast and not torch.compiler.is_compiling():
        dtype = compute_dtype(x, weight.dtype)
        if dtype != weight.dtype:
            return cast_weight(base_layer, dtype)
    return weight


def sparse_forward(base_layer: nn.Module, unit: str, x: torch.Tensor, update: torch.Tensor, indices: torch.Tensor,
                   columns: tuple[torch.Tensor, torch.Tensor] | None = None, source=None,
                   keep_cast: bool = False, lend: bool = False) -> torch.Tensor:
    """``base_layer(x)`` plus one sparse update of ``unit`` → ``(..., d_out)``: what every rowsft sparse layer (and
    the peft tuner layer of `rowsft.integrations`) computes. Fast path (`fusable`): the frozen matmul runs inside
    the update's autograd function (`rowsft.layers.autograd.sparse_linear`); else the base layer runs as is and the
    update is added into its output (`add_sparse_update`). ``update``: ``delta (k, d_in)`` (row), ``(d_out, k)``
    (column) or ``values (k,)`` (element); ``columns``/``source``: see `rowsft.layers.autograd.sparse_linear`.
    ``keep_cast``: a row or column update under autocast reads its weight's kept cast (`frozen_weight`). ``lend``: a
    row update lends its rows to the weight for each product where it can (`lends_rows`)."""
    if lends_rows(unit, lend, base_layer, x, update):
        return lent_rows_outputs(x, source, (is_transposed(base_layer),), (weight_out_in(base_layer),),
                                 (base_layer.bias,), (indices,), (update,))[0]
    if fusable(base_layer):
        weight = frozen_weight(base_layer, x, keep_cast and unit != "element")
        return sparse_linear(unit, x, weight, base_layer.bias, update, indices, is_transposed(base_layer), columns,
                             source)
    return add_sparse_update(unit, writable(base_layer(x)), x, update, indices, linear_shape(base_layer)[1], columns,
                             source)


def input_source(x: torch.Tensor, unit: str, update: torch.Tensor, rebuild_input: bool, quantization: str | None):
    """A `rowsft.layers.rebuild.Source` of ``x`` when the update would keep ``x`` (or a large part of it) and the
    frozen graph keeps what rebuilds it; None otherwise: rebuilding off, a column update (it keeps only ``k``
    inputs), a frozen update, or an int8 base (bitsandbytes' int8 matmul keeps ``x`` itself)."""
    if not rebuild_input or unit == "column" or not update.requires_grad or quantization == "int8":
        return None
    return source_of(x)


def writable(out: torch.Tensor) -> torch.Tensor:
    """``out``, or a copy of it when autograd may forbid writing into it: a view made inside a custom autograd
    function or custom op (bitsandbytes' 4-bit matmul returns one for a non-contiguous input, as GPT-2's attention
    output is), with or without grad. Views made by ordinary differentiable ops are written into as they are."""
    if out._is_view() and (out.grad_fn is None or isinstance(out.grad_fn, torch.autograd.function.BackwardCFunction)):
        return out.clone()
    return out


__all__ = ["fusable", "lends_rows", "frozen_weight", "sparse_forward", "input_source", "writable"]
