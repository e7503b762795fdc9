"""Rows trained inside the base weight: the frozen matmul computes the row update too.

The usual row update computes ``y = x Wᵀ`` and adds ``x deltaᵀ`` into the columns ``idx`` of ``y``: three thin
products a step (the forward share, the input gradient's share ``g_rows delta``, delta's gradient). Trained *in the
weight* (``rowsft.apply(..., train_in_weight=True)``), the layer writes its rows' current values
``W0[idx] + delta`` into the base weight before every forward, so the frozen ``x W'ᵀ`` and the frozen input gradient
``g W'`` carry the update, and only ``grad delta = g[..., idx]ᵀ x`` is left
(`InWeightProducts`; a hooked or subclassed base layer runs as is, with `InWeightRowUpdate`): one thin product
instead of three. Rows *lent* to the weight (`rowsft.layers.lent_rows`, the default over float32/float64 weights)
compute the same products with the same bits, but write the rows for each product and put the pretrained ones back
right after it: no pretrained-rows copy, nothing written between steps, a few small copies more a step. Trained in the
weight is for a hooked or subclassed base, which cannot lend.

- The record is ``pretrained_rows (k, d_in)`` (a buffer in the weight's dtype, as large as ``delta``) and ``delta``;
  the weight's rows are a cache of ``W0[idx] + delta``, rebuilt at every forward (`write_rows`). So any optimizer,
  fused ones that do not bump a tensor's version included, and any edit of ``delta`` are seen at the next forward.
  The rows are written the way a merge folds them (`rowsft.layers.update_forms.folded`: in the wider dtype,
  stored in the weight's), so a merge gives the very weight the last forward used.
- What reads the model sees the pretrained weight where it expects it: ``state_dict`` writes the pretrained rows
  back into a copy (`hide_rows_in_state_dict`), ``load_state_dict`` takes the rows out before loading and reads
  the pretrained rows again after (a new base weight or new indices are taken up), ``unload`` and ``unmerge``
  put the pretrained rows back bit for bit (an unmerge of a layer trained the usual way subtracts, which rounds), and
  ``RowSFTModel.disable_adapter`` takes them out for its block (`rowsft.integrations.rowsft_model`).
- Arithmetic: ``x (W0 + delta)ᵀ`` with the sum rounded to the weight's dtype, where the usual layer computes
  ``x W0ᵀ + x deltaᵀ``. In float32 the two differ by rounding; under bf16 autocast the summed weight is cast to
  bf16 as full fine-tuning's weights are, so an update below a bf16 ulp of its weight does not change the forward
  until it has grown (the usual layer adds ``x deltaᵀ`` in bf16 on its own). The same holds for a bf16 model with
  float32 deltas (``delta_dtype=torch.float32``): the rows are stored in bf16, and delta is their float32 master
  copy, as in mixed-precision full fine-tuning.
- Not for: a quantized base (its packed weight cannot take rows), a weight tied to another parameter (that one
  would change too), ``torch.compile`` (the write is a side effect), FSDP2 sharding (a rank holds a slice of
  the rows).
- One autograd node for the layers that read one input (`InWeightProducts`, `rowsft.layers.group_products`): a
  `rowsft.layers.grouped` group (q/k/v, gate/up) of layers trained in the weight runs as one, its leader computing
  every member's frozen output (``x`` cast once under autocast), and in backward ``grad x = Σ g_i W_i`` in place and
  every ``grad delta_i`` as one product. A layer alone (o_proj, down_proj) takes the same node with one layer.
- **Rows in the cast** (the default for row layers under autocast over weights in another dtype, bf16 over float32,
  with kept casts: `rowsft.layers.cast_weights`): the rows ``bf16(W0[idx] + delta)`` are written into the layer's
  own kept compute-dtype copy of its weight (`cast_with_rows`), not into the weight, which stays pretrained. Same
  products and the same bits as rows trained in the weight under autocast (the sum is rounded to the weight's
  dtype, then cast), so the same arithmetic as mixed-precision full fine-tuning; no pretrained-rows buffer, no hooks
  (``state_dict``, merges and ``disable_adapter`` see the untouched weight). Off with ``train_in_cast=False``
  (`rowsft.apply`), or ``keep_cast_weights=False``; not under ``torch.compile``, over a quantized or a hooked base,
  or without autocast, where the usual update runs.
- Under bf16 autocast, over a scaled RMSNorm (``x = w ⊙ (h · s)``, `rowsft.layers.rebuild`), delta's gradient is
  ``((g_rows · s)ᵀ bf16(h)) ⊙ w``: ``h`` cast once for the group instead of ``x`` rebuilt (two passes) and cast. It
  equals the usual layers' ``g_rowsᵀ bf16(x)`` to bf16 rounding, not bit for bit (in float32 the fold is the usual
  layers' own, `rowsft.layers.products.row_gradient`).
"""
from __future__ import annotations

