"""Kept adapters: name a trained update, switch the model between kept ones, compare two on the same questions.

The plain functions hold the logic and need no widgets: :func:`keep_adapter` copies the model's current
rowsft selection and its sparse layers' updates (``.update``, ``.bias_delta``) into a :class:`KeptAdapter`;
:func:`use_adapter` puts one back (re-applying its selection with ``rowsft.apply`` when the model carries
another one, then copying the updates in, so the model computes exactly that fine-tune); :func:`use_none`
unloads the sparse layers (the model without any update); :func:`compare_adapters` evaluates two kept
adapters with the same evaluation function (``rowsft.evaluate``'s per-question results), pairs them with
the exact McNemar test and puts the model back as it was; :func:`comparison_text` words the result as
notebook 01 does (accuracy with its 95 % interval, the majority class, "shown" / "not shown" at 5 %).

An adapter holds the updates, not the frozen weights: it is valid while those weights are the ones it
was trained on. Each one records the version counters of the frozen parameters, and ``use_adapter``
refuses once they changed (e.g. a later run merged an update into them). :class:`AdaptersPanel` is the
dashboard's folded "Adapters" section around these functions.
"""
from __future__ import annotations

import html
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import ipywidgets as widgets
import torch
from torch import nn

from rowsft.cli.job import describe_accuracy
from rowsft.evaluation.stats import exact_mcnemar
from rowsft.explore.summary import verdict
from rowsft.layers import tuner
from rowsft.notebook._widgets import Displayable, StatusArea, error_message, log
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


