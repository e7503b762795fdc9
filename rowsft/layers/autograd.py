"""Autograd functions for a frozen linear layer plus a sparse trainable update.

One function per unit computes ``y = x Wᵀ + b`` (``W`` frozen, ``(d_out, d_in)``) and adds the update
into ``y`` in place, so no second output-sized buffer exists; it decides itself what it keeps for
backward:

- rows (``delta (k, d_in)``): ``y[..., idx] += x deltaᵀ``; keeps ``x`` (usually shared with other
  consumers of the same input); ``grad delta = g[..., idx]ᵀ x`` = rows ``idx`` of the dense weight gradient.
- columns (``delta (d_out, k)``): ``y += x[..., idx] deltaᵀ``; keeps only the ``k`` selected input
  columns; ``grad x`` gets ``g delta`` added into columns ``idx``.
- elements (``values (k,)`` at flat positions ``r * d_in + c``): keeps ``values``, the indices and
  ``x``, or only ``x``'s touched columns when the mask touches at most half of them (salience masks
  crowd onto a few outlier input features: on SmolLM2, a third of ``o_proj``'s and ``down_proj``'s);
  the update restricted to its touched rows, ``(n_rows, d_in)``, is rebuilt in forward and again in
  backward and never kept alive between them.

Where the input can be rebuilt from tensors the frozen graph keeps anyway (a norm's input, an MLP
product's factors: `rowsft.layers.rebuild`), the layer passes that ``source`` and the function keeps the
source's tensors instead of ``x`` (row and element updates, whole or touched columns alike) and
rebuilds ``x`` in backward, bit for bit; the input then costs no memory of its own. A row update over a scaled
RMSNorm's output (``Source.scaled``) goes further and never rebuilds it (`RowUpdate`, `row_gradient`). Row layers
that read one input compute their updates together (`rowsft.layers.grouped`, on these same helpers).

Fast path (``weight`` given): the frozen matmul runs inside the function and its input gradient
``g W`` is computed in backward, with the update's share accumulated into it in place. Fallback
(``out`` given): the caller ran the base layer itself (hooked or subclassed layers) and the function
adds the update into that output in place (``ctx.mark_dirty``); if it is a view, autograd copies.

Compute dtype of the update: the autocast dtype when autocast is on for the input's device, else
the update's dtype (an fp32 update over a bf16 layer is computed in fp32 and cast back). Gradients
come back in the dtype of the tensor they belong to.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from rowsft.layers.products import (
    ScaledInput,
    add_into_columns,
    add_product,
    cast,
    compute_dtype,
    effective_weight,
    element_block,
    element_columns,
    element_rows,
    flat,
    frozen_input_grad,
    frozen_linear,
    row_gradient,
    thin_product,
)


def keeps_column_subset(n_cols: int, d_in: int) -> bool:
    """Whether an element update keeps only its touched input columns (``n_cols`` of ``d_in``) for backward."""
    return n_cols <= ElementUpdate.LEAN_COLUMN_FRACTION * d_in


def input_columns(index: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``element_columns(index, d_in)`` when an element update with flat ``index`` should keep only those
    columns of its input for backward (`keeps_column_subset`), else None (it keeps the whole input)."""
    columns, position = element_columns(index, d_in)
    return (columns, position) if keeps_column_subset(columns.numel(), d_in) else None


def _static_entry_points(cls):
    """Give an update class the static ``forward``/``backward`` that autograd calls and that
    ``torch.compile`` can trace (it refuses classmethods there); they run ``cls._forward``/``cls._backward``."""
    def forward(ctx, out, x, weight, bias, update, index, d_in, conv1d=False, columns=None, source=None):
        ctx.columns, ctx.source = columns, source
        return cls._forward(ctx, out, x, weight, bias, update, index, d_in, conv1d)

    def backward(ctx, grad_out):
        return *cls._backward(ctx, grad_out), None, None

    cls.forward, cls.backward = staticmethod(forward), staticmethod(backward)
    return cls


