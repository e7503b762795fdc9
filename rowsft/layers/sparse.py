"""Sparse trainable updates of a frozen linear layer: rows, columns or single weights.

Each layer wraps the original ``nn.Linear`` or transformers ``Conv1D`` as ``.base_layer`` (frozen,
never copied) and adds a zero-initialised trainable update, so step 0 is the pretrained model exactly:

- :class:`RowSparseLinear`: ``delta (k, d_in)`` on output neurons ``idx``: ``y[..., idx] += x deltaᵀ``.
- :class:`ColumnSparseLinear`: ``delta (d_out, k)`` on input neurons ``idx``: ``y += x[..., idx] deltaᵀ``.
- :class:`ElementSparseLinear`: ``values (k,)`` at flat positions ``r * d_in + c`` of the ``(d_out, d_in)``
  weight (SPEFT-style masks).

The forward computes the frozen ``y = base(x)`` and adds the update into ``y`` in place (see
:mod:`rowsft.layers.autograd`); no dense ``(d_out, d_in)`` tensor is kept for backward. A row or
element layer whose input the frozen graph can rebuild (a norm's output, an MLP product:
:mod:`rowsft.layers.rebuild`) keeps no copy of it (``rebuild_input``, on by default). For a plain,
hook-free ``nn.Linear``/``Conv1D`` the frozen matmul runs inside the update's autograd function (same
kernel as the layer's own forward, so step-0 outputs are bit-identical); a hooked or subclassed base
layer is called as is and the update is added into its output. ``y`` is a fresh tensor either way. ``merge()`` folds the update into the base weight
(computed in the wider of the two dtypes, stored in the base dtype), ``unmerge()`` takes it out again. Over a float32
or float64 weight a row layer lends its rows ``W0[idx] + delta`` to the base weight for each frozen product and puts
the pretrained rows back right after it (``lend_rows``, on by default: `rowsft.layers.lent_rows`), and under autocast
writes them into its kept cast (`rowsft.layers.in_weight`): the frozen matmul then computes the update too. It may
instead train its rows inside the base weight between steps (``set_train_in_weight``).

A bitsandbytes-quantized base layer (``Linear4bit`` nf4/fp4, ``Linear8bitLt`` int8;
`rowsft.layers.quantized`) takes the second way: its own quantized forward and backward compute the frozen
product, the update (float: the base's compute dtype by default) is added into that output, so step 0 is
the quantized model's output bit for bit. Row and element layers over a 4-bit base rebuild their input as
over a float one (the 4-bit matmul keeps only its packed weight for backward, so the norm or MLP product
that keeps the input's source is what there is to keep). Over an int8 base they keep the input itself:
bitsandbytes' int8 matmul keeps its own input for backward (``ctx.A`` on CPU, ``ctx.tensors`` on CUDA), so
a rebuilt one would save nothing and cost an elementwise pass in backward. ``merge()`` refuses a quantized
base unless asked to re-quantize (``merge(requantize=True)``, which records `merge_error` and cannot be
undone); see `rowsft.layers.quantized` for why, and for the float export.

Weight decay of an optimizer over these parameters decays the *update* (pulls the weights toward
their pretrained values), not the full weight.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rowsft.layers import in_weight as rows_in_weight
from rowsft.layers.forward_paths import fusable, input_source, sparse_forward
from rowsft.layers.quantized import MERGE_REFUSAL, MergeError, merge_requantized
from rowsft.layers.update_forms import (
    KeptColumns,
    dense_update,
    element_positions,
    fold_update,
    input_kept_elsewhere,
    kept_input_width,
)
from rowsft.selection.choice import LayerChoice
from rowsft.targets import (
    is_linear_like,
    linear_shape,
    quantization_kind,
    weight_dtype,
    weight_out_in,
)


def _check_base(base_layer: nn.Module) -> tuple[int, int]:
    if isinstance(base_layer, SparseLinear):
        raise TypeError(f"{type(base_layer).__name__} is already a rowsft sparse layer; wrap its .base_layer instead")
    if not isinstance(base_layer, nn.Module) or not is_linear_like(base_layer):
        raise TypeError(f"cannot wrap a {type(base_layer).__name__}: rowsft sparse layers need an nn.Linear or a "
                        f"transformers Conv1D")
    return linear_shape(base_layer)


def _check_indices(indices, unit: str, shape: tuple[int, int], name: str) -> torch.Tensor:
    """Validated, sorted int64 indices (clear errors for non-integer, empty, out-of-range, duplicates)."""
    if not torch.is_tensor(indices):
        try:
            indices = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name}: {unit} indices must be integers, got {type(indices).__name__} ({e})") from None
    if indices.numel() and (indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex()):
        raise TypeError(f"{name}: {unit} indices must be an integer tensor, got dtype {indices.dtype}; "
                        f"pass positions such as torch.tensor([0, 5, 7]), not a mask or scores")
    choice = LayerChoice(unit, indices, shape)
    choice.validate(name)
    return torch.sort(choice.indices).values


class SparseLinear(nn.Module):
    """Common machinery of the three sparse layers (not used directly)."""

    unit: str = ""
    rebuild_input: bool = True   # keep a `rowsft.layers.rebuild.Source` of the input instead of the input, when there is one
    row_group = None             # a `rowsft.layers.grouped.RowGroup` of the row layers reading the same input, or None
    in_weight = False            # rows trained inside the base weight (`rowsft.layers.in_weight`; row layers only)
    keep_cast_weight = True      # under autocast, keep the base weight's cast across steps (`rowsft.layers.cast_weights`)
    train_in_cast = True         # under autocast, with a kept cast: rows written into it (`rowsft.layers.in_weight`)
    lend_rows = True             # float32/float64, no autocast: rows lent to the weight per product (`lent_rows`)

    def __init__(self, base_layer: nn.Module, indices, delta_dtype: torch.dtype | None = None,
                 train_bias: bool = False, name: str | None = None):
        super().__init__()
        d_out, d_in = _check_base(base_layer)
        label = name or f"{type(self).__name__}({type(base_layer).__name__} {d_out}x{d_in})"
        index = _check_indices(indices, self.unit, (d_out, d_in), label)
        weight = base_layer.weight
        if delta_dtype is not None and not (isinstance(delta_dtype, torch.dtype) and delta_dtype.is_floating_point):
            raise TypeError(f"{label}: delta_dtype must be a floating-point torch dtype, got {delta_dtype!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = d_in, d_out
        self.merged = False
        self.label = label
        self.quantization = quantization_kind(base_layer)        # "nf4" / "fp4" / "int8" for a bitsandbytes base
        self.merge_error: MergeError | None = None               # set by a re-quantizing merge
        self.delta_dtype = delta_dtype or weight_dtype(base_layer)   # a quantized base: its float compute dtype
        self.register_buffer("indices", self._index_buffer(index, d_out, d_in).to(weight.device))
        self._init_update(d_out, d_in, index.numel(), dict(dtype=self.delta_dtype, device=weight.device))
        bias_index = self._bias_index(index, d_out, d_in) if train_bias else None
        if train_bias and getattr(base_layer, "bias", None) is None:
            raise ValueError(f"{label}: train_bias=True but the base layer has no bias")
        if bias_index is None:
            self.register_parameter("bias_delta", None)
            self.register_buffer("bias_indices", None)
        else:
            self.register_buffer("bias_indices", bias_index.to(weight.device))
            self.bias_delta = nn.Parameter(torch.zeros(bias_index.numel(), dtype=self.delta_dtype, device=weight.device))
        self.register_state_dict_post_hook(rows_in_weight.hide_rows_in_state_dict)      # no-ops unless in_weight
        self.register_load_state_dict_pre_hook(rows_in_weight.before_load)
        self.register_load_state_dict_post_hook(rows_in_weight.after_load)

    # ---------------------------------------------------------------- per unit
    def _index_buffer(self, index: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
        return index

    def _init_update(self, d_out: int, d_in: int, k: int, factory: dict) -> None:
        raise NotImplementedError

    def _bias_index(self, index: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
        raise NotImplementedError

    def _fold(self, weight: torch.Tensor, sign: int) -> None:
        """``weight (d_out, d_in) += sign * update`` in place (weight is a possibly transposed view)."""
        fold_update(self.unit, weight, self.update, self.indices, sign)

    def _dense_update(self) -> torch.Tensor:
        return dense_update(self.unit, self.update, self.indices, (self.out_features, self.in_features))

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    # ---------------------------------------------------------------- shared
    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (as stored by the base layer), for code that reads ``module.weight``; while rows train
        in the weight (`set_train_in_weight`) it holds the trained rows (``state_dict`` gives the pretrained ones)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def update(self) -> nn.Parameter:
        """The trainable update tensor (``delta`` or ``values``)."""
        return self.values if self.unit == "element" else self.delta

    def _fusable(self) -> bool:
        """True when the frozen matmul may run inside the update's autograd function (see `fusable`)."""
        return fusable(self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        out = None if self.row_group is None else self.row_group.forward(self, x)     # `rowsft.layers.grouped`
        if out is None:
            mode = rows_in_weight.rows_mode(self, x)
            if mode in rows_in_weight.WRITTEN:                             # rows in the weight or its cast
                out = rows_in_weight.forward(self, x, self._input_source(x))
            else:                                      # rows lent (`rowsft.layers.lent_rows`, decided once) or added
                out = sparse_forward(self.base_layer, self.unit, x, self.update, self.indices, self._kept_columns(),
                                     self._input_source(x), self.keep_cast_weight, lend=mode == "lent")
        if self.bias_delta is not None:                                    # (n_bias,) into (..., d_out)
            bias = self.bias_delta.to(out.dtype).expand(*out.shape[:-1], -1)
            out = out.index_add_(-1, self.bias_indices, bias)
        return out

    def set_train_in_weight(self, enabled: bool = True) -> None:
        """Train the rows inside the base weight (`rowsft.layers.in_weight`), or (``False``) the usual way again,
        the pretrained rows back in the weight. Keeps ``pretrained_rows (k, d_in)`` while on."""
        if bool(enabled) != self.in_weight:
            (rows_in_weight.enable if enabled else rows_in_weight.disable)(self)

    def _input_source(self, x: torch.Tensor):
        return input_source(x, self.unit, self.update, self.rebuild_input, self.quantization)

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense ``(d_out, d_in)`` tensor in the update's dtype (for tests and merging)."""
        return self._dense_update()

    def delta_bias(self) -> torch.Tensor | None:
        """The bias update as a dense ``(d_out,)`` tensor, or ``None`` without a trained bias."""
        if self.bias_delta is None:
            return None
        dense = torch.zeros(self.out_features, dtype=self.bias_delta.dtype, device=self.bias_delta.device)
        return dense.index_add_(0, self.bias_indices, self.bias_delta.detach())

    @torch.no_grad()
    def _fold_all(self, sign: int) -> None:
        self._fold(weight_out_in(self.base_layer), sign)
        self._fold_bias(sign)

    @torch.no_grad()
    def _fold_bias(self, sign: int) -> None:
        if self.bias_delta is not None:
            b = self.base_layer.bias
            wide = torch.promote_types(b.dtype, self.bias_delta.dtype)
            rows = b.index_select(0, self.bias_indices).to(wide) + sign * self.bias_delta.to(wide)
            b.index_copy_(0, self.bias_indices, rows.to(b.dtype))

    def merge(self, requantize: bool = False) -> None:
        """Add the update into the base weight (base dtype); forward is then the base layer alone.

        A quantized base is refused unless ``requantize=True``: then the update is folded into the dequantized
        weight, which is quantized again (`rowsft.layers.quantized.merge_requantized`; the error lands in
        ``merge_error``), and the merge can no longer be undone."""
        if self.merged:
            return
        if self.quantization is not None:
            if not requantize:
                raise RuntimeError(MERGE_REFUSAL.format(name=self.label, kind=self.quantization))
            self.merge_error = merge_requantized(self.base_layer, self._dense_update(),
                                                 lambda weight: self._fold(weight, +1))
            self._fold_bias(+1)
        else:
            if self.in_weight:
                rows_in_weight.take_rows_out(self)       # fold onto the pretrained rows: the weight the last forward used
            self._fold_all(+1)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update from the base weight again (exact in float32/64 up to rounding; rows trained in the
        weight put their kept pretrained rows back, bit for bit); refused after a re-quantizing merge, whose rounding
        cannot be taken back."""
        if self.merged and self.quantization is not None:
            raise RuntimeError(f"{self.label}: the update was merged into re-quantized weights, which cannot be "
                               f"undone; load the quantized base and the saved adapter again")
        if self.merged and self.in_weight:
            rows_in_weight.take_rows_out(self)           # the pretrained rows back bit for bit
            self._fold_bias(-1)
            self.merged = False
        elif self.merged:
            self._fold_all(-1)
            self.merged = False

    def saved_activation_bytes(self, input_shape, dtype: torch.dtype | None = None) -> int:
        """Bytes of activations the update path keeps for backward for an input of ``input_shape``
        (``(..., d_in)``) in ``dtype`` (default: the base weight's dtype). The row layer keeps the input
        ``x`` itself (often shared with other consumers of the same input), the column layer only its
        ``k`` selected columns, the element layer ``x`` or its touched columns (:meth:`kept_input_width`).
        Where the frozen graph lets the input be rebuilt (`rowsft.layers.rebuild`), row and element layers keep none
        of it at run time; this figure is what they keep otherwise."""
        dtype = dtype or weight_dtype(self.base_layer)
        tokens = math.prod(tuple(input_shape)[:-1])
        return tokens * self.kept_input_width() * torch.empty((), dtype=dtype).element_size()

    def kept_input_width(self) -> int:
        """Features per token of the input that the update keeps for backward (see :func:`kept_input_width`)."""
        return kept_input_width(self.unit, self.indices, self.in_features)

    def _kept_columns(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Element layers: the touched input columns kept for backward (and each index's position among them),
        or None for the whole input."""
        return None

    def extra_repr(self) -> str:
        return (f"unit={self.unit}, k={self.k}, shape=({self.out_features}, {self.in_features}), "
                f"delta_dtype={self.delta_dtype}, train_bias={self.bias_delta is not None}, merged={self.merged}")


class RowSparseLinear(SparseLinear):
    """Trains ``k`` rows (output neurons) of a frozen linear layer: ``delta (k, d_in)``, zero at start."""

    unit = "row"

    def _init_update(self, d_out, d_in, k, factory):
        self.delta = nn.Parameter(torch.zeros(k, d_in, **factory))       # (k, d_in)

    def _bias_index(self, index, d_out, d_in):
        return index


class ColumnSparseLinear(SparseLinear):
    """Trains ``k`` columns (input neurons) of a frozen linear layer: ``delta (d_out, k)``, zero at
    start; only the ``k`` selected input columns are kept for backward. A trained bias covers all
    ``d_out`` outputs (every output sees the new input columns)."""

    unit = "column"

    def _init_update(self, d_out, d_in, k, factory):
        self.delta = nn.Parameter(torch.zeros(d_out, k, **factory))      # (d_out, k)

    def _bias_index(self, index, d_out, d_in):
        return torch.arange(d_out)


class ElementSparseLinear(SparseLinear):
    """Trains ``k`` single weights at flat positions ``r * d_in + c``: ``values (k,)``, zero at start.
    Indices are stored as int32 when the layer has fewer than 2**31 weights. A trained bias covers
    the rows that hold at least one selected weight."""

    unit = "element"

    def __init__(self, base_layer: nn.Module, indices, delta_dtype: torch.dtype | None = None,
                 train_bias: bool = False, name: str | None = None, lean_input: bool | None = None):
        """``lean_input``: keep only the touched input columns for backward when they are few (None: yes,
        unless ``name`` is a layer whose input is kept whole anyway, see :func:`input_kept_elsewhere`)."""
        super().__init__(base_layer, indices, delta_dtype, train_bias, name)
        self.lean_input = not input_kept_elsewhere(name) if lean_input is None else bool(lean_input)

    def _index_buffer(self, index, d_out, d_in):
        return index.to(torch.int32) if d_out * d_in < 2**31 else index

    def _init_update(self, d_out, d_in, k, factory):
        self.values = nn.Parameter(torch.zeros(k, **factory))              # (k,)

    def _bias_index(self, index, d_out, d_in):
        return torch.unique(torch.div(index, d_in, rounding_mode="floor"))

    def kept_input_width(self) -> int:
        return kept_input_width(self.unit, self.indices, self.in_features, self.lean_input)

    def _kept_columns(self):
        if not self.lean_input:
            return None
        cache = self.__dict__.get("_columns_cache")
        if cache is None:
            cache = self._columns_cache = KeptColumns()
        return cache.get(self.indices, self.in_features)    # recomputed if the mask changes


SPARSE_LAYERS = {"row": RowSparseLinear, "column": ColumnSparseLinear, "element": ElementSparseLinear}


def sparse_layer(unit: str, base_layer: nn.Module, indices, **kwargs) -> SparseLinear:
    """Build the sparse layer of ``unit`` ("row", "column", "element") around ``base_layer``."""
    if unit not in SPARSE_LAYERS:
        raise ValueError(f"unit must be one of {tuple(SPARSE_LAYERS)}, got {unit!r}")
    return SPARSE_LAYERS[unit](base_layer, indices, **kwargs)


__all__ = ["SparseLinear", "RowSparseLinear", "ColumnSparseLinear", "ElementSparseLinear", "SPARSE_LAYERS",
           "sparse_layer", "input_kept_elsewhere", "kept_input_width", "sparse_forward", "fusable", "fold_update",
           "dense_update", "element_positions", "KeptColumns"]


def is_sparse_layer(module) -> bool:
    """True for a module that trains a sparse update of a frozen weight: rowsft's sparse layers, and any
    module that follows their contract (a ``unit`` and an ``indices`` tensor, e.g. the dense-scatter baseline)."""
    return isinstance(module, SparseLinear) or (hasattr(module, "unit") and torch.is_tensor(getattr(module, "indices", None)))
