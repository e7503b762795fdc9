"""Live training curves: loss and memory per step, several runs overlaid, updated while they train.

``LiveCurves.callback(run)`` gives a ``rowsft.train`` callback that records one point per logged
step (``state.step``, ``state.loss``, the memory figure of ``state.memory``) and evaluation metrics
(``on_eval``). Points land in a buffer under a lock; the ``FigureWidget`` is redrawn from it in one
``batch_update`` at most every ``min_interval`` seconds (default 0.5 s) and once more at the end of
the run (final flush), so a long run stays fluid however fast its steps are. Noisy per-step metrics
(loss, gradient norm) get the same running mean as ``rowsft.viz.training_curves`` once a run has
``rowsft.viz.curves.MIN_POINTS_FOR_MEAN`` points: the raw points turn faint and a second trace of the
same colour (``meta["kind"] == "mean"``) draws the trailing mean over the window ``mean_window("auto", n)``.

Threads: the callback runs in the training thread. Setting a ``FigureWidget`` trace from there is
allowed: ipywidgets sends the change as a comm message through the kernel's IOPub channel, which
ipykernel makes safe to use from any thread, and the browser redraws while the kernel's main
thread stays free for button clicks. The lock keeps two flushes (training thread and a manual
``flush()``) from interleaving. Limits: no frontend attached (plain Python, tests) → only the
Python-side figure changes; a kernel without threads (JupyterLite/Pyodide) must train in the
foreground, where the browser sees the updates only once the cell finishes.
"""
from __future__ import annotations

import threading
import time
from typing import Sequence

import plotly.graph_objects as go

from rowsft import viz
from rowsft.notebook._widgets import Displayable
from rowsft.viz.curves import MIB, RAW_OPACITY, SMOOTHED, curve_trace, mean_trace, mean_window, running_mean
from rowsft.viz.style import memory_value


class LiveCurves(Displayable):
    """A ``FigureWidget`` of training curves (one panel per metric) that runs write into while training.

    ``metrics``: panels, from ``"loss"``, ``"memory"`` (MiB), ``"lr"``, ``"grad_norm"`` and eval
    metrics such as ``"accuracy"``. A run name seen again starts a fresh curve for that name.
    """

    def __init__(self, metrics: Sequence[str] = ("loss", "memory"), min_interval: float = 0.5, title: str | None = None):
        self.metrics = list(metrics)
        self.min_interval = float(min_interval)
        self.figure = go.FigureWidget(viz.training_curves({}, self.metrics, title=title or "Training curves (live)"))
        self.figure.add_class("rowsft-live-curves")
        self.widget = self.figure
        self._lock = threading.RLock()
        self._points: dict[str, dict[str, tuple[list, list]]] = {}   # run -> metric -> (x, y)
        self._dirty: set[str] = set()
        self._last_flush = 0.0
        self.flushes = 0

    # ------------------------------------------------------------------ data in
    def callback(self, run: str) -> "CurveCallback":
        """A ``train`` callback that draws into the curves of ``run``."""
        return CurveCallback(self, run)

    def start_run(self, run: str) -> None:
        """Forget the points of ``run`` (a new curve under that name)."""
        with self._lock:
            self._points[run] = {m: ([], []) for m in self.metrics}
            self._dirty.add(run)
        self.flush()

    def add_point(self, run: str, metric: str, x: float, y: float | None) -> None:
        if y is None or metric not in self.metrics:
            return
        with self._lock:
            xs, ys = self._points.setdefault(run, {m: ([], []) for m in self.metrics})[metric]
            xs.append(float(x))
            ys.append(float(y))
            self._dirty.add(run)

    def points(self, run: str, metric: str) -> tuple[list[float], list[float]]:
        """Copies of the recorded ``(x, y)`` of one run and metric."""
        with self._lock:
            xs, ys = self._points.get(run, {}).get(metric, ([], []))
            return list(xs), list(ys)

    @property
    def runs(self) -> list[str]:
        with self._lock:
            return list(self._points)

    # ------------------------------------------------------------------ figure out
    def maybe_flush(self) -> bool:
        """Redraw if ``min_interval`` has passed since the last redraw; True when it redrew."""
        if time.monotonic() - self._last_flush < self.min_interval:
            return False
        self.flush()
        return True

    def flush(self) -> None:
        """Redraw every run whose points changed, in one batched update."""
        with self._lock:
            self._last_flush = time.monotonic()
            dirty, self._dirty = self._dirty, set()
            if not dirty:
                return
            self._ensure_traces(dirty)
            traces = {(t.meta["run"], t.meta["metric"], t.meta.get("kind", "raw")): t for t in self.figure.data if t.meta}
            with self.figure.batch_update():
                for run in dirty:
                    for metric, (xs, ys) in self._points[run].items():
                        self._draw(traces, run, metric, xs, ys)
            self.flushes += 1

    @staticmethod
    def _draw(traces, run: str, metric: str, xs: list, ys: list) -> None:
        """Set one run's raw trace of ``metric`` and, for noisy metrics, its running mean."""
        raw, mean = traces[(run, metric, "raw")], traces.get((run, metric, "mean"))
        window = mean_window("auto", len(xs)) if mean is not None else 0
        raw.x, raw.y = tuple(xs), tuple(ys)
        if window and len(xs) > window:
            raw.update(mode="markers", opacity=RAW_OPACITY, marker=dict(size=4))
            mean.x, mean.y = tuple(xs), tuple(running_mean(ys, window).tolist())
            mean.meta = {**mean.meta, "window": window}
            mean.hovertemplate = f"{run}<br>%{{x}}: %{{y:.4g}}<extra>running mean of {window}</extra>"
        else:
            raw.update(mode="lines+markers" if metric == "accuracy" or len(xs) < 30 else "lines", opacity=1)
            if mean is not None:
                mean.x, mean.y = (), ()

    def _ensure_traces(self, runs) -> None:
        have = {t.meta["run"] for t in self.figure.data if t.meta}
        colors = viz.TEMPLATE.layout.colorway
        for run in runs:
            if run in have:
                continue
            color = colors[len(have) % len(colors)]
            have.add(run)
            for row, metric in enumerate(self.metrics, start=1):
                self.figure.add_trace(curve_trace(run, metric, color, showlegend=row == 1), row=row, col=1)
                if metric in SMOOTHED:
                    self.figure.add_trace(mean_trace(run, metric, color, showlegend=False), row=row, col=1)


class CurveCallback:
    """``rowsft.train`` callback feeding one run of a :class:`LiveCurves` (thread-safe, throttled)."""

    def __init__(self, curves: LiveCurves, run: str):
        self.curves, self.run = curves, run

    def on_train_begin(self, state) -> None:
        self.curves.start_run(self.run)

    def on_step_end(self, state) -> None:
        c = self.curves
        c.add_point(self.run, "loss", state.step, _finite(getattr(state, "loss", None)))
        c.add_point(self.run, "lr", state.step, _finite(getattr(state, "lr", None)))
        c.add_point(self.run, "grad_norm", state.step, _finite(getattr(state, "grad_norm", None)))
        memory = memory_value(getattr(state, "memory", None) or {})
        c.add_point(self.run, "memory", state.step, None if memory is None else memory / MIB)
        c.maybe_flush()

    def on_eval(self, state) -> None:
        for metric, value in (getattr(state, "metrics", None) or {}).items():
            if metric != "step":
                self.curves.add_point(self.run, metric, state.step, _finite(value))
        self.curves.maybe_flush()

    def on_train_end(self, state) -> None:
        self.curves.flush()


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None