def _save(ctx, kept, update, index, weight, fold_scaled: bool = False, extra: tuple = ()) -> None:
    """``ctx.save_for_backward``; with a `rowsft.layers.rebuild.Source` (``ctx.source``) and a ``kept`` input,
    the source's tensors are saved instead (kept by the frozen graph anyway) and the input is rebuilt in backward.
    ``fold_scaled``: a source that is a scaled norm's output (``Source.scaled``) is kept as its factors
    (`ScaledInput`), never rebuilt. ``extra``: more tensors to save, read back by `saved_extra`."""
    source = getattr(ctx, "source", None)
    ctx.rebuild = ctx.source = ctx.shared = None      # the source's tensors live in saved_tensors only
    ctx.folded, ctx.n_extra = False, len(extra)
    if kept is not None and source is not None and fold_scaled and source.scaled is not None:
        ctx.folded = True
        ctx.save_for_backward(None, update, index, weight, *extra, source.tensors[0], *source.scaled)
    elif kept is not None and source is not None:
        ctx.rebuild, ctx.shared = source.rebuild, source.shared
        source.shared.users += 1
        ctx.save_for_backward(None, update, index, weight, *extra, *source.tensors)
    else:
        ctx.save_for_backward(kept, update, index, weight, *extra)


def saved_extra(ctx) -> tuple:
    """The ``extra`` tensors given to `_save`, once `_saved` has read them (``ctx.saved_tensors`` may be read only
    once under checkpointing); handed over and dropped from ``ctx``."""
    extra, ctx.extra_values = ctx.extra_values, None
    return extra


def _saved(ctx, cls):
    """``(kept, update, index, weight)`` as saved by `_save`, the kept input rebuilt where it has to be (or given
    as a `ScaledInput`)."""
    kept, update, index, weight, *tensors = ctx.saved_tensors
    ctx.extra_values, tensors = tuple(tensors[:ctx.n_extra]), tensors[ctx.n_extra:]
    if ctx.folded:
        h, norm_weight, scale = tensors
        kept = ScaledInput(h, scale, norm_weight)
    elif ctx.rebuild is not None:
        rebuild = partial(_checked_rebuild, ctx.rebuild, tuple(ctx.x_shape), ctx.x_dtype)
        x = ctx.shared.take(rebuild, tensors, ctx.dt)     # (..., d_in) in the update's dtype; built once for q/k/v
        kept = cls._kept_from_input(ctx, x, index)
    return kept, update, index, weight


def _checked_rebuild(rebuild, shape, dtype, *tensors) -> torch.Tensor:
    x = rebuild(*tensors)                                  # bit for bit the layer's input
    if tuple(x.shape) != shape or x.dtype != dtype:        # pragma: no cover - a broken rule
        raise RuntimeError(f"rowsft.layers.rebuild rebuilt an input of shape {tuple(x.shape)} {x.dtype}, expected "
                           f"{shape} {dtype}; report this model, and apply the selection with "
                           f"rowsft.apply(..., rebuild_inputs=False)")
    return x


class _SparseUpdate(torch.autograd.Function):
    """Shared forward/backward skeleton; subclasses supply ``_add`` and ``_grads`` and the static
    ``forward``/``backward`` that autograd (and ``torch.compile``, which needs them static) calls.

    Inputs: ``out`` (base output to modify, or None), ``x (..., d_in)``, ``weight`` (frozen
    ``(d_out, d_in)`` for the fast path, or None), ``bias``, ``update``, ``index``, ``d_in``.
    """

    FOLDS_SCALED_INPUT = False    # whether ``_grads`` takes a `ScaledInput` for a scaled-norm source

    @classmethod
    def _forward(cls, ctx, out, x, weight, bias, update, index, d_in, conv1d=False):
        ctx.fallback = out is not None
        dt = compute_dtype(x, update.dtype)
        x_dt = ctx.base_dt = None                           # x in the update's compute dtype, when cast anyway
        if out is None:
            ctx.base_dt = compute_dtype(x, weight.dtype)
            base_x = cast(x, ctx.base_dt)                    # cast once (autocast): the update's product reads it too
            out = frozen_linear(base_x, weight, bias, conv1d, ctx.base_dt)    # (..., d_out), frozen base
            x_dt = base_x if base_x.dtype == dt else None
        else:
            ctx.mark_dirty(out)
        keep = cls._add(ctx, out, x, update, index, d_in, dt, x_dt)   # what the update needs for backward
        need_x, need_update = ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        ctx.dt, ctx.d_in, ctx.x_dtype, ctx.x_shape, ctx.update_dtype = dt, d_in, x.dtype, x.shape, update.dtype
        _save(ctx, keep if need_update else None, update if need_x else None, index, weight if need_x else None,
              fold_scaled=ctx.source is not None and dt == x.dtype and cls.FOLDS_SCALED_INPUT)   # none compiled
        return out

    @classmethod
    def _backward(cls, ctx, grad_out):
        kept, update, index, weight = _saved(ctx, cls)
        grad_x = None
        if ctx.needs_input_grad[1]:
            if weight is not None:                               # the frozen base's share: g W
                grad_x = frozen_input_grad(grad_out, weight, ctx.base_dt, ctx.x_dtype, ctx.x_shape)  # (..., d_in)
        grad_x, grad_update = cls._grads(ctx, grad_out, grad_x, kept, update, index)
        return grad_out if ctx.fallback else None, grad_x, None, None, grad_update, None, None, None