import torch

from rowsft.layers.autograd import RowUpdate, _static_entry_points, add_sparse_update
from rowsft.layers.cast_weights import cast_with_rows, refresh_rows
from rowsft.layers.cast_weights import forget as forget_cast
from rowsft.layers.forward_paths import frozen_weight, fusable, lends_rows, writable
from rowsft.layers.group_products import InWeightProducts, written_rows_outputs
from rowsft.layers.products import (
    cast,
    compute_dtype,
    gathered_columns,
    row_gradient,
)
from rowsft.layers.update_forms import folded
from rowsft.targets import is_transposed, weight_out_in

WEIGHT_KEY = "base_layer.weight"
WRITTEN = ("weight", "cast")     # the `rows_mode`s whose rows stay written while the forward runs (`in_weight_outputs`)


@_static_entry_points
class InWeightRowUpdate(RowUpdate):
    """Rows whose current values ``W0[idx] + delta`` the layer has written into the weight it passes
    (`write_rows`): ``y = x W'ᵀ`` and the frozen input gradient ``g W'`` already carry the update, so
    only ``grad delta = g[..., idx]ᵀ x`` is left: one thin product instead of `RowUpdate`'s three, and no columns
    added in forward. ``delta`` is still an input, for its gradient (and so that autograd refuses a backward after
    delta changed in place). Kept for backward: what a `RowUpdate` keeps (``x``, its `Source`, or a scaled norm's
    factors). Used where the base layer runs as is (hooked or subclassed: the update's output is added into its
    output, here nothing); a plain base layer takes `InWeightProducts`."""

    @staticmethod
    def _add(ctx, out, x, delta, index, d_in, dt, x_dt=None):
        return x

    @staticmethod
    def _grads(ctx, grad_out, grad_x, x, delta, index):
        grad_delta = None
        if ctx.needs_input_grad[4]:
            grad_rows = gathered_columns([grad_out], [index], ctx.dt)            # (N, k), as InWeightProducts gathers
            grad_delta = cast(row_gradient(grad_rows, x, ctx.dt), ctx.update_dtype)      # (k, d_in)
        return grad_x, grad_delta


def rows_mode(layer, x: torch.Tensor) -> str | None:
    """Where ``layer``'s rows go for a forward on ``x``: ``"weight"`` (trained in the base weight), ``"cast"`` (in its
    kept autocast copy: `trains_in_cast`), ``"lent"`` (lent to the base weight for each product:
    `rowsft.layers.lent_rows`) or None (the usual update adds them)."""
    if layer.in_weight:
        return "weight"
    if trains_in_cast(layer, x):
        return "cast"
    return "lent" if lends_rows(layer.unit, layer.lend_rows, layer.base_layer, x, layer.update) else None


def trains_in_cast(layer, x: torch.Tensor) -> bool:
    """True when ``layer`` (a row layer, not merged) writes its rows into its kept compute-dtype copy for ``x``
    (`rows_go_in_cast` with the layer's settings)."""
    return rows_go_in_cast(layer.unit, layer.train_in_cast, layer.keep_cast_weight, layer.base_layer, x)


def rows_go_in_cast(unit: str, train_in_cast: bool, keep_cast: bool, base_layer, x: torch.Tensor) -> bool:
    """True when an update of ``unit`` over ``base_layer`` writes its rows into the base weight's kept cast for ``x``:
    a row update, asked to (``train_in_cast`` and ``keep_cast``), under autocast to another dtype than the weight's,
    over a plain, hook-free float base (`rowsft.layers.forward_paths.fusable`; a quantized base is not one), not under
    ``torch.compile``. `rowsft.apply`'s layers and the peft method's ask this alike."""
    if not (unit == "row" and train_in_cast and keep_cast and fusable(base_layer)) or torch.compiler.is_compiling():
        return False
    weight_dtype = base_layer.weight.dtype
    return compute_dtype(x, weight_dtype) != weight_dtype


