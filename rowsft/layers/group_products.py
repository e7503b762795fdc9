"""One autograd node for the row layers that read one input: every layer's frozen product and its rows together.

Row layers that read the same ``x`` (a `rowsft.layers.grouped` group: q/k/v, gate/up; or one layer alone) run as a
single node whose forward computes every layer's output ``out_i = x W_iᵀ + b_i`` (``x`` cast once under autocast) and
whose backward computes ``grad x`` once, accumulated in place, where separate layers would each make a
``(..., d_in)`` gradient for autograd to add up. The rows enter in one of three ways (``rows``):

- **added** (`GroupedRowProducts`, the usual row update): ``out_i[..., idx_i] += x delta_iᵀ``, all the layers' shares
  as one product ``[delta_1; ...] xᵀ`` ``(K, N)``; backward adds ``G [delta_1; ...]`` into ``grad x`` with
  ``G = [g_1[..., idx_1], ...]`` ``(N, K)``;
- **lent** (`LentRowProducts`, the default over float32/float64 weights): the rows ``W0[idx] + delta`` are written
  into each weight for the frozen product alone, in forward and again in backward, and the pretrained rows put back
  after it (`rowsft.layers.lent_rows`), so ``x W'ᵀ`` and ``g W'`` carry the update;
- **written** (`InWeightProducts`): the weights passed already hold the rows ``W0[idx] + delta``
  (`rowsft.layers.in_weight`: in the base weight, or in its kept autocast cast), so the frozen products carry them.

Each way, delta's gradient is one product for the group, ``Gᵀ x`` ``(K, d_in)``
(`rowsft.layers.products.row_gradient`), on what the node keeps of ``x``: the input itself, a
`rowsft.layers.rebuild.Source` rebuilt in backward, or a scaled norm's factors (``fold_scaled``:
`rowsft.layers.products.ScaledInput`). Nothing dense is made: the stacked deltas ``(K, d_in)`` are rebuilt in backward
rather than kept.
"""
from __future__ import annotations

import contextlib

import torch

from rowsft.layers.autograd import RowUpdate, _save, _saved, saved_extra
from rowsft.layers.lent_rows import rows_lent
from rowsft.layers.products import (
    ScaledInput,
    add_into_columns,
    add_product,
    cast,
    compute_dtype,
    flat,
    frozen_input_grad,
    frozen_linear,
    gathered_columns,
    row_gradient,
)

FIRST_TENSOR = 6     # position of weight_1 among the node's inputs (x, source, conv1d, rows, fold_scaled, n, ...)
ROWS = ("added", "lent", "written")


class _RowProducts(torch.autograd.Function):
    """The frozen products of ``n`` row layers reading one input, with their rows added, lent or already written.

    Inputs: ``x (..., d_in)``, ``source`` (a `rowsft.layers.rebuild.Source` of ``x`` or None), ``conv1d`` (one flag per
    layer), ``rows`` (one of `ROWS`: ``x delta_iᵀ`` added into columns ``idx_i``, the rows lent to the weights for
    each product, or already written in them),
    ``fold_scaled`` (keep a scaled norm's factors instead of rebuilding ``x``), ``n``, then ``weight_1 ... weight_n``
    (frozen ``(d_out_i, d_in)``), ``bias_1 ... bias_n``, ``index_1 ... index_n``, ``delta_1 ... delta_n``
    ``(k_i, d_in)``. Outputs: ``out_1 (..., d_out_1), ..., out_n``."""

    @staticmethod
    def forward(ctx, x, source, conv1d, rows, fold_scaled, n, *tensors):
        weights, biases, indices, deltas = (tensors[i * n:(i + 1) * n] for i in range(4))
        ctx.base_dt = compute_dtype(x, weights[0].dtype)
        base_x = cast(x, ctx.base_dt)                                  # cast once for the group (autocast)
        with _lent_if(rows, weights, indices, deltas):
            outs = tuple(frozen_linear(base_x, w, b, c, ctx.base_dt)                                # (..., d_out_i)
                         for w, b, c in zip(weights, biases, conv1d))
        dt = compute_dtype(x, deltas[0].dtype)
        ctx.dt, ctx.n, ctx.sizes, ctx.rows = dt, n, [d.shape[0] for d in deltas], rows
        if rows == "added":                                            # every share as one product: (K, N)
            x_dt = base_x if base_x.dtype == dt else cast(x, dt)
            stacked = cast(deltas[0], dt) if n == 1 else torch.cat([cast(d, dt) for d in deltas])   # (K, d_in)
            shares = torch.mm(stacked, flat(x_dt).T).split(ctx.sizes)                             # each (k_i, N)
            for out, index, share in zip(outs, indices, shares):
                add_into_columns(out, index, cast(share.T.view(*x.shape[:-1], share.shape[0]), out.dtype))
        ctx.x_dtype, ctx.x_shape, ctx.update_dtype = x.dtype, x.shape, deltas[0].dtype
        ctx.source, ctx.columns = source, None
        need_x, need_deltas = ctx.needs_input_grad[0], any(ctx.needs_input_grad[FIRST_TENSOR + 3 * n:])
        kept_weights = weights if need_x else (None,) * n      # kept casts (autocast), or cast again in backward
        _save(ctx, x if need_deltas else None, None, None, None, fold_scaled=fold_scaled,
              extra=(*kept_weights, *indices, *(deltas if need_x else (None,) * n)))   # deltas: refuse in-place edits
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        kept, *_ = _saved(ctx, RowUpdate)                 # the kept input, a rebuilt one or a `ScaledInput`
        if isinstance(kept, ScaledInput) and kept.h.dtype != ctx.dt:
            kept.h_cast = cast(flat(kept.h), ctx.dt)      # (N, d_in): under autocast, cast once for the group
        n = ctx.n
        extra = saved_extra(ctx)
        weights, indices, deltas = extra[:n], extra[n:2 * n], extra[2 * n:]
        need_deltas = ctx.needs_input_grad[FIRST_TENSOR + 3 * n:]
        added = ctx.rows == "added"
        rows = None
        if any(need_deltas) or (added and ctx.needs_input_grad[0]):
            rows = gathered_columns(grad_outs, indices, ctx.dt)                                  # G (N, K)
        grad_x = None
        if ctx.needs_input_grad[0]:                       # Σ g_i W_i, the frozen model's own input gradient, in place
            with _lent_if(ctx.rows, weights, indices, deltas):                  # lent: the rows' share comes with it
                for g, w in zip(grad_outs, weights):
                    if grad_x is None:
                        grad_x = frozen_input_grad(g, w, ctx.base_dt, ctx.x_dtype, ctx.x_shape)  # (..., d_in)
                    else:
                        add_product(grad_x, cast(g, ctx.base_dt), cast(w, ctx.base_dt))
            if added:                                     # + G [delta_1; ...], the rows' share
                add_product(grad_x, rows, torch.cat([cast(d, ctx.dt) for d in deltas]))         # (K, d_in)
        grad_deltas = [None] * n
        if any(need_deltas):
            stacked = row_gradient(rows, kept, ctx.dt)                                            # (K, d_in)
            grad_deltas = [cast(g, ctx.update_dtype) if need else None
                           for g, need in zip(stacked.split(ctx.sizes), need_deltas)]
        return grad_x, None, None, None, None, None, *([None] * (3 * n)), *grad_deltas


