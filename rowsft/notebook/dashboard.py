"""The dashboard: score → look → pick layers and budget → train, in one notebook cell.

``Dashboard(model, data, tokenizer)`` composes the pieces of ``rowsft.notebook``, each of which
can also be used alone: a :class:`MetricChooser` (re-scores on demand), the importance heatmap
(``rowsft.viz.importance_heatmap`` as a live ``FigureWidget``), a :class:`LayerPicker` and a
:class:`BudgetControl` (selection, trainable parameters, predicted memory, marks on the heatmap),
and a :class:`TrainLauncher` drawing into :class:`LiveCurves`. It holds no training logic: Launch
applies the current selection to the notebook's model with ``rowsft.apply`` (when the model
already carries a different one, ``rowsft.merge_and_unload`` first keeps what was learnt) and
calls ``rowsft.train``. While a run trains, Score and budget changes are refused with a message
(scoring freezes the model's parameters, which would end the run). A fourth, folded section is the
:class:`ExplorerPanel`: short fine-tunes of fresh copies of the model over several budgets, to
choose a budget by held-out accuracy with intervals (it never changes the notebook's model). A fifth,
folded section is the :class:`AdaptersPanel`: keep a trained update under a name, switch the model between
kept ones (or none), compare two on the same held-out questions. Once an adapter is kept, Launch with a new
selection unloads a kept (or zero) update instead of merging it, so the next run starts from the same frozen
weights, and refuses to merge an update that is not kept (that would change the weights the adapters need).
"""
from __future__ import annotations

from typing import Callable, Mapping

import ipywidgets as widgets
import plotly.graph_objects as go

from rowsft import viz
from rowsft.data.batching import batches
from rowsft.evaluation.choices import evaluate
from rowsft.explore.budgets import ExploreConfig
from rowsft.layers import tuner
from rowsft.lean_loss import logit_positions
from rowsft.notebook._widgets import Displayable, StatusArea, refresh_figure, section
from rowsft.notebook.adapters import AdaptersPanel, unkept
from rowsft.notebook.budget import BudgetControl
from rowsft.notebook.explorer import ExplorerPanel
from rowsft.notebook.launcher import TrainLauncher
from rowsft.notebook.live import LiveCurves
from rowsft.notebook.metric import MetricChooser
from rowsft.notebook.settings import NotebookSettings
from rowsft.notebook.settings import settings as default_settings
from rowsft.viz.style import group_by_type, score_vectors


def as_batches(data, tokenizer, batch_size: int, max_length: int, batches_fn: Callable | None = None):
    """Training batches from ``data``: a ``DatasetDict``/dict with a ``train`` split or a single split
    (batched with ``rowsft.batches``, which needs ``tokenizer``), or already an iterable of batch dicts."""
    split = data["train"] if isinstance(data, Mapping) and "train" in data else data
    if hasattr(split, "column_names") or (isinstance(split, list) and split and "input_ids" not in split[0]):
        if tokenizer is None:
            raise ValueError("the data are raw examples: pass tokenizer= so they can be batched, "
                             "or pass ready batches (rowsft.batches(...))")
        if batches_fn is None:
            batches_fn = batches
        return batches_fn(split, tokenizer, batch_size=batch_size, max_length=max_length)
    if isinstance(split, list) and not split:
        raise ValueError("the data are empty: pass at least one batch or example")
    return split


def default_eval_fn(data, tokenizer, cfg: NotebookSettings) -> Callable | None:
    """``model → accuracy`` on the validation split, when there is one and a tokenizer."""
    if tokenizer is None or not isinstance(data, Mapping) or "validation" not in data:
        return None

    def eval_fn(model):
        return evaluate(model, tokenizer, data["validation"], batch_size=max(8, cfg.batch_size),
                        max_length=cfg.max_length, max_examples=cfg.eval_examples, progress=False)
    return eval_fn


def _batch_shape(batches, fallback: int) -> tuple[int, int | None]:
    """From the first batch (read once): its sequence length (``fallback`` if unknown) and the
    positions per example that reach the LM head in training (None: all). Defaults for memory estimates."""
    try:
        first = next(iter(batches))
    except Exception:  # noqa: BLE001 - only defaults for memory estimates
        return fallback, None
    try:
        seq_len = int(first["input_ids"].shape[-1])
    except Exception:  # noqa: BLE001
        seq_len = fallback
    try:
        return seq_len, logit_positions(first)
    except Exception:  # noqa: BLE001
        return seq_len, None


