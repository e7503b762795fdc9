"""Putting a Selection into a model and taking it out again: apply / merge / unmerge / unload.

``apply(model, selection)`` freezes every parameter and swaps each selected linear module for the
matching sparse layer of :mod:`rowsft.layers` (in place, same module name), so only the zero-initialised
updates train. ``merge`` folds them into the weights, ``unload`` puts the original modules back.
Saving and loading adapters lives in :mod:`rowsft.layers.adapters`.

On a bitsandbytes-quantized base (`rowsft.layers.quantized`) the update stays an adapter by default:
``merge`` refuses, before touching any layer, unless ``requantize=True`` (then it reports the rounding
error in a warning, and each layer keeps its `MergeError`, see `merge_errors`); ``dequantize_and_merge``
turns the model into a plain float one with every update merged exactly.
"""
from __future__ import annotations

import difflib
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from rowsft.data.quantization import forget_quantization
from rowsft.distributed import check_can_apply, check_not_sharded
from rowsft.layers.cast_weights import forget as forget_cast
from rowsft.layers.grouped import assign_groups
from rowsft.layers.quantized import MERGE_REFUSAL, MergeError, float_linear
from rowsft.layers.rebuild import track_norm_outputs
from rowsft.layers.sparse import SPARSE_LAYERS, SparseLinear
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import is_linear_like, is_quantized, linear_modules, linear_shape

# Classification heads that ``train_heads=True`` keeps trainable (PEFT's modules_to_save for SEQ_CLS).
NO_TRAINABLE = "no trainable parameters: call rowsft.apply(model, selection) first"
HEAD_NAMES = ("classifier", "score", "qa_outputs")

_STATE = "_rowsft_state"   # attribute on the model: what apply changed, so unload can restore it
_NORM_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> hook handles (apply/unload)


# ---------------------------------------------------------------- looking things up
def sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    """Every rowsft sparse layer of ``model``, by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def current_selection(model: nn.Module) -> Selection:
    """The Selection the model currently carries (indices, units, shapes; meta from ``apply``)."""
    layers = {name: LayerChoice(layer.unit, layer.indices.long().cpu(), (layer.out_features, layer.in_features))
              for name, layer in sparse_layers(model).items()}
    state = getattr(model, _STATE, None) or {}
    return Selection(layers, dict(state.get("meta", {})))


def _lookup(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = list(linear_modules(model))
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; similar names: {close}" if close else f"; linear modules here include {names[:5]}"
        raise KeyError(f"the model ({type(model).__name__}) has no module {name!r}{hint}") from None


def as_selection(model: nn.Module, selection) -> Selection:
    """A Selection as is; a plain mapping ``{module name: row indices}`` becomes a row Selection."""
    if isinstance(selection, Selection):
        return selection
    if isinstance(selection, Mapping):
        layers = {}
        for name, indices in selection.items():
            module = _lookup(model, name)
            if not is_linear_like(module):
                raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer (nn.Linear or transformers Conv1D)")
            layers[name] = LayerChoice("row", indices, linear_shape(module))
        return Selection(layers)
    raise TypeError(f"apply needs a rowsft Selection (from rowsft.select) or a {{module name: row indices}} dict, "
                    f"got {type(selection).__name__}")


def _check_against_model(model: nn.Module, selection: Selection) -> dict[str, nn.Module]:
    """Every selected module, after checking it exists, is linear and has the selection's shape."""
    selection.validate()
    modules = {}
    for name, choice in selection.layers.items():
        module = _lookup(model, name)
        if isinstance(module, SparseLinear):
            raise RuntimeError(f"{name} is already a sparse layer; call rowsft.unload(model) first")
        if not is_linear_like(module):
            raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer (nn.Linear or transformers "
                            f"Conv1D); select only linear modules")
        shape = linear_shape(module)
        if tuple(shape) != tuple(choice.shape):
            raise ValueError(f"{name}: the selection was made for a layer of shape {tuple(choice.shape)} (d_out, d_in), "
                             f"but this model's layer is {tuple(shape)}; recompute the selection on this model")
        modules[name] = module
    return modules


