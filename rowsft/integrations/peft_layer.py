"""The peft tuner layer of rowsft: a frozen linear layer plus several named sparse updates.

:class:`RowSFTLayer` wraps an ``nn.Linear`` or a transformers ``Conv1D`` (``.base_layer``, frozen, never
copied) the way peft's layers do (``BaseTunerLayer``): each adapter ``name`` owns

- ``rowsft_delta[name]``: the trainable update, zero at creation (so step 0 is the base model):
  ``delta (k, d_in)`` on output rows, ``delta (d_out, k)`` on input columns, or ``values (k,)`` at flat
  positions ``r * d_in + c``;
- ``rowsft_indices[name]``: its sorted positions, a persistent buffer (saved with the adapter);
- ``rowsft_unit[name]``: ``"row"``, ``"column"`` or ``"element"``.

Forward runs the first active adapter through `rowsft.layers.forward_paths.sparse_forward`, the very call a
`rowsft.layers.SparseLinear` makes (the frozen matmul inside rowsft's autograd function, the update added
in place, only ``x`` / its ``k`` columns / a rebuild source kept for backward), so memory, speed and bits
equal `rowsft.apply`'s. Further active adapters are added into that output with
`rowsft.layers.autograd.add_sparse_update`. Under autocast, the first adapter's rows are written into the kept
cast of the base weight (`rowsft.layers.in_weight.in_cast_output`); without autocast, over a float32 weight, they are
lent to the base weight for each product (`rowsft.layers.lent_rows`): as `rowsft.apply`'s row layers do. ``merge`` /
``unmerge`` fold updates into the base weight with `rowsft.layers.sparse.fold_update` (the arithmetic `rowsft.merge`
uses).
"""
from __future__ import annotations

import warnings

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from rowsft.layers.autograd import add_sparse_update
from rowsft.layers.forward_paths import input_source, sparse_forward
from rowsft.layers.in_weight import in_cast_output, rows_go_in_cast
from rowsft.layers.sparse import (
    KeptColumns,
    SparseLinear,
    dense_update,
    fold_update,
    input_kept_elsewhere,
)
from rowsft.selection.choice import LayerChoice
from rowsft.targets import (
    is_linear_like,
    is_transposed,
    linear_shape,
    quantization_kind,
    weight_dtype,
    weight_out_in,
)

LAYER_UNITS = ("row", "column", "element")


def update_shape(unit: str, k: int, d_out: int, d_in: int) -> tuple[int, ...]:
    """Shape of the trainable update of ``k`` units: ``(k, d_in)``, ``(d_out, k)`` or ``(k,)``."""
    return {"row": (k, d_in), "column": (d_out, k), "element": (k,)}[unit]