# ---------------------------------------------------------------- the widgets
class AdaptersPanel(Displayable):
    """Keep the model's trained update under a name, Use a kept one or None, Compare two (see the module help).

    ``eval_fn(model)``: the evaluation Compare uses (``rowsft.evaluate``-style results; None: Compare is
    refused). ``busy_fn()``: why the model must not change now (a run training), or None.
    ``background=False`` compares in the caller's thread.
    """

    def __init__(self, model, eval_fn: Callable | None = None, busy_fn: Callable[[], str | None] | None = None,
                 background: bool = True):
        self.model, self.eval_fn, self.busy_fn, self.background = model, eval_fn, busy_fn, background
        self.adapters: dict[str, KeptAdapter] = {}
        self.comparison: dict | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._drop_armed = False
        self.name = widgets.Text(value="", placeholder="a name, e.g. taylor rows", description="name",
                                 layout=widgets.Layout(width="260px"))
        self.keep_button = widgets.Button(description="Keep as adapter…", icon="save")
        self.choice = widgets.Dropdown(options=[], description="adapter", layout=widgets.Layout(width="260px"))
        self.use_button = widgets.Button(description="Use", button_style="info", icon="check")
        self.none_button = widgets.Button(description="None", icon="ban")
        self.first = widgets.Dropdown(options=[], description="A", layout=widgets.Layout(width="220px"))
        self.second = widgets.Dropdown(options=[], description="B", layout=widgets.Layout(width="220px"))
        self.compare_button = widgets.Button(description="Compare A vs B", button_style="primary", icon="balance-scale")
        self.status = StatusArea()
        self.result = widgets.HTML("")
        self.keep_button.on_click(lambda _: self.keep())
        self.use_button.on_click(lambda _: self.use())
        self.none_button.on_click(lambda _: self.none())
        self.compare_button.on_click(lambda _: self.compare())
        about = widgets.HTML("<i>keep the trained update under a name, train another one (a new selection starts "
                             "from the pretrained model; press None first to restart the same one), switch between "
                             "them, and compare two on the same held-out questions</i>")
        self.widget = widgets.VBox([about, widgets.HBox([self.name, self.keep_button]),
                                    widgets.HBox([self.choice, self.use_button, self.none_button]),
                                    widgets.HBox([self.first, self.second, self.compare_button]),
                                    self.status, self.result])

    @property
    def running(self) -> bool:
        """True while a comparison evaluates (it switches the model's update)."""
        return self._thread is not None and self._thread.is_alive()

    def _refused(self, what: str) -> str | None:
        if self.running:
            return f"Cannot {what} now: a comparison is running; wait for it to end"
        reason = self.busy_fn() if self.busy_fn is not None else None
        return f"Cannot {what} now: {reason}" if reason else None

    def _refuse(self, message: str) -> bool:
        self.status.error(message)
        return False

    def _refresh_choices(self, chosen: str | None = None) -> None:
        names = list(self.adapters)
        keep_first, keep_second = self.first.value, self.second.value
        self.choice.options = self.first.options = self.second.options = names
        if chosen is not None:
            self.choice.value = chosen
        self.first.value = keep_first if keep_first in names else (names[0] if names else None)
        second = keep_second if keep_second in names and keep_second != self.first.value else None
        if second is None and len(names) >= 2:
            second = names[-1] if names[-1] != self.first.value else names[0]
        self.second.value = second

    # ------------------------------------------------------------------ buttons
    def keep(self) -> bool:
        """Keep the model's current update under the typed name (what Keep as adapter… does)."""
        self._drop_armed = False
        refused = self._refused("keep an adapter")
        if refused:
            return self._refuse(refused)
        try:
            adapter = keep_adapter(self.model, self.name.value, self.adapters)
        except ValueError as exc:
            return self._refuse(f"Cannot keep: {error_message(exc)}")
        self.adapters[adapter.name] = adapter
        self._refresh_choices(chosen=adapter.name)
        self.name.value = ""
        self.status.success(f"kept {adapter.describe()}; train the next one, then Compare A vs B")
        return True

    def use(self) -> bool:
        """Put the chosen adapter's update into the model (what Use does)."""
        self._drop_armed = False
        refused = self._refused("switch adapters")
        if refused:
            return self._refuse(refused)
        adapter = self.adapters.get(self.choice.value)
        if adapter is None:
            return self._refuse("Cannot use: no adapter kept yet (train, name it, Keep as adapter…)")
        if unkept(self.model, self.adapters.values()):
            return self._refuse(f"Cannot use {adapter.name!r}: {UNKEPT}")
        try:
            use_adapter(self.model, adapter)
        except (ValueError, RuntimeError) as exc:
            return self._refuse(f"Cannot use {adapter.name!r}: {error_message(exc)}")
        self.status.success(f"the model now computes {adapter.describe()}")
        return True

    def none(self) -> bool:
        """Take every update off the model (what None does); an unkept update needs a second press."""
        refused = self._refused("switch adapters")
        if refused:
            self._drop_armed = False
            return self._refuse(refused)
        dropped = unkept(self.model, self.adapters.values())
        if dropped and not self._drop_armed:
            self._drop_armed = True
            return self._refuse("the model carries an update that is not kept as an adapter: keep it first, or "
                                "press None again to drop it")
        self._drop_armed = False
        try:
            use_none(self.model)
        except (ValueError, RuntimeError) as exc:
            return self._refuse(f"Cannot unload: {error_message(exc)}")
        self.status.success("the model computes no update now (its frozen weights)"
                            + ("; the unkept update was dropped" if dropped else ""))
        return True

    def compare(self) -> bool:
        """Evaluate adapters A and B on the same questions (what Compare A vs B does)."""
        self._drop_armed = False
        refused = self._refused("compare")
        if refused:
            return self._refuse(refused)
        if len(self.adapters) < 2:
            return self._refuse(f"Cannot compare: keep two adapters first ({len(self.adapters)} kept)")
        a, b = self.adapters.get(self.first.value), self.adapters.get(self.second.value)
        if a is None or b is None:
            return self._refuse("Cannot compare: pick adapters A and B")
        if a.name == b.name:
            return self._refuse(f"Cannot compare {a.name!r} with itself: pick two different adapters")
        if self.eval_fn is None:
            return self._refuse("Cannot compare: no evaluation (give the dashboard a tokenizer and data with a "
                                "validation split, or eval_fn=)")
        try:
            for adapter in (a, b):
                _check_frozen(self.model, adapter)
        except ValueError as exc:
            return self._refuse(f"Cannot compare: {error_message(exc)}")
        self.error, self.comparison = None, None
        self.compare_button.description = "Compare (running…)"
        self.status.info(f"evaluating {a.name!r} and {b.name!r} on the same questions…")
        if not self.background:
            self._run(a, b)
            return True
        self._thread = threading.Thread(target=self._run, args=(a, b), name="rowsft-compare", daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> dict | None:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.comparison

    def _run(self, a: KeptAdapter, b: KeptAdapter) -> None:
        try:
            self.comparison = compare_adapters(self.model, a, b, self.eval_fn)
            self.result.value = (f"<pre style='font-size:12px'>{html.escape(comparison_text(self.comparison))}</pre>")
            self.status.success(f"compared {a.name!r} and {b.name!r}; the model is as before")
        except BaseException as exc:  # noqa: BLE001 - a thread's error must reach the user
            self.error = exc
            log.debug("comparison failed", exc_info=True)
            self.status.error(f"Comparison failed: {error_message(exc)}")
        finally:
            self.compare_button.description = "Compare A vs B"
