"""Budget control: how many rows to train, and what that costs, shown at once.

Three ways to say the budget — rows per layer, a ratio of each layer, or parity with LoRA of a
given rank — over the layers of a :class:`~rowsft.notebook.layer_picker.LayerPicker`. Every
change selects again (``rowsft.select``, fast: no forward pass) and shows the trainable parameters
and the predicted training memory (``rowsft.memory.predict``, analytic) next to LoRA and full
fine-tuning, as numbers and as a stacked bar chart, and moves the marked rows of an importance
heatmap. Sliders report on release, so dragging does not select a hundred times.

A budget larger than a picked layer, no layer picked, or a selection error is shown as one red
line; the last valid selection stays in :attr:`BudgetControl.selection` only while it matches the
controls (it becomes ``None`` on error, so nothing stale is launched).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import ipywidgets as widgets
import plotly.graph_objects as go

from rowsft import viz
from rowsft.memory.prediction import predict
from rowsft.notebook._widgets import (
    Displayable,
    StatusArea,
    error_message,
    format_bytes,
    format_count,
    log,
    refresh_figure,
)
from rowsft.notebook.layer_picker import LayerPicker
from rowsft.selection.budgets import lora_parity
from rowsft.selection.strategies import select
from rowsft.viz.style import report_dict

MODES = (("count per layer", "rows"), ("ratio of each layer", "ratio"), ("LoRA-rank parity", "lora"))
UNIT_NOUNS = {"row": "rows", "column": "columns", "group": "neurons", "element": "weights"}


def _default_predict(model, what, batch_size: int, seq_len: int, rank: int, targets=None, logit_positions=None):
    """``rowsft.memory.predict`` for a Selection, ``"full"``, or ``"lora"`` of ``rank`` on ``targets``."""
    if what == "lora":
        return predict(model, ("lora", int(rank)), batch_size, seq_len, targets=targets or "all-linear",
                       logit_positions=logit_positions)
    return predict(model, what, batch_size, seq_len, logit_positions=logit_positions)


def lora_count(selection, rank: int) -> int:
    """Trainable parameters of LoRA of ``rank`` on the selection's layers: ``rank * (d_out + d_in)`` each."""
    return int(rank * sum(choice.shape[0] + choice.shape[1] for choice in selection.layers.values()))


def _total(report) -> float:
    total = getattr(report, "total", None)
    if total is None:
        total = sum(report_dict(report).values())
    return float(total)