@_static_entry_points
class RowUpdate(_SparseUpdate):
    """``y[..., index] += x deltaᵀ`` with ``delta (k, d_in)``.

    When ``x`` is a scaled RMSNorm's output, ``x = w ⊙ (h · s)`` (``Source.scaled``: Llama, Mistral, Qwen ...),
    backward never rebuilds it: ``grad delta = ((g_rows · s)ᵀ h) ⊙ w`` (`row_gradient`), the two scalings taken
    on the thin ``(N, k)`` and ``(k, d_in)`` factors instead of two passes over the ``(N, d_in)`` input (about
    1 ms a block saved on SmolLM2 at 1024 tokens). Equal in exact arithmetic; in float32 it differs from the
    rebuilt-input product by rounding only (a few ulps), not bit for bit. Only where the update computes in the
    input's dtype: under autocast the input is rebuilt and cast once per group as before (a float32 product on
    ``h`` looked slower there in one run than the rebuild and the bf16 product), bit for bit."""

    FOLDS_SCALED_INPUT = True

    @staticmethod
    def _kept_from_input(ctx, x, index):
        return x

    @staticmethod
    def _add(ctx, out, x, delta, index, d_in, dt, x_dt=None):
        contribution = thin_product(cast(x, dt) if x_dt is None else x_dt, cast(delta, dt))   # (..., k)
        add_into_columns(out, index, cast(contribution, out.dtype))
        return x

    @staticmethod
    def _grads(ctx, grad_out, grad_x, x, delta, index):
        grad_rows = cast(flat(grad_out).index_select(1, index), ctx.dt)      # (N, k)
        grad_delta = None
        if ctx.needs_input_grad[1]:
            delta = cast(delta, ctx.dt)                                        # (k, d_in)
            if grad_x is None:
                grad_x = cast(torch.mm(grad_rows, delta), ctx.x_dtype).view(ctx.x_shape)
            else:
                add_product(grad_x, grad_rows, delta)
        if ctx.needs_input_grad[4]:
            grad_delta = cast(row_gradient(grad_rows, x, ctx.dt), ctx.update_dtype)      # (k, d_in)
        return grad_x, grad_delta


@_static_entry_points
class ColumnUpdate(_SparseUpdate):
    """``y += x[..., index] deltaᵀ`` with ``delta (d_out, k)``; keeps only ``x[..., index]``."""

    @staticmethod
    def _kept_from_input(ctx, x, index):
        return x.index_select(-1, index)                                      # (..., k)

    @staticmethod
    def _add(ctx, out, x, delta, index, d_in, dt, x_dt=None):
        x_cols = x.index_select(-1, index)                                    # (..., k)
        add_product(out, x_cols.to(dt), delta.to(dt).T)
        return x_cols

    @staticmethod
    def _grads(ctx, grad_out, grad_x, x_cols, delta, index):
        g = grad_out.to(ctx.dt)                                               # (..., d_out)
        grad_delta = None
        if ctx.needs_input_grad[1]:
            share = (g @ delta.to(ctx.dt)).to(ctx.x_dtype)                    # (..., k)
            if grad_x is None:
                grad_x = grad_out.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
            add_into_columns(grad_x, index, share)
        if ctx.needs_input_grad[4]:
            grad_delta = (flat(g).T @ flat(x_cols).to(ctx.dt)).to(ctx.update_dtype)  # (d_out, k)
        return grad_x, grad_delta