def _head_modules(model: nn.Module, train_heads) -> dict[str, nn.Module]:
    if not train_heads:
        return {}
    wanted = HEAD_NAMES if train_heads is True else tuple([train_heads] if isinstance(train_heads, str) else train_heads)
    found = {name: m for name, m in model.named_modules()
             if name and (name.split(".")[-1] in wanted or name in wanted)}
    found = {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found if o != n)}
    if not found:
        raise ValueError(f"train_heads={train_heads!r} found no head module among {list(wanted)} in "
                         f"{type(model).__name__}; pass the head's module name, e.g. train_heads=['classifier']")
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---------------------------------------------------------------- the verbs
def apply(model: nn.Module, selection: Selection | Mapping, train_heads=False, delta_dtype: torch.dtype | None = None,
          train_bias: bool = False, rebuild_inputs: bool = True, group_updates: bool = True,
          train_in_weight: bool = False, keep_cast_weights: bool = True,
          train_in_cast: bool = True, lend_rows: bool = True) -> nn.Module:
    """Make ``model`` train only the selected rows / columns / elements, in place; returns ``model``.

    ``selection``: a :class:`Selection`, or a plain ``{module name: row indices}`` dict (rows).

    Every parameter is frozen; each selected module becomes a sparse layer with a zero update, so
    the model's outputs are unchanged until training. ``train_heads``: ``True`` keeps the
    classification heads (``classifier``, ``score``, ``qa_outputs``) trainable, as in the paper's
    classification runs; or a list of head module names. ``delta_dtype``: dtype of the updates
    (default: each layer's weight dtype, a quantized layer's float compute dtype; e.g. ``torch.float32``
    over a bf16 model).
    ``train_bias``: also train the bias entries of the selected neurons, where the layer has a bias.
    ``rebuild_inputs``: row and element layers keep no copy of an input that the frozen model can rebuild
    in backward (a norm's output, an MLP product: `rowsft.layers.rebuild`); ``False`` keeps the inputs themselves.
    ``group_updates``: row layers that read one input (q/k/v, gate/up) compute their updates as one product per
    group (`rowsft.layers.grouped`; the same result up to float rounding); ``False``: one product per layer.
    ``train_in_weight``: row layers write their rows' current values into the base weight before each forward, so
    the frozen matmul computes the update too and only delta's gradient is left (one thin product a step instead of
    three: `rowsft.layers.in_weight`); costs a copy of the pretrained rows, as large as the deltas. Column and
    element layers train the usual way. Refused for rows over a quantized base or a weight tied to another
    parameter; ``state_dict``, ``unload`` and ``unmerge`` still give the pretrained weight.
    ``keep_cast_weights``: under autocast over weights in another dtype (bf16 over float32), row and column layers
    cast their base weight once and keep the copy across steps instead of casting it in every forward and again in
    every backward (`rowsft.layers.cast_weights`; same bits). Costs a compute-dtype copy of each trained layer's
    weight, the copies a frozen autocast forward keeps until its backward; ``False``: the leaner peak, two casts a step.
    ``train_in_cast``: under autocast with kept casts, row layers write their rows ``W0[idx] + delta`` into their own
    kept copy (the base weight untouched) and the frozen product computes the update, as rows trained in the weight
    do, with the same bits as those (`rowsft.layers.in_weight`): about a third of the usual row update's time above
    the frozen model's. Its arithmetic is mixed-precision full fine-tuning's (the rows rounded to bf16 as a whole),
    where the usual update adds ``x deltaᵀ`` in bf16 on its own; ``False`` keeps the usual update. No effect without
    autocast.
    ``lend_rows``: without autocast, over float32 or float64 weights, row layers lend their rows ``W0[idx] + delta``
    to the base weight for each frozen product, forward and backward, and put the pretrained rows back right after it
    (`rowsft.layers.lent_rows`): the frozen product computes the update and only delta's gradient is left, as with
    ``train_in_weight``, but nothing more is kept (the memory of the usual update) and the weight holds its pretrained
    values between products. The arithmetic is full fine-tuning's (``x (W0 + delta)ᵀ``), the same bits as
    ``train_in_weight``; ``False``: the usual update (``x W0ᵀ + x deltaᵀ``, equal up to float rounding).
    """
    check_can_apply(model)  # a DDP/FSDP-wrapped model: apply before wrapping (clear message)
    if getattr(model, _STATE, None) is not None or sparse_layers(model):
        raise RuntimeError("rowsft.apply was already called on this model; call rowsft.unload(model) "
                           "(or rowsft.merge_and_unload(model)) before applying another selection")
    selection = as_selection(model, selection)
    modules = _check_against_model(model, selection)
    heads = _head_modules(model, train_heads)
    if train_in_weight:
        _check_in_weight(model, selection, modules)
    overlap = [h for h in heads if any(n == h or n.startswith(h + ".") for n in modules)]
    if overlap:
        raise ValueError(f"{overlap} are both selected for sparse training and trained whole as heads; "
                         f"drop them from the selection or from train_heads")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in modules.items():
        choice = selection.layers[name]
        has_bias = getattr(module, "bias", None) is not None
        layer = SPARSE_LAYERS[choice.unit](module, choice.indices, delta_dtype=delta_dtype,
                                           train_bias=train_bias and has_bias, name=name)
        layer.rebuild_input = bool(rebuild_inputs)
        layer.keep_cast_weight = bool(keep_cast_weights)
        layer.train_in_cast = bool(train_in_cast)
        layer.lend_rows = bool(lend_rows)
        if train_in_weight and choice.unit == "row":
            layer.set_train_in_weight(True)
        _set_module(model, name, layer)
    for head in heads.values():
        for p in head.parameters():
            p.requires_grad_(True)
    setattr(model, _STATE, {"requires_grad": requires_grad, "heads": list(heads), "meta": dict(selection.meta)})
    if group_updates:
        assign_groups(sparse_layers(model))     # q/k/v and gate/up rows: one product per group (rowsft.layers.grouped)
    if rebuild_inputs:
        _NORM_HOOKS[model] = track_norm_outputs(model)   # norm outputs become rebuildable inputs (rowsft.layers.rebuild)
    return model


