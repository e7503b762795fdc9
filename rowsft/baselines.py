"""The methods rowsft is compared with, trainable by the same `rowsft.train`.

- `full_finetune(model)`: every parameter trains.
- `lora(model, rank=8, ...)`: LoRA through the real ``peft`` library (``LoraConfig`` + ``get_peft_model``)
  on the same target modules rowsft would tune (`rowsft.targets.find_targets`); GPT-2's ``Conv1D``
  layers get ``fan_in_fan_out=True``. On a model loaded with ``rowsft.load_model(..., quantization="nf4")``
  this is QLoRA: peft puts its own bitsandbytes LoRA layers (float32 adapters) over the 4-bit base.
  `qlora` names that. ``peft.prepare_model_for_kbit_training`` is not called: it would turn on gradient
  checkpointing (and cast the norms), which no other method here gets, so the comparison would no
  longer be of the methods alone.
- `lora_parity_rank(model, rows_or_selection)`: the LoRA rank whose trainable-parameter count is
  closest to a row selection's (the inverse of ``rowsft.selection.lora_parity``).
- `dense_scatter_reference(model, selection)`: SPEFT's way of training sparse weights: every forward
  scatters the trained values into a dense copy of the weight and multiplies by that copy, which
  autograd then keeps for backward. For benchmarks (it is slower and costs a dense weight per layer).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from rowsft.selection.choice import Selection
from rowsft.targets import find_targets, is_quantized, is_transposed, linear_shape, quantization_kind, weight_out_in


def full_finetune(model: nn.Module) -> nn.Module:
    """Make every parameter of ``model`` trainable (in place); returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if "ForCausalLM" in name or "LMHeadModel" in name:
        return "CAUSAL_LM"
    if "ForSequenceClassification" in name:
        return "SEQ_CLS"
    return None