def cast_with_trained_rows(base_layer, indices: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The kept compute-dtype cast of ``base_layer``'s weight ``(d_out, d_in)`` with its rows ``W0[idx] + delta``
    written (`cast_with_rows`), rounded to the weight's dtype first (`folded`), as rows written into the weight are."""
    weight = weight_out_in(base_layer)                                # (d_out, d_in), a view for Conv1D
    rows = folded(weight.index_select(0, indices), delta)                                            # (k, d_in)
    return cast_with_rows(base_layer, compute_dtype(x, weight.dtype), indices, rows)


def in_cast_output(base_layer, x: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor, source) -> torch.Tensor:
    """One row update trained in the kept cast of a plain base layer (`rows_go_in_cast`), outside a
    `rowsft.layers.SparseLinear` (the peft method's layer): ``(..., d_out)`` through `InWeightProducts`."""
    weight = cast_with_trained_rows(base_layer, indices, delta, x)
    return written_rows_outputs(x, source, (is_transposed(base_layer),), (weight,), (base_layer.bias,), (indices,),
                                (delta,))[0]


def weight_with_rows(layer, x: torch.Tensor) -> torch.Tensor:
    """The ``(d_out, d_in)`` weight ``layer``'s frozen product reads for ``x``, its rows ``W0[idx] + delta`` written:
    the base weight (or its kept cast under autocast) for rows trained in the weight, else the layer's kept cast with
    the rows (`cast_with_rows`; the base weight untouched). The rows are rounded to the weight's dtype first either
    way (`folded`), so both give the same bits."""
    base = layer.base_layer
    if not layer.in_weight:                                           # rows in the cast
        return cast_with_trained_rows(base, layer.indices, layer.delta, x)
    weight = weight_out_in(base)                                      # (d_out, d_in), a view for Conv1D
    rows = write_rows(layer, weight)                                  # (k, d_in), as written
    used = frozen_weight(base, x, layer.keep_cast_weight)             # under autocast: the kept cast
    if used is not weight:
        refresh_rows(used, layer.indices, rows)
    return used


def in_weight_outputs(layers, x: torch.Tensor, source) -> tuple[torch.Tensor, ...]:
    """The outputs of row layers trained in their weights, or in their casts (`rows_mode`), that read ``x`` (plain,
    hook-free bases: `rowsft.layers.forward_paths.fusable`), their rows written first: `InWeightProducts`."""
    check_not_compiling(layers[0])
    bases = [layer.base_layer for layer in layers]
    weights = [weight_with_rows(layer, x) for layer in layers]
    return written_rows_outputs(x, source, tuple(is_transposed(b) for b in bases), weights, [b.bias for b in bases],
                                [layer.indices for layer in layers], [layer.delta for layer in layers])


def forward(layer, x: torch.Tensor, source) -> torch.Tensor:
    """One row layer trained in its weight or in its cast, on its own: `in_weight_outputs` for a plain base layer,
    else (in the weight only) its base layer run as is (rows written first) with `InWeightRowUpdate` for delta's
    gradient."""
    if not layer.in_weight or fusable(layer.base_layer):
        return in_weight_outputs([layer], x, source)[0]
    check_not_compiling(layer)
    write_rows(layer)
    return add_sparse_update("row", writable(layer.base_layer(x)), x, layer.delta, layer.indices, layer.in_features,
                             None, source, function=InWeightRowUpdate)


@torch.no_grad()
def write_rows(layer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``W[idx] = pretrained_rows + delta`` in the weight's storage, rounded as a merge folds them (`folded`); returns
    the rows written ``(k, d_in)``. Through ``.data``: the weight's version is not bumped, so a graph that saved it (a
    second forward before one backward, checkpointing) is not refused for rows rewritten with the same values.
    ``weight``: the base layer's ``weight_out_in``, when the caller has it."""
    weight = (weight_out_in(layer.base_layer) if weight is None else weight).data     # (d_out, d_in), a view for Conv1D
    rows = folded(layer.pretrained_rows, layer.delta)                                                # (k, d_in)
    weight.index_copy_(0, layer.indices, rows)
    return rows


def enable(layer) -> None:
    """Start training ``layer``'s rows in its weight: keep ``pretrained_rows`` (its group, if any, leaves it out:
    `rowsft.layers.grouped.RowGroup.groupable`)."""
    check_can_train_in_weight(layer)
    layer.register_buffer("pretrained_rows", read_pretrained_rows(layer), persistent=False)
    layer.in_weight = True


def disable(layer) -> None:
    """Train ``layer`` the usual way again: the pretrained rows back into the weight (unless merged), the copy dropped."""
    if not layer.merged:
        take_rows_out(layer)
    del layer.pretrained_rows
    layer.in_weight = False


@torch.no_grad()
def take_rows_out(layer) -> None:
    """Put the pretrained rows back into the base weight, bit for bit (a kept cast of it is dropped)."""
    forget_cast(layer.base_layer)
    weight_out_in(layer.base_layer).data.index_copy_(0, layer.indices, layer.pretrained_rows)


@torch.no_grad()
def read_pretrained_rows(layer) -> torch.Tensor:
    """``W[idx]`` of the base weight as it stands, as a fresh ``(k, d_in)`` tensor (the weight must hold the pretrained
    rows: after `take_rows_out`, or before the first forward)."""
    return weight_out_in(layer.base_layer).index_select(0, layer.indices).detach().clone()


def hide_rows_in_state_dict(layer, state_dict, prefix, local_metadata) -> None:
    """``state_dict`` hook: the base weight is written with its pretrained rows, as a layer trained the usual way
    writes it (a copy; the model keeps its rows)."""
    key = prefix + WEIGHT_KEY
    if not layer.in_weight or layer.merged or key not in state_dict:
        return
    stored = state_dict[key].detach().clone()
    weight_out_in_like(layer, stored).index_copy_(0, layer.indices, layer.pretrained_rows)
    state_dict[key] = stored


def weight_out_in_like(layer, stored: torch.Tensor) -> torch.Tensor:
    """``stored`` (a tensor laid out as the base layer's weight) as ``(d_out, d_in)``: transposed for a Conv1D."""
    return stored.t() if is_transposed(layer.base_layer) else stored


def before_load(layer, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook: take the rows out, so that what is loaded lands on the pretrained weight."""
    if layer.in_weight and not layer.merged:
        take_rows_out(layer)


def after_load(layer, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: read the pretrained rows again (the base weight or the indices may be new)."""
    if layer.in_weight and not layer.merged:
        layer.pretrained_rows = read_pretrained_rows(layer)


def check_can_train_in_weight(layer) -> None:
    """A clear error, before anything changes, where rows cannot be trained inside ``layer``'s base weight."""
    advice = "apply with train_in_weight=False (the usual row update, same results up to float rounding)"
    if layer.unit != "row":
        raise ValueError(f"{layer.label}: train_in_weight trains rows only; this layer trains {layer.unit}s; {advice}")
    if layer.quantization is not None:
        raise ValueError(f"{layer.label}: its base is quantized ({layer.quantization}); rows cannot be written into a "
                         f"packed weight; {advice}")
    if layer.merged:
        raise ValueError(f"{layer.label} is merged; call unmerge() before training it in the weight")


def check_not_compiling(layer) -> None:
    """Refuse a forward under ``torch.compile``: writing the rows is a side effect the compiled graph would drop."""
    if torch.compiler.is_compiling():
        raise RuntimeError(f"{layer.label}: rows trained in the weight (train_in_weight=True) cannot run under "
                           f"torch.compile; apply with train_in_weight=False to compile")


__all__ = ["InWeightRowUpdate", "InWeightProducts", "WRITTEN", "rows_mode", "trains_in_cast", "rows_go_in_cast",
           "cast_with_trained_rows", "in_cast_output", "weight_with_rows",
           "in_weight_outputs", "forward", "enable", "disable", "write_rows", "take_rows_out", "read_pretrained_rows", "hide_rows_in_state_dict", "before_load",
           "after_load", "check_can_train_in_weight", "check_not_compiling"]