def _check_in_weight(model: nn.Module, selection: Selection, modules: dict[str, nn.Module]) -> None:
    """``train_in_weight``: a clear error, before anything changes, for selected rows whose base weight cannot take
    them (quantized, or tied to another parameter, which would change too)."""
    owners = _parameter_owners(model)
    for name, module in modules.items():
        if selection.layers[name].unit != "row":
            continue
        if is_quantized(module):
            raise ValueError(f"{name}: train_in_weight cannot write rows into a quantized weight; apply with "
                             f"train_in_weight=False (the usual row update)")
        others = [o for o in owners.get(id(module.weight), []) if not o.startswith(name + ".")]
        if others:
            raise ValueError(f"{name}'s weight is tied to {others}; training its rows in the weight would change "
                             f"those too. Apply with train_in_weight=False, or untie the weights first")


def _parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """Every name each parameter goes by in ``model`` (a tied weight has several), by the parameter's id."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return owners


def tied_elsewhere(model: nn.Module) -> dict[str, list[str]]:
    """Sparse layers whose base weight is shared with another parameter (e.g. an lm_head tied to
    the input embeddings), with the names of those other parameters."""
    owners = _parameter_owners(model)
    return {name: [o for o in owners[id(layer.base_layer.weight)] if not o.startswith(name + ".")]
            for name, layer in sparse_layers(model).items()
            if any(not o.startswith(name + ".") for o in owners.get(id(layer.base_layer.weight), []))}


def merge(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Fold every update into its base weight; the sparse layers then forward the base alone.
    Refuses layers whose weight is tied to another parameter (merging would change that one too), and
    layers over a quantized base unless ``requantize=True`` (see the module docstring): then a warning
    sums up the rounding error, and `merge_errors` gives it per layer."""
    check_not_sharded(model, "rowsft.merge")
    tied = tied_elsewhere(model)
    if tied:
        name, others = next(iter(tied.items()))
        raise RuntimeError(f"{name}'s weight is tied to {others}; merging would change those too. Keep the "
                           f"adapter unmerged, or untie the weights (e.g. config.tie_word_embeddings=False) first")
    layers = sparse_layers(model)
    quantized = {name: layer for name, layer in layers.items() if layer.quantization is not None and not layer.merged}
    if quantized and not requantize:
        name, layer = next(iter(quantized.items()))
        raise RuntimeError(MERGE_REFUSAL.format(name=name, kind=layer.quantization))
    for layer in layers.values():
        layer.merge(requantize=requantize)
    if quantized:
        errors = {name: layer.merge_error for name, layer in quantized.items()}
        worst = max(errors.values(), key=lambda e: e.relative_to_update)
        largest = max(e.max_abs for e in errors.values())
        kept = min(e.update_kept for e in errors.values())
        warnings.warn(f"rowsft.merge re-quantized {len(errors)} layers: largest element error {largest:.3g}, error up "
                      f"to {worst.relative_to_update:.2f}× the update's norm, update kept along its direction down to "
                      f"{kept:.2f}; per layer: rowsft.layers.tuner.merge_errors(model)", UserWarning, stacklevel=2)
    return model


