"""Dynamic masks (SPEFT, Liu et al.): re-choose the trained weights every N steps of a run.

    calibration = list(itertools.islice(batches, 4))
    dynamic = DynamicMask(calibration, metric="gradient", budget=rowsft.lora_parity(8), every=50)
    history = rowsft.train(model, batches, steps=200, callbacks=[dynamic])
    dynamic.reselections            # one record per reselection (also history.meta["reselections"])

A *reselection* runs after optimizer step ``s`` when ``s % every == 0`` (never after the run's last
step, where it could no longer matter):

1. fold: every sparse layer's update is merged into its base weight, so the learned change is kept
   and the model computes the same function;
2. re-score the sparse layers at the folded weights (``metric``, in the layers' own unit, on
   ``num_batches`` calibration batches) and re-select with the same ``budget`` and ``strategy``
   (``budget=None``: the current size, i.e. ``TotalParams(current trainable entries)`` for
   ``strategy="global"`` and each layer's current count for ``"per-layer"``);
3. rebuild every layer on its new indices with a zero update (the function is still unchanged) and
   remap the optimizer state in place.

Optimizer state (what the tests check against a hand-written dense AdamW):

- an entry kept across a reselection keeps its per-entry state (AdamW ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq``; SGD ``momentum_buffer``), moved to its new position;
- a new entry starts with zeros; a dropped entry loses its state (if it is chosen again later, it
  starts from zero again);
- per-tensor scalars (AdamW's ``step``) are kept: a new entry shares its layer's step count, so its
  first updates get the bias correction of a late step (small first steps, a natural warm-up).

The parameters keep their identity (their data is resized in place): ``state.optimizer.param_groups``
hold the same objects, so the training loop's clipping, a learning-rate scheduler holding the
optimizer and ``optimizer.state_dict()`` keep working. Decoupled weight decay acts on the update,
so after a reselection it pulls toward the folded weights (its anchor moves to the weights at the
last reselection). In a bf16/fp16 model each fold rounds the update into the base dtype.

Reporting: one record per reselection ``{step, unit, metric, total, kept, changed, dropped, jaccard,
per_layer, trainable_parameters, seconds}``: ``total`` entries (weights, rows or columns) in the new
mask, ``kept`` of them were in the old one, ``changed = total - kept`` are new, ``dropped`` old
entries left, ``jaccard = kept / |old ∪ new|``, ``per_layer = {layer: jaccard}``. It is appended to
``.reselections`` and to ``state.history.meta["reselections"]`` (saved with the History), and handed
to ``on_reselect``: a function ``fn(record)``, an object with ``on_reselect(state, record)`` (e.g. a
dashboard callback), or a list of these. `rowsft.train` does not broadcast custom events to the
other callbacks, so a notebook passes its dashboard here or reads ``.reselections``.
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Iterable

import torch
from torch import nn

from rowsft.checks import check_count
from rowsft.layers.in_weight import read_pretrained_rows, take_rows_out
from rowsft.layers.sparse import SparseLinear
from rowsft.layers.tuner import merge, sparse_layers, tied_elsewhere, unmerge
from rowsft.scoring.agreement import topk_indices
from rowsft.scoring.scorer import ALIASES, LOSS_METRICS, METRICS, allowed_metrics, check_labelled, score
from rowsft.selection.budgets import TotalParams, parse_budget
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.selection.strategies import STRATEGIES, select
from rowsft.training.callbacks import Callback

__all__ = ["DynamicMask", "reselect_mask", "rebuild_layer", "remap_state", "resize_parameter"]

# the axis of a layer's update that its indices run along
UPDATE_AXIS = {"row": 0, "column": 1, "element": 0}


class DynamicMask(Callback):
    """Training callback: every ``every`` steps, fold the updates, re-score, re-select and rebuild the
    sparse layers and their optimizer state (see the module docstring for the exact semantics).

    ``calibration_batches``: batch dicts scored at each reselection (a list, or a re-iterable such
    as ``rowsft.batches``; a one-shot iterator is read once, its first ``num_batches`` kept). Empty
    batches, and for a loss metric a list batch without a labelled token, are refused here, not at
    the first reselection; a reselection checks its batches again before it folds anything.
    ``metric``: any metric ``rowsft.score`` accepts for the layers' unit (SPEFT: ``gradient``).
    ``budget``/``strategy``: as ``rowsft.select`` (``budget=None``: keep the current size).
    ``score_options``/``select_options``: further keywords for ``rowsft.score`` (e.g. ``dtype``,
    ``seed``) and ``rowsft.select`` (e.g. ``min_per_layer``). ``on_reselect``: see the module docstring.
    """

    def __init__(self, calibration_batches: Iterable[dict] | None, metric: str = "gradient", budget=None,
                 strategy: str = "global", every: int = 100, num_batches: int | None = 8, on_reselect=None,
                 score_options: dict | None = None, select_options: dict | None = None):
        check_count("every", every, 1, "(steps between re-selections)")
        if num_batches is not None:
            check_count("num_batches", num_batches, 1, "(or None for all)")
        canonical = ALIASES.get(metric, (metric,))[0]
        if canonical not in METRICS:
            raise ValueError(f"metric {metric!r} is not known; choose one of {sorted(METRICS)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not known; choose one of {STRATEGIES}")
        if budget is not None:
            budget = parse_budget(budget)
        if METRICS[canonical] and calibration_batches is None:
            raise ValueError(f"metric {metric!r} needs calibration batches: pass a list of batch dicts "
                             "(e.g. list(itertools.islice(rowsft.batches(...), 4)))")
        if calibration_batches is not None and iter(calibration_batches) is calibration_batches:
            calibration_batches = list(itertools.islice(calibration_batches, num_batches))  # one-shot: keep them
        if calibration_batches is not None:
            _check_calibration(calibration_batches, canonical, num_batches)
        self.calibration_batches = calibration_batches
        self.metric, self.budget, self.strategy, self.every, self.num_batches = metric, budget, strategy, every, num_batches
        self.score_options, self.select_options = dict(score_options or {}), dict(select_options or {})
        self.listeners = _listeners(on_reselect)
        self.reselections: list[dict] = []

    def on_train_begin(self, state) -> None:
        _check_model(state.model)
        unit = _common_unit(state.model)
        if ALIASES.get(self.metric, (self.metric,))[0] not in allowed_metrics(unit):
            raise ValueError(f"metric {self.metric!r} cannot score {unit}s; choose one of {allowed_metrics(unit)}")
        if getattr(state, "optimizer", None) is None:
            raise ValueError("DynamicMask needs the optimizer (state.optimizer) to move its state at each "
                             "reselection; rowsft.train provides it")

    def on_step_end(self, state) -> None:
        if state.step <= 0 or state.step % self.every:
            return
        max_steps = getattr(state, "max_steps", None)
        if max_steps is not None and state.step >= max_steps:
            return  # after the last step a new mask could no longer train
        self.reselect(state)

    def reselect(self, state) -> dict:
        """Reselect now (``state`` needs ``model``, ``optimizer``, ``step``; ``history`` optional)."""
        record = reselect_mask(state.model, getattr(state, "optimizer", None), self.calibration_batches,
                               metric=self.metric, budget=self.budget, strategy=self.strategy,
                               num_batches=self.num_batches, step=getattr(state, "step", None),
                               score_options=self.score_options, select_options=self.select_options)
        self.reselections.append(record)
        history = getattr(state, "history", None)
        if history is not None and isinstance(getattr(history, "meta", None), dict):
            history.meta.setdefault("reselections", []).append(record)
        for listener in self.listeners:
            if callable(getattr(listener, "on_reselect", None)):
                listener.on_reselect(state, record)
            else:
                listener(record)
        return record

    def __repr__(self) -> str:
        return (f"DynamicMask(metric={self.metric!r}, budget={self.budget!r}, strategy={self.strategy!r}, "
                f"every={self.every}, reselections={len(self.reselections)})")


def reselect_mask(model: nn.Module, optimizer: torch.optim.Optimizer | None, calibration_batches, metric: str = "gradient",
                  budget=None, strategy: str = "global", num_batches: int | None = 8, step: int | None = None,
                  score_options: dict | None = None, select_options: dict | None = None) -> dict:
    """One reselection of every sparse layer of ``model`` (fold, score, select, rebuild, remap the
    state of ``optimizer`` in place); returns its record (see the module docstring)."""
    start = time.perf_counter()
    layers = _check_model(model)
    unit = _common_unit(model)
    canonical = ALIASES.get(metric, (metric,))[0]
    if calibration_batches is not None and canonical in LOSS_METRICS:   # before the fold: refuse, change nothing
        calibration_batches = list(itertools.islice(iter(calibration_batches), num_batches))
        check_labelled(calibration_batches, metric)
    old = {name: layer.indices.long().cpu() for name, layer in layers.items()}  # (k,) sorted
    merge(model)  # fold: the learned change goes into the base weights, the function is unchanged
    try:
        scores = score(model, calibration_batches, metric=metric, unit=unit, targets=list(layers),
                       num_batches=num_batches, **(score_options or {}))
        selection = _select(scores, layers, budget, strategy, select_options or {})
    except BaseException:
        unmerge(model)  # leave the model as it was: the updates trainable, not folded
        raise
    per_layer, kept_total = {}, 0
    for name, layer in layers.items():
        new = selection.layers[name].indices          # (k_new,) sorted
        kept = rebuild_layer(layer, new, optimizer, name)
        kept_total += kept
        per_layer[name] = kept / max(1, old[name].numel() + new.numel() - kept)
    old_total = sum(i.numel() for i in old.values())
    total = sum(c.k for c in selection.layers.values())
    return {"step": step, "unit": unit, "metric": metric, "total": total, "kept": kept_total,
            "changed": total - kept_total, "dropped": old_total - kept_total,
            "jaccard": kept_total / max(1, old_total + total - kept_total), "per_layer": per_layer,
            "trainable_parameters": selection.trainable_parameters, "seconds": time.perf_counter() - start}


def rebuild_layer(layer: SparseLinear, new_indices: torch.Tensor, optimizer=None, name: str | None = None) -> int:
    """Put ``layer`` on ``new_indices`` with a zero update, keeping its parameter objects; remap their
    optimizer state (kept entries keep theirs, new ones start at zero). The layer's current update
    must already be folded into the base weight (``layer.merge()``). Returns how many entries were kept."""
    updates = [t for t in (layer.update, layer.bias_delta) if t is not None]
    if not layer.merged and any(bool(t.detach().ne(0).any()) for t in updates):
        raise RuntimeError("fold the layer (layer.merge()) before rebuilding it; its update would be lost")
    fresh = type(layer)(layer.base_layer, new_indices, delta_dtype=layer.delta_dtype,
                        train_bias=layer.bias_delta is not None, name=name)  # validates the indices
    moves = [(layer.update, layer.indices.long(), fresh.indices.long(), UPDATE_AXIS[layer.unit], fresh.update)]
    if layer.bias_delta is not None:
        moves.append((layer.bias_delta, layer.bias_indices.long(), fresh.bias_indices.long(), 0, fresh.bias_delta))
    kept = int(_matches(moves[0][1], moves[0][2])[0].numel())
    if layer.in_weight and not layer.merged:
        take_rows_out(layer)                                   # the pretrained rows back before the indices move
    with torch.no_grad():
        for param, old, new, axis, template in moves:
            remap_state(optimizer, param, old, new, axis, tuple(template.shape))
            resize_parameter(param, template.data)  # same Parameter object, new size, zeros
        layer.indices = fresh.indices
        if layer.bias_delta is not None:
            layer.bias_indices = fresh.bias_indices
    if layer.in_weight:
        layer.pretrained_rows = read_pretrained_rows(layer)    # the weight with the folded update is the new start
    layer.merged = False
    return kept


def resize_parameter(param: nn.Parameter, data: torch.Tensor) -> None:
    """Give ``param`` new ``data`` of another size, keeping the Parameter object (and so the optimizer's
    ``param_groups``, the training loop's parameter list and any scheduler). Autograd caches one
    gradient accumulator per leaf with the leaf's shape, alive as long as any graph built on it; it
    drops the cache only when the data's dtype or device changes, so the data passes through another
    dtype first, and a graph kept from before (a notebook's ``out = model(**batch)``) cannot feed a
    stale shape into the next backward. The old gradient is dropped."""
    other = torch.float16 if data.dtype != torch.float16 else torch.float32
    param.data = data.new_empty(0, dtype=other)
    param.data = data
    param.grad = None


def remap_state(optimizer, param: torch.Tensor, old: torch.Tensor, new: torch.Tensor, axis: int,
                new_shape: tuple[int, ...]) -> None:
    """Move ``optimizer``'s per-entry state of ``param`` from sorted indices ``old`` to sorted ``new``
    along ``axis``: kept entries keep their values, new entries get zeros; scalar state stays."""
    state = optimizer.state.get(param) if optimizer is not None else None
    if not state:
        return
    src, dst = _matches(old, new)
    for key, value in list(state.items()):
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"optimizer state {key!r} has shape {tuple(value.shape)}, not the parameter's "
                             f"{tuple(param.shape)}; DynamicMask can remap only per-entry state (AdamW, Adam, SGD)")
        moved = value.new_zeros(new_shape)
        moved.index_copy_(axis, dst.to(value.device), value.index_select(axis, src.to(value.device)))
        state[key] = moved


def _matches(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions ``(in old, in new)`` of the indices both sorted vectors hold."""
    if old.numel() == 0 or new.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    pos = torch.searchsorted(old, new).clamp(max=old.numel() - 1)   # (k_new,)
    found = old[pos] == new
    return pos[found], found.nonzero().reshape(-1)


def _select(scores, layers: dict[str, SparseLinear], budget, strategy: str, options: dict):
    if budget is None and strategy == "per-layer":   # each layer keeps its own count
        chosen = {n: LayerChoice(scores.unit, topk_indices(scores[n], layer.k), scores.shapes[n])
                  for n, layer in layers.items()}
        return Selection(chosen, {"metric": scores.metric, "budget": "same per layer", "strategy": strategy}).validate()
    if budget is None:
        budget = TotalParams(sum(layer.update.numel() for layer in layers.values()))
    selection = select(scores, budget, strategy=strategy, **options)
    missing = [n for n in layers if n not in selection.layers]
    if missing:
        raise ValueError(f"the reselection gave no entries to {missing[:3]}; a dynamic mask keeps every sparse "
                         "layer, so keep min_per_layer >= 1 (the default)")
    return selection


def _check_calibration(batches, metric: str, num_batches: int | None) -> None:
    """Refuse empty calibration batches, and (for a list) batches a loss metric cannot score, now rather
    than at the first reselection in the middle of a run."""
    if isinstance(batches, (str, bytes, dict)):
        raise TypeError(f"calibration_batches must be a list of batch dicts, got {type(batches).__name__}")
    if hasattr(batches, "__len__") and len(batches) == 0:
        raise ValueError("calibration_batches is empty: give at least one batch dict "
                         "(e.g. list(itertools.islice(rowsft.batches(...), 4)))")
    if isinstance(batches, (list, tuple)) and metric in LOSS_METRICS:
        check_labelled(batches[:num_batches], metric)


def _check_model(model: nn.Module) -> dict[str, SparseLinear]:
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("DynamicMask found no rowsft sparse layer: call rowsft.apply(model, selection) before training")
    tied = tied_elsewhere(model)
    if tied:
        name, others = next(iter(tied.items()))
        raise ValueError(f"{name}'s weight is tied to {others}; a dynamic mask folds updates into the weights at "
                         "every reselection, which would change those too. Leave that layer out of the selection")
    return layers


def _common_unit(model: nn.Module) -> str:
    units = {layer.unit for layer in sparse_layers(model).values()}
    if len(units) != 1:
        raise ValueError(f"DynamicMask needs one unit for all sparse layers, found {sorted(units)}; "
                         "apply a row, column or element selection (not the lean mix)")
    return units.pop()


def _listeners(on_reselect: Any) -> list:
    if on_reselect is None:
        return []
    items = list(on_reselect) if isinstance(on_reselect, (list, tuple)) else [on_reselect]
    for item in items:
        if not (callable(getattr(item, "on_reselect", None)) or callable(item)):
            raise TypeError(f"on_reselect takes a function fn(record), an object with on_reselect(state, record), "
                            f"or a list of these; got {item!r}")
    return items