@_static_entry_points
class ElementUpdate(_SparseUpdate):
    """``y += x Dᵀ`` for the sparse ``D`` with ``values (k,)`` at flat ``index``; ``D`` (its touched
    rows) is rebuilt in forward and in backward, never kept.

    Fused form (fast path, when more than a quarter of the rows are touched, as a global SPEFT mask
    touches nearly all): ``W + D`` is built as one transient ``(d_out, d_in)`` tensor, used for a
    single matmul and freed, and built again in backward for ``g (W + D)``. That is the three large
    matmuls of a dense-scatter layer (SPEFT's code) instead of five, while nothing dense outlives its
    forward or backward. ``W + 0`` is ``W`` bit for bit, so step 0 still equals the base model.

    Kept for the gradient of ``values``: ``x``, or ``x[..., touched columns]`` when the caller passes
    those columns (``columns``, from `input_columns`, computed once per mask by the layer: at most
    ``LEAN_COLUMN_FRACTION`` of them touched). The gradient product is then that much narrower too.
    The layer passes none where the whole input is kept anyway (by a sibling sharing it, as ``v_proj``
    shares ``q_proj``'s, or by the attention kernel, as for ``o_proj``): a subset would be paid on top.
    """

    FUSE_FRACTION = 0.25  # fuse when touched rows exceed this share of d_out
    LEAN_COLUMN_FRACTION = 0.5  # keep only the touched columns of x when they are at most this share of d_in

    @staticmethod
    def _keep_input(ctx, x):
        """What backward needs of ``x`` for the gradient of ``values``: ``x`` or its touched columns."""
        if ctx.columns is None or getattr(ctx, "source", None) is not None:
            return x                                  # a rebuilt input is cut in backward (_kept_from_input)
        return x.index_select(-1, ctx.columns[0])     # (..., n_cols)

    @staticmethod
    def _kept_from_input(ctx, x, index):
        return x if ctx.columns is None else x.index_select(-1, ctx.columns[0])

    @staticmethod
    def _value_gradient(ctx, dense, index, row_position):
        """Entry ``(row_position[j], column of index j)`` of ``dense`` (its rows: the touched rows or all
        ``d_out``; its columns: all ``d_in``, or the touched columns when only those were kept), for each ``j``."""
        cols = torch.remainder(index.long(), ctx.d_in) if ctx.columns is None else ctx.columns[1]
        return dense[row_position, cols].to(ctx.update_dtype)                 # (k,)

    @classmethod
    def _forward(cls, ctx, out, x, weight, bias, update, index, d_in, conv1d=False):
        dt = compute_dtype(x, update.dtype)
        fused = (out is None and weight is not None and compute_dtype(x, weight.dtype) == dt
                 and weight.dtype == dt)
        if fused:
            touched = element_rows(index, d_in)[0]
            fused = touched.numel() > cls.FUSE_FRACTION * weight.shape[0]
        ctx.fused = fused
        if not fused:
            return _SparseUpdate._forward.__func__(cls, ctx, out, x, weight, bias, update, index, d_in, conv1d)
        ctx.fallback, ctx.dt, ctx.d_in, ctx.x_dtype, ctx.x_shape = False, dt, d_in, x.dtype, x.shape
        ctx.update_dtype, ctx.base_dt = update.dtype, dt
        effective = effective_weight(weight, update, index, dt)              # (d_out, d_in), transient
        out = frozen_linear(x, effective, bias, conv1d)                       # (..., d_out)
        del effective
        need_x, need_update = ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        kept = cls._keep_input(ctx, x) if need_update else None
        _save(ctx, kept, update if need_x else None, index, weight if need_x else None)
        return out

    @classmethod
    def _backward(cls, ctx, grad_out):
        if not ctx.fused:
            return _SparseUpdate._backward.__func__(cls, ctx, grad_out)
        x, update, index, weight = _saved(ctx, cls)
        g = grad_out.to(ctx.dt)                                               # (..., d_out)
        grad_x = grad_values = None
        if ctx.needs_input_grad[1]:
            effective = effective_weight(weight, update, index, ctx.dt)      # rebuilt, not kept
            grad_x = (g @ effective).to(ctx.x_dtype)                          # (..., d_in)
            del effective
        if ctx.needs_input_grad[4]:
            dense = flat(g).T @ flat(x).to(ctx.dt)                  # (d_out, d_in or n_cols), transient
            rows = torch.div(index.long(), ctx.d_in, rounding_mode="floor")
            grad_values = cls._value_gradient(ctx, dense, index, rows)  # (k,)
        return None, grad_x, None, None, grad_values, None, None, None

    @staticmethod
    def _add(ctx, out, x, values, index, d_in, dt, x_dt=None):
        touched, position, cols = element_rows(index, d_in)
        block = element_block(values, position, cols, touched.numel(), d_in, dt)  # (n_rows, d_in)
        add_into_columns(out, touched, F.linear(x.to(dt) if x_dt is None else x_dt, block).to(out.dtype))
        return ElementUpdate._keep_input(ctx, x) if ctx.needs_input_grad[4] else None

    @staticmethod
    def _grads(ctx, grad_out, grad_x, x, values, index):
        touched, position, cols = element_rows(index, ctx.d_in)
        grad_rows = grad_out.index_select(-1, touched).to(ctx.dt)            # (..., n_rows)
        grad_values = None
        if ctx.needs_input_grad[1]:
            block = element_block(values, position, cols, touched.numel(), ctx.d_in, ctx.dt)
            if grad_x is None:
                grad_x = (grad_rows @ block).to(ctx.x_dtype)
            else:
                add_product(grad_x, grad_rows, block)
            del block
        if ctx.needs_input_grad[4]:
            dense_rows = flat(grad_rows).T @ flat(x).to(ctx.dt)     # (n_rows, d_in or n_cols), transient
            grad_values = ElementUpdate._value_gradient(ctx, dense_rows, index, position)  # (k,)
        return grad_x, grad_values