def _lent_if(rows: str, weights, indices, deltas):
    """`rowsft.layers.lent_rows.rows_lent` for lent rows, else nothing."""
    return rows_lent(weights, indices, deltas) if rows == "lent" else contextlib.nullcontext()


class GroupedRowProducts(_RowProducts):
    """The usual row update of the layers that read one input (``rows="added"``): one node for a group."""


class LentRowProducts(_RowProducts):
    """Row layers whose rows are lent to their weights for each product (``rows="lent"``): one node for a group or
    a layer alone."""


class InWeightProducts(_RowProducts):
    """Row layers whose rows are written into the weights they pass (``rows="written"``): one node for a group."""


def added_rows_outputs(x: torch.Tensor, source, conv1d: tuple[bool, ...], weights, biases, indices, deltas,
                       fold_scaled: bool) -> tuple[torch.Tensor, ...]:
    """``x W_iᵀ + b_i`` with ``x delta_iᵀ`` added into columns ``idx_i``, for each layer ``i`` (`GroupedRowProducts`)."""
    return GroupedRowProducts.apply(x, source, conv1d, "added", fold_scaled, len(weights), *weights, *biases,
                                    *indices, *deltas)


def lent_rows_outputs(x: torch.Tensor, source, conv1d: tuple[bool, ...], weights, biases, indices,
                      deltas) -> tuple[torch.Tensor, ...]:
    """``x W_i'ᵀ + b_i`` for each layer ``i``, ``W_i'`` the base weight ``(d_out_i, d_in)`` with its rows
    ``W0[idx_i] + delta_i`` lent to it for each product (`LentRowProducts`, `rowsft.layers.lent_rows`). A scaled
    norm's input is kept as its factors where delta's gradient is computed in ``x``'s dtype (no autocast here)."""
    return LentRowProducts.apply(x, source, conv1d, "lent", deltas[0].dtype == x.dtype, len(weights), *weights,
                                 *biases, *indices, *deltas)


def written_rows_outputs(x: torch.Tensor, source, conv1d: tuple[bool, ...], weights, biases, indices,
                         deltas) -> tuple[torch.Tensor, ...]:
    """``x W_iᵀ + b_i`` for weights that hold their rows already, for each layer ``i`` (`InWeightProducts`); the
    deltas are inputs for their gradients. A scaled norm's input is always kept as its factors."""
    return InWeightProducts.apply(x, source, conv1d, "written", True, len(weights), *weights, *biases, *indices,
                                  *deltas)


__all__ = ["ROWS", "GroupedRowProducts", "LentRowProducts", "InWeightProducts", "added_rows_outputs",
           "lent_rows_outputs", "written_rows_outputs"]