def merge_errors(model: nn.Module) -> dict[str, MergeError]:
    """The `MergeError` of every sparse layer that a re-quantizing merge folded into its quantized base."""
    return {name: layer.merge_error for name, layer in sparse_layers(model).items() if layer.merge_error is not None}


def dequantize_and_merge(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain float model from a quantized one, in place: every bitsandbytes linear layer becomes an
    ``nn.Linear`` holding its dequantized weight (in ``dtype``, default each layer's float dtype), every
    sparse update is merged into it exactly, the sparse layers are unloaded, and transformers' record of
    the quantization is dropped (``save_pretrained`` then writes a float model). Returns ``model``."""
    check_not_sharded(model, "rowsft.layers.tuner.dequantize_and_merge")
    for name, layer in sparse_layers(model).items():
        if layer.merged and layer.quantization is not None:
            raise RuntimeError(f"{name} was merged into re-quantized weights; the exact update is gone. Load the "
                               f"quantized base and the saved adapter again, then call dequantize_and_merge")
    for layer in sparse_layers(model).values():
        if layer.quantization is not None:
            layer.base_layer = float_linear(layer.base_layer, dtype)
            layer.quantization = None
    for name, module in list(model.named_modules()):
        if is_quantized(module) and not isinstance(module, SparseLinear):
            _set_module(model, name, float_linear(module, dtype))
    merge_and_unload(model)
    forget_quantization(model)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take merged updates out of the base weights again."""
    check_not_sharded(model, "rowsft.unmerge")
    for layer in sparse_layers(model).values():
        layer.unmerge()
    return model


def unload(model: nn.Module) -> nn.Module:
    """Put the original modules back and drop the updates (merged updates stay in the weights);
    restores each parameter's original ``requires_grad``. Returns ``model``."""
    for name, layer in sparse_layers(model).items():
        if layer.in_weight and not layer.merged:
            layer.set_train_in_weight(False)          # the pretrained rows back into the weight
        forget_cast(layer.base_layer)                 # its bf16 copy, kept under autocast, is freed
        _set_module(model, name, layer.base_layer)
    for handle in _NORM_HOOKS.pop(model, []):
        handle.remove()
    state = getattr(model, _STATE, None)
    if state is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(state["requires_grad"].get(name, p.requires_grad))
        delattr(model, _STATE)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the updates into the weights and return the plain model (PEFT's ``merge_and_unload``)."""
    return unload(merge(model))


def trained_heads(model: nn.Module) -> list[str]:
    """Names of the head modules ``apply(train_heads=...)`` made trainable."""
    return list((getattr(model, _STATE, None) or {}).get("heads", []))


def parameters_to_train(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update (those that require grad); an error when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(NO_TRAINABLE)
    return params


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; shared (tied) parameters count once, updates count
    in the total as PEFT counts adapters. A 4-bit weight counts its logical weights, not its packed bytes
    (two per byte of storage), as peft counts them."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print the counts in PEFT's format."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * trainable / max(total, 1):.4f}")

__all__ = ["apply", "merge", "unmerge", "unload", "merge_and_unload", "merge_errors", "dequantize_and_merge",
           "sparse_layers", "current_selection",
           "trainable_parameters", "parameters_to_train", "print_trainable_parameters", "trained_heads", "HEAD_NAMES"]
