"""Metric chooser: pick an importance metric and unit, then re-score on demand.

Scoring runs when the "Score" button is pressed, never on every change of a drop-down, and shows a
progress bar that counts the calibration batches ``rowsft.score`` draws (the batches are wrapped,
so no cooperation from the scorer is needed). A metric that is unavailable for the chosen unit,
or any other scoring error, ends in one red line in the status area; the previous scores stay.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import ipywidgets as widgets

from rowsft.notebook._widgets import Displayable, StatusArea, error_message
from rowsft.scoring import scorer as scoring
from rowsft.scoring.scorer import allowed_metrics, score

DEFAULT_METRICS = ("magnitude", "taylor", "hessian", "zo-taylor", "activation", "wanda", "random")
DEFAULT_UNITS = ("row", "column", "group", "element")


class CountingBatches:
    """Re-iterable view of ``batches`` that calls ``on_batch(count)`` for every batch handed out."""

    def __init__(self, batches: Iterable, on_batch: Callable[[int], None]):
        self.batches, self.on_batch, self.count = batches, on_batch, 0

    def __iter__(self):
        for batch in self.batches:
            self.count += 1
            self.on_batch(self.count)
            yield batch

    def __len__(self):
        return len(self.batches)


def _known(module_attr: str, fallback: Sequence[str]) -> list[str]:
    """A list of names the scoring module publishes (e.g. ``METRICS``), else ``fallback``."""
    try:
        names = getattr(scoring, module_attr, None)
        if names:
            return list(names.keys() if isinstance(names, dict) else names)
    except Exception:  # noqa: BLE001 - the scorer is optional until it exists
        pass
    return list(fallback)


def _default_allowed() -> Callable | None:
    try:
        return allowed_metrics
    except Exception:  # noqa: BLE001
        return None


class MetricChooser(Displayable):
    """Drop-downs for metric and unit, a batch count, a "Score" button and a progress bar.

    ``score_fn`` defaults to ``rowsft.score``; it is called as
    ``score_fn(model, batches, metric=..., unit=..., targets=..., num_batches=..., **score_kwargs)``.
    After a successful run :attr:`scores` holds the result and every :meth:`observe` callback gets it.
    ``allowed_fn(unit)`` lists the metrics a unit accepts (default: ``rowsft.scoring.allowed_metrics``
    with the real scorer, none with a custom ``score_fn``); an impossible pair is reported as soon
    as it is chosen, and the button then refuses to score.
    """

    def __init__(self, model, batches: Iterable, metric: str = "magnitude", unit: str = "row",
                 num_batches: int = 4, targets="all-linear", metrics: Sequence[str] | None = None,
                 units: Sequence[str] | None = None, score_fn: Callable | None = None, score_kwargs: dict | None = None,
                 allowed_fn: Callable | None = None, busy_fn: Callable[[], str | None] | None = None):
        self.model, self.batches, self.targets = model, batches, targets
        self.busy_fn = busy_fn
        self.score_kwargs = dict(score_kwargs or {})
        self._score_fn = score_fn
        self.allowed_fn = allowed_fn if allowed_fn is not None or score_fn is not None else _default_allowed()
        self.scores = None
        self.seconds: float | None = None
        self._callbacks: list[Callable] = []
        metrics = list(metrics or _known("METRICS", DEFAULT_METRICS))
        units = list(units or _known("UNIT_METRICS", DEFAULT_UNITS))
        self.metric = widgets.Dropdown(options=metrics, value=metric if metric in metrics else metrics[0],
                                       description="metric")
        self.unit = widgets.Dropdown(options=units, value=unit if unit in units else units[0], description="unit")
        self.num_batches = widgets.BoundedIntText(value=num_batches, min=1, max=10_000, description="batches",
                                                  layout=widgets.Layout(width="160px"))
        self.button = widgets.Button(description="Score", button_style="primary", icon="calculator")
        self.progress = widgets.IntProgress(value=0, min=0, max=num_batches, description="",
                                            layout=widgets.Layout(width="200px"))
        self.status = StatusArea()
        self.button.on_click(lambda _: self.run())
        self.metric.observe(lambda _c: self.check_choice(), names="value")
        self.unit.observe(lambda _c: self.check_choice(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.metric, self.unit, self.num_batches]),
                                    widgets.HBox([self.button, self.progress]), self.status])

    @property
    def score_fn(self) -> Callable:
        if self._score_fn is None:
            self._score_fn = score
        return self._score_fn

    def observe(self, callback: Callable) -> None:
        """Call ``callback(scores)`` after each successful scoring."""
        self._callbacks.append(callback)

    def check_choice(self) -> bool:
        """False (and a red line) when the chosen metric is not available for the chosen unit."""
        metric, unit = self.metric.value, self.unit.value
        if self.allowed_fn is None:
            return True
        try:
            allowed = list(self.allowed_fn(unit))
        except Exception as exc:  # noqa: BLE001
            self.status.error(error_message(exc))
            return False
        if metric not in allowed:
            self.status.error(f"{metric} is not available per {unit}; choose one of {', '.join(allowed)} "
                              f"or another unit")
            return False
        if self.status.kind == "error":
            self.status.clear()
        return True

    def run(self):
        """Score with the current choice (what the button does); returns the Scores or None on error."""
        metric, unit, n = self.metric.value, self.unit.value, int(self.num_batches.value)
        reason = self.busy_fn() if self.busy_fn is not None else None
        if reason:
            self.status.error(f"Cannot score now: {reason}")
            return None
        if not self.check_choice():
            return None
        self.progress.max, self.progress.value, self.progress.bar_style = n, 0, ""
        self.button.disabled = True
        self.status.info(f"scoring {metric} per {unit} on {n} batches…")

        def tick(count: int) -> None:
            self.progress.value = min(count, n)

        try:
            start = time.perf_counter()
            scores = self.status.guard(f"Could not score {metric} per {unit}")(self.score_fn)(
                self.model, CountingBatches(self.batches, tick), metric=metric, unit=unit, targets=self.targets,
                num_batches=n, **self.score_kwargs)
            if scores is None:
                self.progress.bar_style = "danger"
                return None
            self.seconds = time.perf_counter() - start
            self.scores = scores
            self.progress.value, self.progress.bar_style = n, "success"
            self.status.success(f"scored {metric} per {unit}: {len(scores)} layers in {self.seconds:.1f} s")
            notify = self.status.guard("Could not show the new scores")
            for cb in self._callbacks:
                notify(cb)(scores)
            return scores
        finally:
            self.button.disabled = False