class BudgetControl(Displayable):
    """Rows / ratio / LoRA-parity budget with live trainable-parameter and memory figures.

    ``scores``: what to select from. ``picker``: a LayerPicker (one over ``scores`` is made when
    missing). ``heatmap``: optional ``go.FigureWidget`` from ``viz.importance_heatmap`` whose marks
    follow the selection. ``batch_size``/``seq_len``: the shape memory is predicted for;
    ``logit_positions``: positions per example that reach the LM head in training (the labelled
    ones, `rowsft.lean_loss.logit_positions(batch)`; None: all).
    ``select_fn``, ``predict_fn(model, selection | "full" | "lora", batch_size, seq_len, rank, targets=...)``
    (LoRA is priced on the modules of the selection) and ``lora_parity_fn(rank)`` default to rowsft's own. Every new selection goes to the
    :meth:`observe` callbacks (``None`` when the controls give no valid selection). ``busy_fn()``: a
    reason not to select now (a run is training), or None; while it gives one, a change of the controls
    keeps the current selection, says so, and sets :attr:`pending` (call :meth:`update` once free).
    """

    def __init__(self, model, scores, picker: LayerPicker | None = None, heatmap: go.FigureWidget | None = None,
                 rows: int = 64, ratio: float = 0.02, rank: int = 8, batch_size: int = 8, seq_len: int = 256,
                 strategy: str = "per-layer", ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 select_fn: Callable | None = None, predict_fn: Callable | None = None,
                 lora_parity_fn: Callable | None = None, logit_positions: int | None = None,
                 busy_fn: Callable[[], str | None] | None = None):
        self.model, self.batch_size, self.seq_len = model, int(batch_size), int(seq_len)
        self.busy_fn, self.pending = busy_fn, False
        self._select_fn, self._lora_parity_fn = select_fn, lora_parity_fn
        self.predict_fn = predict_fn or functools.partial(_default_predict, logit_positions=logit_positions)
        self.total_parameters = sum(p.numel() for p in model.parameters())
        self.selection = None
        self.memory: dict = {}
        self._callbacks: list[Callable] = []
        self.scores, self.picker, self.heatmap = None, None, None
        ranks = sorted(set(ranks) | {rank})
        self.mode = widgets.ToggleButtons(options=MODES, value="rows", description="budget")
        self.rows = widgets.IntSlider(value=rows, min=1, max=max(rows, 1), description="rows", continuous_update=False)
        self.rows.add_class("rowsft-budget-rows")  # stable hooks for styling and the browser test
        self.ratio = widgets.FloatSlider(value=ratio, min=0.001, max=1.0, step=0.001, readout_format=".3f",
                                         description="ratio", continuous_update=False)
        self.rank = widgets.Dropdown(options=ranks, value=rank, description="LoRA rank")
        self.strategy = widgets.Dropdown(options=["per-layer", "global"], value=strategy, description="strategy")
        self.figures = widgets.HTML("")
        self.figures.add_class("rowsft-trainable")
        self.memory_figure = go.FigureWidget(viz.memory_breakdown({"row-sparse": {c: 0 for c in viz.COMPONENTS}},
                                                                  title="Predicted training memory"))
        self.memory_figure.layout.height = 320
        self.memory_figure.add_class("rowsft-memory")
        self.status = StatusArea()
        for w in (self.mode, self.rows, self.ratio, self.rank, self.strategy):
            w.observe(lambda _change: self.update(), names="value")
        self.picker_box = widgets.VBox([])
        self.widget = widgets.VBox([self.picker_box, self.mode, widgets.HBox([self.rows, self.ratio]),
                                    widgets.HBox([self.rank, self.strategy]), self.figures, self.status,
                                    self.memory_figure])
        self.set_scores(scores, picker=picker, heatmap=heatmap)

    # ------------------------------------------------------------------ wiring
    @property
    def select_fn(self) -> Callable:
        if self._select_fn is None:
            self._select_fn = select
        return self._select_fn

    @property
    def lora_parity_fn(self) -> Callable:
        if self._lora_parity_fn is None:
            self._lora_parity_fn = lora_parity
        return self._lora_parity_fn

    def set_scores(self, scores, picker: LayerPicker | None = None, heatmap: go.FigureWidget | None = None) -> None:
        """Select from new scores (e.g. after re-scoring); a new picker is made if the layers changed."""
        self.scores = scores
        if picker is None and (self.picker is None or set(self.picker.all_names) != set(scores)):
            picker = LayerPicker(list(scores), type_of=getattr(scores, "layer_type", None))
        if picker is not None and picker is not self.picker:
            self.picker = picker
            picker.observe(lambda _p: self.update())
            self.picker_box.children = [picker.widget]
        if heatmap is not None:
            self.heatmap = heatmap
        widest = max(int(v.numel()) if hasattr(v, "numel") else len(v) for v in scores.values())
        self.rows.max = max(widest, self.rows.value)
        self.rows.description = UNIT_NOUNS.get(getattr(scores, "unit", "row"), "rows")
        self.update()

    def observe(self, callback: Callable) -> None:
        """Call ``callback(selection_or_None)`` after every update."""
        self._callbacks.append(callback)

    # ------------------------------------------------------------------ the budget
    @property
    def budget(self):
        """What ``select`` gets: an int (rows), a float (ratio) or a LoRA-parity budget."""
        mode = self.mode.value
        if mode == "rows":
            return int(self.rows.value)
        if mode == "ratio":
            return float(self.ratio.value)
        return self.lora_parity_fn(int(self.rank.value))

    def _check(self, names: list[str]) -> None:
        if not names:
            raise ValueError("no layer picked: tick at least one module type and one block")
        if self.mode.value == "rows":
            rows = int(self.rows.value)
            for name in names:
                v = self.scores[name]
                size = int(v.numel()) if hasattr(v, "numel") else len(v)
                if rows > size:
                    unit = UNIT_NOUNS.get(getattr(self.scores, "unit", "row"), "rows")
                    raise ValueError(f"{rows} {unit} per layer is more than {name} has ({size}); lower the budget "
                                     f"to at most {size}, use a ratio, or leave that module type out")

    def update(self) -> None:
        """Select again from the controls and refresh figures, numbers and heatmap marks."""
        reason = self.busy_fn() if self.busy_fn is not None else None
        if reason:
            self.pending = True
            self.status.error(f"Not selecting again now: {reason}; the change applies at the next Launch")
            return
        self.pending = False
        try:
            names = self.picker.names
            self._check(names)
            selection = self.select_fn(self.scores, self.budget, strategy=self.strategy.value,
                                       **self.picker.select_kwargs())
        except Exception as exc:  # noqa: BLE001 - shown, not raised
            log.debug("selection failed", exc_info=True)
            self.selection = None
            self.status.error(error_message(exc))
            self._notify()
            return
        self.selection = selection
        self.status.clear()
        self._show(selection)
        self._notify()

    def _show(self, selection) -> None:
        trainable = int(selection.trainable_parameters)
        share = 100.0 * trainable / max(1, self.total_parameters)
        rank = int(self.rank.value)
        reports, problems = {}, []
        for label, what in (("row-sparse", selection), (f"LoRA r={rank}", "lora"), ("full", "full")):
            try:
                reports[label] = self.predict_fn(self.model, what, self.batch_size, self.seq_len, rank,
                                                 targets=list(selection))
            except Exception as exc:  # noqa: BLE001 - one missing estimate must not hide the others
                log.debug("memory prediction failed", exc_info=True)
                problems.append(f"{label}: {error_message(exc)}")
        self.memory = reports
        memory_text = " · ".join(f"{k} <b>{format_bytes(_total(r))}</b>" for k, r in reports.items())
        self.figures.value = (f"trainable parameters: <b>{format_count(trainable)}</b> ({share:.3f} % of "
                              f"{format_count(self.total_parameters)}) in {len(selection)} layers<br>"
                              f"predicted training memory (batch {self.batch_size} × {self.seq_len} tokens): "
                              f"{memory_text or 'n/a'}")
        if problems:
            self.status.error("memory estimate unavailable for " + "; ".join(problems))
        if reports:
            counts = {"row-sparse": trainable, f"LoRA r={rank}": lora_count(selection, rank),
                      "full": self.total_parameters}
            refresh_figure(self.memory_figure, viz.memory_breakdown(
                reports, title="Predicted training memory (each bar: its own trainable parameters)",
                trainable_parameters=counts))
            self.memory_figure.layout.height = 320
        if self.heatmap is not None:
            try:
                viz.mark_selection(self.heatmap, self.scores, selection)
            except Exception as exc:  # noqa: BLE001
                log.debug("heatmap marks failed", exc_info=True)
                self.status.error(f"could not mark the heatmap: {error_message(exc)}")

    def _notify(self) -> None:
        notify = self.status.guard("A selection observer failed")
        for cb in self._callbacks:
            notify(cb)(self.selection)
