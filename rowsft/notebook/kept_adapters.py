"""Kept adapters, without widgets: name a trained update, switch the model between kept ones, compare two.

:func:`keep_adapter` copies the model's current rowsft selection and its sparse layers' updates
(``.update``, ``.bias_delta``) into a :class:`KeptAdapter`; :func:`use_adapter` puts one back (re-applying
its selection with ``rowsft.apply`` when the model carries another one, then copying the updates in, so the
model computes exactly that fine-tune); :func:`use_none` unloads the sparse layers (the model without any
update); :func:`compare_adapters` evaluates two kept adapters with the same evaluation function
(``rowsft.evaluate``'s per-question results), pairs them with the exact McNemar test and puts the model back
as it was; :func:`comparison_text` words the result as notebook 01 does (accuracy with its 95 % interval,
the majority class, "shown" / "not shown" at 5 %).

An adapter holds the updates, not the frozen weights: it is valid while those weights are the ones it
was trained on. Each one records the version counters of the frozen parameters, and ``use_adapter``
refuses once they changed (e.g. a later run merged an update into them). The dashboard's widgets around
these functions are in :mod:`rowsft.notebook.adapters`; this module needs no ipywidgets.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from rowsft.cli.job import describe_accuracy
from rowsft.evaluation.stats import exact_mcnemar
from rowsft.explore.summary import verdict
from rowsft.layers import tuner
from rowsft.selection.choice import LayerChoice, Selection

UNKEPT = ("the model carries an update that is not kept as an adapter; keep it first (name it, Keep as adapter), "
          "or press None twice to drop it")


@dataclass
class KeptAdapter:
    """One trained update, copied out of a model: its selection, updates and bias updates by layer name."""
    name: str
    selection: Selection
    updates: dict[str, torch.Tensor]
    bias_updates: dict[str, torch.Tensor] = field(default_factory=dict)
    rebuild_inputs: bool = True
    frozen_versions: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def trainable_parameters(self) -> int:
        return sum(u.numel() for u in self.updates.values()) + sum(b.numel() for b in self.bias_updates.values())

    def describe(self) -> str:
        units = {c.unit for c in self.selection.layers.values()}
        return (f"{self.name!r}: {'/'.join(sorted(units))} updates in {len(self.updates)} layers, "
                f"{self.trainable_parameters:,} parameters")


# ---------------------------------------------------------------- reading the model
def _update_ids(model: nn.Module) -> set[int]:
    ids = set()
    for layer in tuner.sparse_layers(model).values():
        ids.add(id(layer.update))
        if layer.bias_delta is not None:
            ids.add(id(layer.bias_delta))
    return ids


def frozen_versions(model: nn.Module) -> dict[int, int]:
    """``{id(parameter): its in-place version counter}`` of every parameter but the sparse updates."""
    skip = _update_ids(model)
    return {id(p): p._version for p in model.parameters() if id(p) not in skip}


def _same_selection(model: nn.Module, selection: Selection) -> bool:
    current = tuner.current_selection(model)
    return set(current.layers) == set(selection.layers) and all(
        current.layers[n].unit == c.unit and current.layers[n].indices.equal(c.indices)
        for n, c in selection.layers.items())


def has_update(model: nn.Module) -> bool:
    """True when the model carries sparse layers with a non-zero update."""
    return any(bool(layer.update.detach().ne(0).any())
               or (layer.bias_delta is not None and bool(layer.bias_delta.detach().ne(0).any()))
               for layer in tuner.sparse_layers(model).values())


def carries(model: nn.Module, adapter: KeptAdapter) -> bool:
    """True when the model computes exactly ``adapter`` (same selection, equal updates, same frozen weights)."""
    layers = tuner.sparse_layers(model)
    if not layers or not _same_selection(model, adapter.selection) or frozen_versions(model) != adapter.frozen_versions:
        return False
    for name, layer in layers.items():
        bias = adapter.bias_updates.get(name)
        if not layer.update.detach().equal(adapter.updates[name]) or (layer.bias_delta is None) != (bias is None):
            return False
        if bias is not None and not layer.bias_delta.detach().equal(bias):
            return False
    return True


def unkept(model: nn.Module, adapters: Iterable[KeptAdapter]) -> bool:
    """True when the model's update is non-zero and none of ``adapters`` holds it (switching would lose it)."""
    return has_update(model) and not any(carries(model, a) for a in adapters)


# ---------------------------------------------------------------- keep, use, none
def _snapshot(model: nn.Module, name: str) -> KeptAdapter:
    """The model's selection, updates and frozen-weight versions, copied (no checks)."""
    layers = tuner.sparse_layers(model)
    selection = tuner.current_selection(model)
    selection = Selection({n: LayerChoice(c.unit, c.indices.clone(), c.shape) for n, c in selection.layers.items()},
                          dict(selection.meta))
    return KeptAdapter(name=name, selection=selection,
                       updates={n: layer.update.detach().clone() for n, layer in layers.items()},
                       bias_updates={n: layer.bias_delta.detach().clone() for n, layer in layers.items()
                                     if layer.bias_delta is not None},
                       rebuild_inputs=all(layer.rebuild_input for layer in layers.values()),
                       frozen_versions=frozen_versions(model))