def explore_config(cfg: NotebookSettings) -> ExploreConfig:
    """The explorer's settings for a notebook: the notebook's model, task, batches and evaluation."""
    return ExploreConfig(model=cfg.model, task=cfg.task, budgets=[1, 2, 4, f"lora:{cfg.lora_rank}"],
                         metrics=["taylor", "random"], steps=cfg.steps, batch_size=cfg.batch_size,
                         max_length=cfg.max_length, max_train=cfg.max_train, eval_examples=cfg.eval_examples,
                         calibration_batches=cfg.calibration_batches, seeds=[cfg.seed])


class Dashboard(Displayable):
    """Score, select and train ``model`` on ``data`` interactively (see the module help).

    ``settings``: a ``NotebookSettings`` (default ``rowsft.notebook.settings()``, FAST-aware) for
    batch size, length, steps, rows, LoRA rank, calibration batches and eval examples.
    ``eval_fn(model)``: accuracy before/after each run (default: ``rowsft.evaluate`` on
    ``data["validation"]`` when a tokenizer is given). ``score_fn``, ``select_fn``, ``predict_fn``,
    ``lora_parity_fn``, ``train_fn``, ``prepare`` replace rowsft's verbs (teaching, tests).
    """

    def __init__(self, model, data, tokenizer=None, settings: NotebookSettings | None = None, metric: str = "magnitude",
                 unit: str = "row", eval_fn: Callable | None = None, score_fn: Callable | None = None,
                 select_fn: Callable | None = None, predict_fn: Callable | None = None,
                 lora_parity_fn: Callable | None = None, train_fn: Callable | None = None,
                 prepare: Callable | None = None, train_kwargs: dict | None = None, background: bool = True,
                 max_columns: int = 256, explore: ExploreConfig | None = None, explore_fn: Callable | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.settings = cfg = settings or default_settings()
        self.batches = as_batches(data, tokenizer, cfg.batch_size, cfg.max_length)
        self.seq_len, logit_positions = _batch_shape(self.batches, cfg.max_length)
        self.max_columns = max_columns
        self.status = StatusArea()
        self.chooser = MetricChooser(model, self.batches, metric=metric, unit=unit,
                                     num_batches=cfg.calibration_batches, score_fn=score_fn, busy_fn=self.busy)
        self.heatmap_type = widgets.Dropdown(options=["all types"], value="all types", description="show")
        self.heatmap_order = widgets.ToggleButtons(options=["original", "sorted"], value="original", description="order")
        self.heatmap = go.FigureWidget()
        self.heatmap.add_class("rowsft-heatmap")
        self.curves = LiveCurves(("loss", "memory"))
        self.eval_fn = eval_fn if eval_fn is not None else default_eval_fn(data, tokenizer, cfg)
        self.launcher = TrainLauncher(model, self.batches, steps=cfg.steps, lr=cfg.lr, run_name="row-sparse",
                                      curves=self.curves, eval_fn=self.eval_fn, prepare=prepare or self.prepare,
                                      train_fn=train_fn, train_kwargs=train_kwargs, background=background)
        self.budget: BudgetControl | None = None
        self._budget_kwargs = dict(rows=cfg.rows, rank=cfg.lora_rank, batch_size=cfg.batch_size, seq_len=self.seq_len,
                                   select_fn=select_fn, predict_fn=predict_fn, lora_parity_fn=lora_parity_fn,
                                   logit_positions=logit_positions, busy_fn=self.busy)
        self.budget_box = widgets.VBox([widgets.HTML("<i>score the model first</i>")])
        self.chooser.observe(self._scored)
        self._muted = False
        self.heatmap_type.observe(lambda _c: self._muted or self.redraw_heatmap(), names="value")
        self.heatmap_order.observe(lambda _c: self.redraw_heatmap(), names="value")
        self.explorer = ExplorerPanel(explore or explore_config(cfg), busy_fn=self.busy, explore_fn=explore_fn,
                                      background=background)
        folded = widgets.Accordion(children=[self.explorer.widget], selected_index=None)
        folded.set_title(0, "4 · Budget explorer: accuracy against budget, taylor vs random, LoRA at parity")
        self.adapters = AdaptersPanel(model, eval_fn=self.eval_fn, busy_fn=self.busy, background=background)
        kept = widgets.Accordion(children=[self.adapters.widget], selected_index=None)
        kept.set_title(0, "5 · Adapters: keep trained updates, switch between them, compare two on the same questions")
        self.widget = widgets.VBox([
            section("1 · Importance"), self.chooser.widget, widgets.HBox([self.heatmap_type, self.heatmap_order]),
            self.heatmap, section("2 · Layers and budget"), self.budget_box,
            section("3 · Train"), self.launcher.widget, self.curves.widget, folded, kept,
            self.status])
        self.chooser.run()

    # ------------------------------------------------------------------ reactions
    @property
    def is_training(self) -> bool:
        """True while the launcher's run is going (scoring or re-selecting would break it)."""
        launcher = getattr(self, "launcher", None)
        return launcher is not None and launcher.running

    def busy(self) -> str | None:
        """Why the model must not be scored or re-selected now (None: it may)."""
        if self.is_training:
            return "a run is training this model; press Stop or wait for it to end"
        adapters = getattr(self, "adapters", None)
        if adapters is not None and adapters.running:
            return "two adapters are being compared on this model; wait for the comparison to end"
        return None

    @property
    def scores(self):
        return self.chooser.scores

    @property
    def selection(self):
        return None if self.budget is None else self.budget.selection

    def _scored(self, scores) -> None:
        types = ["all types", *group_by_type(score_vectors(scores)[0])]
        keep = self.heatmap_type.value if self.heatmap_type.value in types else "all types"
        self._muted = True
        try:
            self.heatmap_type.options, self.heatmap_type.value = types, keep
        finally:
            self._muted = False
        self.redraw_heatmap(mark=False)
        if self.budget is None:
            self.budget = BudgetControl(self.model, scores, heatmap=self.heatmap, **self._budget_kwargs)
            self.budget_box.children = [self.budget.widget]
        else:
            self.budget.set_scores(scores, heatmap=self.heatmap)

    def redraw_heatmap(self, mark: bool = True) -> None:
        """Draw the heatmap of the current scores with the chosen type and order (and marks)."""
        if self.scores is None:
            return
        shown = None if self.heatmap_type.value == "all types" else self.heatmap_type.value

        @self.status.guard("Could not draw the heatmap")
        def draw():
            fig = viz.importance_heatmap(self.scores, module_type=shown, order=self.heatmap_order.value,
                                         max_columns=self.max_columns)
            refresh_figure(self.heatmap, fig)
            if mark and self.selection is not None:
                viz.mark_selection(self.heatmap, self.scores, self.selection)
        draw()

    def prepare(self, model) -> None:
        """Before a run: put the current selection on the model (rowsft.apply), keeping earlier training."""
        if self.explorer.running:
            raise ValueError("the budget explorer is running (it would halve the speed of both); press its Stop "
                             "or wait for it to end")
        if self.adapters.running:
            raise ValueError("two adapters are being compared on this model; wait for the comparison to end")
        if self.budget is not None and self.budget.pending:
            self.budget.update()          # a change made while the last run trained
        selection = self.selection
        if selection is None:
            message = self.budget.status.message if self.budget is not None else ""
            raise ValueError(message or "no valid selection yet: score the model, pick layers and a budget")
        if tuner.sparse_layers(model):
            current = tuner.current_selection(model)
            if set(current) == set(selection) and all(current[n].equal(selection[n]) for n in selection):
                self.launcher.status.info("continuing with the selection already on the model")
                return
            self._take_off_update(model)
        tuner.apply(model, selection)

    def _take_off_update(self, model) -> None:
        """Before another selection: merge the update (no adapter kept), else unload a kept or zero one."""
        kept = self.adapters.adapters
        if not kept:
            tuner.merge_and_unload(model)              # keep what was learnt in the weights
        elif unkept(model, kept.values()):
            raise ValueError("the model's update is not kept as an adapter, and merging it would change the weights "
                             f"the kept adapters ({', '.join(map(repr, kept))}) apply to: keep it (section 5), or "
                             "press None there twice to drop it, then Launch")
        else:
            tuner.unload(model)                        # kept (or zero): the next run starts from the same weights

    def wait(self, timeout: float | None = None):
        """Block until the current training run ends; its History."""
        return self.launcher.wait(timeout)