FUNCTIONS = {"row": RowUpdate, "column": ColumnUpdate, "element": ElementUpdate}


def sparse_linear(unit: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  update: torch.Tensor, index: torch.Tensor, conv1d: bool = False,
                  columns: tuple[torch.Tensor, torch.Tensor] | None = None, source=None) -> torch.Tensor:
    """Fast path: ``x Wᵀ + b`` plus the sparse update, ``weight`` frozen ``(d_out, d_in)`` → ``(..., d_out)``.
    ``conv1d``: compute the frozen part as HF ``Conv1D`` does (always one ``addmm``). ``columns``: an element
    update keeps only these touched columns of ``x`` (`input_columns`; None: the whole ``x``). ``source``: a
    `rowsft.layers.rebuild.Source` of ``x``: its tensors are kept instead of ``x``, which backward rebuilds."""
    return FUNCTIONS[unit].apply(None, x, weight, bias, update, index, weight.shape[1], conv1d, columns, source)


def add_sparse_update(unit: str, out: torch.Tensor, x: torch.Tensor, update: torch.Tensor,
                      index: torch.Tensor, d_in: int,
                      columns: tuple[torch.Tensor, torch.Tensor] | None = None, source=None,
                      function: type[_SparseUpdate] | None = None) -> torch.Tensor:
    """Fallback: add the sparse update into a base output ``out (..., d_out)`` in place; returns ``out``.
    ``columns``/``source``: as in `sparse_linear`; ``function``: another update function than ``unit``'s (rows
    already in a hooked or subclassed base layer's weight: `rowsft.layers.in_weight.InWeightRowUpdate`)."""
    return (function or FUNCTIONS[unit]).apply(out, x, None, None, update, index, d_in, False, columns, source)