def lora(model: nn.Module, rank: int = 8, targets="all-linear", alpha: float | None = None, dropout: float = 0.0,
         use_dora: bool = False, layers=None, task_type: str | None = "auto", **lora_kwargs):
    """Wrap ``model`` with peft LoRA adapters of ``rank`` on ``targets`` (as `rowsft.targets.find_targets`
    reads them: "all-linear", "attention", "mlp", module types, a regex); returns the ``PeftModel``.

    ``alpha`` defaults to ``2 * rank`` (scaling 2). ``task_type="auto"`` picks ``CAUSAL_LM`` or
    ``SEQ_CLS`` from the model class (with ``SEQ_CLS`` peft also trains the classification head).
    Extra keyword arguments go to ``peft.LoraConfig``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is an optional dependency
        raise ImportError("rowsft.baselines.lora needs peft: pip install 'rowsft[peft]'") from e
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    modules = find_targets(model, targets, layers=layers)
    transposed = {is_transposed(m) for m in modules.values()}
    if len(transposed) > 1:
        raise ValueError("the targets mix nn.Linear and transformers Conv1D layers, which one peft LoraConfig cannot "
                         "handle (fan_in_fan_out is global); pass targets of one kind")
    if task_type == "auto":
        task_type = _task_type(model)
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=list(modules), fan_in_fan_out=transposed == {True}, use_dora=use_dora,
                        task_type=task_type, **lora_kwargs)
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def qlora(model: nn.Module, rank: int = 8, targets="all-linear", **kwargs):
    """QLoRA: `lora` on a model whose target layers are 4-bit (``rowsft.load_model(name, quantization="nf4")``);
    a ValueError when none of them is."""
    kinds = {quantization_kind(m) for m in find_targets(model, targets, layers=kwargs.get("layers")).values()}
    if not kinds & {"nf4", "fp4"}:
        raise ValueError("qlora needs a 4-bit base: load it with rowsft.load_model(name, quantization='nf4'); "
                         "on a float model use rowsft.baselines.lora")
    return lora(model, rank=rank, targets=targets, **kwargs)


def lora_trainable_parameters(model: nn.Module, rank: int, targets="all-linear", layers=None) -> int:
    """Trainable parameters of LoRA of ``rank`` on ``targets``: ``rank * (d_in + d_out)`` per layer."""
    return rank * sum(sum(linear_shape(m)) for m in find_targets(model, targets, layers=layers).values())


def lora_parity_rank(model: nn.Module, rows_or_selection, targets="all-linear", layers=None) -> int:
    """The LoRA rank (>= 1) whose trainable-parameter count is closest to that of a row selection.

    ``rows_or_selection``: a `Selection` (LoRA is then priced on the selection's own modules, and the
    selection's exact trainable count is matched), or an int number of rows per layer of ``targets``
    (each layer ``min(rows, d_out) * d_in``). Ties go to the smaller rank.
    """
    if isinstance(rows_or_selection, Selection):
        if not rows_or_selection.layers:
            raise ValueError("the selection names no layer; LoRA parity needs at least one selected layer")
        shapes = [c.shape for c in rows_or_selection.layers.values()]
        wanted = rows_or_selection.trainable_parameters
    elif isinstance(rows_or_selection, int) and not isinstance(rows_or_selection, bool):
        if rows_or_selection < 1:
            raise ValueError(f"rows per layer must be >= 1, got {rows_or_selection}")
        shapes = [linear_shape(m) for m in find_targets(model, targets, layers=layers).values()]
        wanted = sum(min(rows_or_selection, d_out) * d_in for d_out, d_in in shapes)
    else:
        raise TypeError(f"pass rows per layer (int) or a rowsft Selection, got {type(rows_or_selection).__name__}")
    per_rank = sum(d_out + d_in for d_out, d_in in shapes)
    low = max(1, math.floor(wanted / per_rank))
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - wanted), r))


# ---------------------------------------------------------------- SPEFT-style dense scatter
class DenseScatterLinear(nn.Module):
    """Reference sparse layer that materialises ``W + scatter(values)`` as a dense copy every forward.

    ``values``: row ``(k, d_in)``, column ``(d_out, k)`` or element ``(k,)``, zero at start; ``indices``
    as in `rowsft.selection.choice.LayerChoice`. The base layer stays frozen as ``.base_layer``.
    """

    def __init__(self, base_layer: nn.Module, unit: str, indices):
        super().__init__()
        d_out, d_in = linear_shape(base_layer)
        if is_quantized(base_layer):
            raise TypeError("the dense-scatter reference writes the update into a dense copy of the stored weight, "
                            "which a quantized layer does not have; use rowsft.apply on a quantized base")
        if unit not in ("row", "column", "element"):
            raise ValueError(f"unit must be 'row', 'column' or 'element', got {unit!r}")
        weight = base_layer.weight
        self.base_layer, self.unit = base_layer, unit
        for p in base_layer.parameters():
            p.requires_grad_(False)
        index = torch.as_tensor(indices, dtype=torch.long, device=weight.device).reshape(-1)
        self.register_buffer("indices", index)
        k = index.numel()
        shape = {"row": (k, d_in), "column": (d_out, k), "element": (k,)}[unit]
        self.values = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def dense_weight(self) -> torch.Tensor:
        """``W + update`` as a new dense ``(d_out, d_in)`` tensor, laid out in memory as the base layer
        stores its weight (HF ``Conv1D`` keeps ``(d_in, d_out)``), so that its own kernels run on it."""
        if not is_transposed(self.base_layer):
            w = self.base_layer.weight                                           # (d_out, d_in)
            if self.unit == "element":
                return w.reshape(-1).scatter_add(0, self.indices, self.values).view(w.shape)
            return w.index_add(0 if self.unit == "row" else 1, self.indices, self.values)
        stored = self.base_layer.weight                                          # (d_in, d_out)
        d_in, d_out = stored.shape
        if self.unit == "element":                                               # out-in flat index -> stored one
            flat = (self.indices % d_in) * d_out + self.indices // d_in
            return stored.reshape(-1).scatter_add(0, flat, self.values).view(d_in, d_out).t()
        return stored.index_add(1 if self.unit == "row" else 0, self.indices, self.values.t()).t()

    def delta_weight(self) -> torch.Tensor:
        return (self.dense_weight() - weight_out_in(self.base_layer)).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:                        # (..., d_in) -> (..., d_out)
        weight = self.dense_weight()                                             # (d_out, d_in)
        if is_transposed(self.base_layer):
            weight = weight.t()                                                  # the layer's own (d_in, d_out)
        # the base layer's own forward with the dense weight swapped in: the same kernels, so the same bits at 0
        return torch.func.functional_call(self.base_layer, {"weight": weight}, (x,))


def dense_scatter_reference(model: nn.Module, selection: Selection) -> nn.Module:
    """Replace each selected module of ``model`` by a `DenseScatterLinear` (in place), freeze everything
    else, and return ``model``. For benchmarks against rowsft's sparse layers."""
    selection.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, choice in selection.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"the model has no module {name!r}; was the selection made for another model?") from None
        if tuple(linear_shape(module)) != tuple(choice.shape):
            raise ValueError(f"{name}: the selection was made for shape {choice.shape} but the layer is "
                             f"{linear_shape(module)} (d_out, d_in)")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DenseScatterLinear(module, choice.unit, choice.indices))
    return model


__all__ = ["full_finetune", "lora", "qlora", "lora_trainable_parameters", "lora_parity_rank", "DenseScatterLinear",
           "dense_scatter_reference"]