def keep_adapter(model: nn.Module, name: str, kept: Mapping[str, KeptAdapter] | None = None) -> KeptAdapter:
    """A copy of the model's current update under ``name`` (the model is not changed).

    Refused (ValueError) with no name, a name already in ``kept``, no sparse layers, an all-zero update,
    merged layers, or trainable parameters outside the sparse updates (an adapter would not hold them)."""
    name = (name or "").strip()
    if not name:
        raise ValueError("give the adapter a name")
    if kept is not None and name in kept:
        raise ValueError(f"an adapter named {name!r} is already kept; choose another name")
    layers = tuner.sparse_layers(model)
    if not layers:
        raise ValueError("the model carries no rowsft update: launch a run first")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"{merged[0]} is merged into its weight; an adapter needs the update apart (rowsft.unmerge)")
    skip = _update_ids(model)
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    if others:
        raise ValueError(f"{others[0]} also trains, and an adapter holds only the sparse updates")
    if not has_update(model):
        raise ValueError("the update is all zero (the model is the pretrained one): train it first")
    return _snapshot(model, name)


def _check_frozen(model: nn.Module, adapter: KeptAdapter) -> None:
    layers = tuner.sparse_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's update is merged into its weights; unmerge it (rowsft.unmerge) first")
    was = adapter.frozen_versions
    now = frozen_versions(model)
    if set(now) != set(was) or any(now[k] != was[k] for k in was):
        raise ValueError(f"the model's frozen weights changed since {adapter.name!r} was kept (e.g. a run merged an "
                         f"update into them); its updates would now apply to other weights")


def use_adapter(model: nn.Module, adapter: KeptAdapter) -> nn.Module:
    """Make ``model`` compute ``adapter``'s fine-tune: its selection (re-applied when different), its updates."""
    _check_frozen(model, adapter)
    layers = tuner.sparse_layers(model)
    same = bool(layers) and _same_selection(model, adapter.selection) and \
        {n for n, layer in layers.items() if layer.bias_delta is not None} == set(adapter.bias_updates)
    if not same:
        if layers:
            tuner.unload(model)
        dtypes = {u.dtype for u in adapter.updates.values()}
        tuner.apply(model, adapter.selection, train_bias=bool(adapter.bias_updates),
                    delta_dtype=dtypes.pop() if len(dtypes) == 1 else None, rebuild_inputs=adapter.rebuild_inputs)
        layers = tuner.sparse_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            kept = adapter.updates[name]
            if layer.update.dtype != kept.dtype or layer.update.shape != kept.shape:
                raise ValueError(f"{name}: the model's update is {layer.update.dtype} {tuple(layer.update.shape)}, "
                                 f"the adapter's {kept.dtype} {tuple(kept.shape)}")
            layer.update.copy_(kept)
            if name in adapter.bias_updates:
                layer.bias_delta.copy_(adapter.bias_updates[name])
    return model


def use_none(model: nn.Module) -> nn.Module:
    """The model without any update: its sparse layers unloaded (the frozen weights as they are)."""
    layers = tuner.sparse_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model's update is merged into its weights; unloading would keep it there")
    if layers:
        tuner.unload(model)
    return model


# ---------------------------------------------------------------- compare
def _restore(model: nn.Module, previous: KeptAdapter | None) -> None:
    if previous is None:
        use_none(model)
    else:
        use_adapter(model, previous)


def compare_adapters(model: nn.Module, a: KeptAdapter, b: KeptAdapter, evaluate_fn: Callable) -> dict:
    """Evaluate ``a`` then ``b`` with ``evaluate_fn(model)`` (``rowsft.evaluate``-style results with
    ``per_question``) and pair them; the model is put back as it was (its update copied first).

    Returns ``{"a", "b", "result_a", "result_b", "mcnemar", "difference", "majority"}`` (difference: b − a)."""
    if a.name == b.name:
        raise ValueError(f"pick two different adapters (both are {a.name!r})")
    for adapter in (a, b):
        _check_frozen(model, adapter)             # also refuses merged layers, before anything changes
    previous = _snapshot(model, "(before comparing)") if tuner.sparse_layers(model) else None
    try:
        results = []
        for adapter in (a, b):
            use_adapter(model, adapter)
            result = evaluate_fn(model)
            if not isinstance(result, Mapping) or "per_question" not in result:
                raise ValueError("the evaluation gives no per-question results; comparing needs rowsft.evaluate's "
                                 "(pass eval_fn returning rowsft.evaluate(...))")
            results.append(result)
    finally:
        _restore(model, previous)
    result_a, result_b = results
    return {"a": a.name, "b": b.name, "result_a": result_a, "result_b": result_b,
            "mcnemar": exact_mcnemar(result_a, result_b),
            "difference": float(result_b["accuracy"]) - float(result_a["accuracy"]),
            "majority": result_b.get("majority")}


def comparison_text(comparison: dict) -> str:
    """Both accuracies with their intervals, the majority class, and the paired test in plain words."""
    a, b, test = comparison["a"], comparison["b"], comparison["mcnemar"]
    width = max(len(a), len(b), len("majority class")) + 2
    lines = [f"{a:<{width}} {describe_accuracy(comparison['result_a'])}",
             f"{b:<{width}} {describe_accuracy(comparison['result_b'])}"]
    majority = comparison.get("majority")
    if majority:
        low, high = majority["interval"]
        lines.append(f"{'majority class':<{width}} {majority['accuracy']:.4f} (95% CI {low:.3f}–{high:.3f}, "
                     f"always answering {majority['label']})")
    row = {"over_seeds": None, "mcnemar_p": [test["p_value"]], "difference": comparison["difference"]}
    words = verdict(row)
    shown = not words.startswith("not shown")
    lines.append(f"{b} minus {a}: {100 * comparison['difference']:+.1f} points on the same "
                 f"{comparison['result_a']['n']} questions; {test['b_only']} only {b} gets right, "
                 f"{test['a_only']} only {a}; exact McNemar p = {test['p_value']:.2g}")
    lines.append(f"verdict: {b} against {a}: {words}" + (", shown at the 5% level" if shown else " at the 5% level"))
    return "\n".join(lines)