class RowSFTLayer(nn.Module, BaseTunerLayer):
    """A frozen linear layer (``nn.Linear`` / ``Conv1D``) plus named sparse updates (see the module docstring)."""

    adapter_layer_names = ("rowsft_delta",)
    other_param_names = ("rowsft_indices", "rowsft_unit", "rowsft_rebuild", "rowsft_keep_cast", "rowsft_in_cast",
                         "rowsft_lend", "rowsft_lean", "rowsft_columns")

    def __init__(self, base_layer: nn.Module, adapter_name: str, unit: str, indices, name: str | None = None,
                 delta_dtype: torch.dtype | None = None, rebuild_input: bool = True, keep_cast: bool = True,
                 in_cast: bool = True, lend: bool = True):
        super().__init__()
        if isinstance(base_layer, SparseLinear):
            raise TypeError(f"{name or 'the target'} is a rowsft sparse layer made by rowsft.apply; call "
                            f"rowsft.unload(model) before get_peft_model")
        if not is_linear_like(base_layer) or isinstance(base_layer, BaseTunerLayer):
            raise TypeError(f"{name or 'the target'} is a {type(base_layer).__name__}; RowSFT wraps nn.Linear or "
                            f"transformers Conv1D layers only")
        self.base_layer = base_layer
        self.out_features, self.in_features = linear_shape(base_layer)
        self.base_quantization = quantization_kind(base_layer)  # "nf4" / "fp4" / "int8" for a bitsandbytes base
        self.module_name = name
        self.rowsft_delta = nn.ParameterDict()
        self.rowsft_indices = BufferDict(persistent=True)
        self.rowsft_unit: dict[str, str] = {}
        self.rowsft_rebuild: dict[str, bool] = {}
        self.rowsft_keep_cast: dict[str, bool] = {}
        self.rowsft_in_cast: dict[str, bool] = {}
        self.rowsft_lend: dict[str, bool] = {}
        self.rowsft_lean: dict[str, bool] = {}
        self.rowsft_columns: dict[str, KeptColumns] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, unit, indices, delta_dtype=delta_dtype, rebuild_input=rebuild_input,
                          keep_cast=keep_cast, in_cast=in_cast, lend=lend)

    # ---------------------------------------------------------------- adapters
    def update_layer(self, adapter_name: str, unit: str, indices, delta_dtype: torch.dtype | None = None,
                     rebuild_input: bool = True, inference_mode: bool = False, keep_cast: bool = True,
                     in_cast: bool = True, lend: bool = True) -> None:
        """Add the adapter ``adapter_name``: a zero update of ``unit`` at ``indices`` (validated first). ``keep_cast``,
        ``in_cast``, ``lend``: `rowsft.apply`'s ``keep_cast_weights``, ``train_in_cast`` and ``lend_rows``."""
        if unit not in LAYER_UNITS:
            raise ValueError(f"{self.module_name}: unit must be one of {LAYER_UNITS}, got {unit!r}")
        if adapter_name in self.rowsft_delta:
            raise ValueError(f"{self.module_name} already has an adapter named {adapter_name!r}")
        shape = (self.out_features, self.in_features)
        choice = LayerChoice(unit, indices, shape)
        choice.validate(self.module_name or type(self.base_layer).__name__)
        index = torch.sort(choice.indices).values                                   # (k,) int64
        if unit == "element" and shape[0] * shape[1] < 2**31:
            index = index.to(torch.int32)                                           # as ElementSparseLinear
        weight = self.get_base_layer().weight
        dtype = delta_dtype or weight_dtype(self.get_base_layer())       # a quantized base stores packed codes
        delta = torch.zeros(update_shape(unit, index.numel(), *shape), dtype=dtype, device=weight.device)
        self.rowsft_delta[adapter_name] = nn.Parameter(delta)
        self.rowsft_indices[adapter_name] = index.to(weight.device)
        self.rowsft_unit[adapter_name] = unit
        self.rowsft_rebuild[adapter_name] = bool(rebuild_input)
        self.rowsft_keep_cast[adapter_name] = bool(keep_cast)
        self.rowsft_in_cast[adapter_name] = bool(in_cast)
        self.rowsft_lend[adapter_name] = bool(lend)
        self.rowsft_lean[adapter_name] = unit == "element" and not input_kept_elsewhere(self.module_name)
        self.rowsft_columns[adapter_name] = KeptColumns()
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def k(self, adapter_name: str = "default") -> int:
        return int(self.rowsft_indices[adapter_name].numel())

    # ---------------------------------------------------------------- forward
    def _columns(self, adapter: str):
        """Element updates: the touched input columns kept for backward (None: the whole input)."""
        if not self.rowsft_lean[adapter]:
            return None
        return self.rowsft_columns[adapter].get(self.rowsft_indices[adapter], self.in_features)

    def _source(self, adapter: str, x: torch.Tensor):
        """A rebuild source of ``x`` (`rowsft.layers.rebuild`), as `rowsft.layers.SparseLinear` finds it."""
        return input_source(x, self.rowsft_unit[adapter], self.rowsft_delta[adapter], self.rowsft_rebuild[adapter],
                            self.base_quantization)

    def _in_cast(self, adapter: str, x: torch.Tensor) -> bool:
        """Whether ``adapter``'s rows go into the kept cast of the base weight for ``x`` (see `rowsft.apply`'s
        ``train_in_cast``)."""
        return rows_go_in_cast(self.rowsft_unit[adapter], self.rowsft_in_cast[adapter], self.rowsft_keep_cast[adapter],
                               self.base_layer, x)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.rowsft_delta]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        if args or kwargs:
            raise TypeError(f"{type(self.base_layer).__name__} takes one input; got extra arguments")
        first, *rest = active
        if self._in_cast(first, x):             # rows written into the kept cast (`rowsft.layers.in_weight`)
            out = in_cast_output(self.base_layer, x, self.rowsft_indices[first], self.rowsft_delta[first],
                                 self._source(first, x))                                               # (..., d_out)
        else:
            out = sparse_forward(self.base_layer, self.rowsft_unit[first], x, self.rowsft_delta[first],
                                 self.rowsft_indices[first], self._columns(first), self._source(first, x),
                                 self.rowsft_keep_cast[first], self.rowsft_lend[first])            # (..., d_out)
        for adapter in rest:                    # further active adapters: added into out in place
            out = add_sparse_update(self.rowsft_unit[adapter], out, x, self.rowsft_delta[adapter],
                                    self.rowsft_indices[adapter], self.in_features, self._columns(adapter),
                                    self._source(adapter, x))
        return out

    # ---------------------------------------------------------------- merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The update as a dense tensor in the base weight's stored layout (``(d_in, d_out)`` for Conv1D)."""
        dense = dense_update(self.rowsft_unit[adapter], self.rowsft_delta[adapter], self.rowsft_indices[adapter],
                             (self.out_features, self.in_features))              # (d_out, d_in)
        return dense.T if is_transposed(self.get_base_layer()) else dense

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active (or the named) adapters into the base weight (peft's semantics)."""
        self._refuse_quantized_merge("merge")
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = weight_out_in(self.get_base_layer())                                # (d_out, d_in) view
        for adapter in adapter_names:
            if adapter not in self.rowsft_delta:
                continue
            unit, delta, index = self.rowsft_unit[adapter], self.rowsft_delta[adapter], self.rowsft_indices[adapter]
            if safe_merge:
                trial = weight.detach().clone()
                fold_update(unit, trial, delta, index, +1)
                if not torch.isfinite(trial).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                with torch.no_grad():
                    weight.copy_(trial)
            else:
                fold_update(unit, weight, delta, index, +1)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Take the merged adapters out of the base weight again (exact up to rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._refuse_quantized_merge("unmerge")
        weight = weight_out_in(self.get_base_layer())
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.rowsft_delta:
                fold_update(self.rowsft_unit[adapter], weight, self.rowsft_delta[adapter],
                            self.rowsft_indices[adapter], -1)

    def _refuse_quantized_merge(self, action: str) -> None:
        """A quantized base weight is packed codes: folding into a dequantized copy would change nothing."""
        if self.base_quantization is not None:
            raise RuntimeError(f"{self.module_name}: cannot {action} a RowSFT adapter into a quantized "
                               f"({self.base_quantization}) base weight; keep it as an adapter "
                               f"(save_pretrained), or load the base model in float and merge there")

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{a}: {self.rowsft_unit[a]} k={self.k(a)}" for a in self.rowsft_unit)
        return f"shape=({self.out_features}, {self.in_features}), adapters=[{adapters}], merged={self.merged}"

    def __repr__(self) -> str:
        return "rowsft." + super().__repr__()


__all__ = ["RowSFTLayer", "LAYER_UNITS", "update_shape"]
