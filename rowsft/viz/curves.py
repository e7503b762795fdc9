"""Loss, accuracy and memory curves of several training runs, overlaid (one colour per run).

A run is a ``History`` (``.steps``/``.evals`` lists of dicts), ``History.to_dict()``, a list of
step dicts or a DataFrame. A metric is looked up in the step records first, then in the eval
records (``accuracy``); ``"memory"`` means the memory figure of each step (see
``rowsft.viz.style.memory_value``) and is drawn in MiB.

Reading noisy losses
--------------------
A training loss logged every step is the loss of one batch, noisy from step to step. Its raw
points are drawn faint and a running mean over them as the run's line: the mean at step ``i`` is
the plain average of the last ``window`` logged values up to and including ``i`` (fewer at the
start), see :func:`running_mean`. ``smooth="auto"`` picks ``window = clip(longest run // 10, 2,
50)`` and draws no mean for runs shorter than 10 points; an integer sets the window, ``None`` or 0
draws the raw line only. Where a run has evaluations with a held-out loss (``eval_loss``,
``val_loss`` or ``loss`` in ``History.evals``), they are drawn on the loss panel as diamonds.

Resumed runs
------------
A run resumed from an earlier one restarts its step count at 1. ``continue_from={"resumed":
"stopped early"}`` draws it on cumulative steps: its x values are shifted by the last x of the run
it continues (itself possibly shifted: chains add up), and a dotted line marks where it starts. A
number instead of a run name shifts by that number: ``continue_from={"second half": 500}``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.viz.style import MIB, TEMPLATE, memory_value, round_significant, run_records, series_colors

AXIS_TITLES = {"loss": "loss", "memory": "memory (MiB)", "accuracy": "accuracy", "lr": "learning rate",
               "grad_norm": "gradient norm"}
SMOOTHED = ("loss", "grad_norm")          # per-step metrics that get a running mean
EVAL_KEYS = {"loss": ("eval_loss", "val_loss", "held_out_loss", "loss")}   # held-out versions, first found wins
MIN_POINTS_FOR_MEAN = 10
MAX_AUTO_WINDOW = 50
RAW_OPACITY = 0.3


def metric_series(run, metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` arrays of one metric of one run; empty arrays when the run never logged it."""
    steps, evals = run_records(run)
    if metric == "memory":
        pairs = [(r.get(x), memory_value(r)) for r in steps]
        pairs = [(a, b / MIB) for a, b in pairs if a is not None and b is not None]
    else:
        source = steps if any(metric in r for r in steps) else evals
        pairs = _pairs(source, x, metric)
    if not pairs:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pairs)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def eval_series(run, metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the held-out version of a per-step metric (``loss``: the evaluations'
    ``eval_loss``/``val_loss``/``held_out_loss``/``loss``); empty when the run has none."""
    steps, evals = run_records(run)
    if metric not in EVAL_KEYS or not any(metric in r for r in steps):
        return np.zeros(0), np.zeros(0)
    for key in EVAL_KEYS[metric]:
        pairs = _pairs(evals, x, key)
        if pairs:
            xs, ys = zip(*pairs)
            return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    return np.zeros(0), np.zeros(0)


def _pairs(records, x: str, key: str) -> list[tuple]:
    pairs = [(r.get(x), r.get(key)) for r in records]
    return [(a, b) for a, b in pairs if a is not None and _finite(b)]


def _finite(value) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except (TypeError, ValueError):
        return False


def running_mean(values, window: int) -> np.ndarray:
    """Trailing mean: ``out[i] = mean(values[max(0, i - window + 1) : i + 1])``."""
    v = np.asarray(values, dtype=np.float64)
    if window < 1:
        raise ValueError(f"the running-mean window must be at least 1, got {window}")
    if v.size == 0:
        return v.copy()
    sums = np.cumsum(np.concatenate([[0.0], v]))
    ends = np.arange(1, v.size + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def mean_window(smooth, longest: int) -> int:
    """The running-mean window that ``smooth`` asks for with runs of up to ``longest`` points (0: none)."""
    if smooth is None or smooth is False:
        return 0
    if smooth == "auto":
        if longest < MIN_POINTS_FOR_MEAN:
            return 0
        return int(max(2, min(MAX_AUTO_WINDOW, longest // 10)))
    if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 0:
        raise ValueError(f"smooth must be 'auto', None or a window of at least 1 step, got {smooth!r}")
    return int(smooth) if smooth > 1 else 0


def step_offsets(named: Mapping, continue_from: Mapping | None, x: str = "step") -> dict[str, float]:
    """``{run: x shift}`` from ``continue_from`` (``{run: earlier run name | number}``); chains add up."""
    offsets = {name: 0.0 for name in named}
    if not continue_from:
        return offsets
    unknown = [r for r in continue_from if r not in named]
    unknown += [v for v in continue_from.values() if isinstance(v, str) and v not in named]
    if unknown:
        raise ValueError(f"continue_from names runs that are not drawn: {sorted(set(map(str, unknown)))}; "
                         f"runs here: {list(named)}")

    def resolve(name: str, seen: tuple) -> float:
        if name in seen:
            raise ValueError(f"continue_from goes round in a circle: {' → '.join(seen + (name,))}")
        source = continue_from.get(name)
        if source is None:
            return 0.0
        if isinstance(source, str):
            steps, _ = run_records(named[source])
            xs = [float(r[x]) for r in steps if r.get(x) is not None]
            return resolve(source, seen + (name,)) + (max(xs) if xs else 0.0)
        if isinstance(source, bool) or not isinstance(source, (int, float, np.integer, np.floating)):
            raise TypeError(f"continue_from[{name!r}] must be a run name or a number, got {source!r}")
        return float(source)

    return {name: resolve(name, ()) for name in named}


def _named_runs(runs) -> dict:
    if isinstance(runs, Mapping) and "steps" not in runs:
        return dict(runs)
    return {"run": runs}


def training_curves(runs, metrics: Sequence[str] = ("loss", "memory"), x: str = "step",
                    title: str | None = None, smooth: int | str | None = "auto",
                    continue_from: Mapping[str, str | float] | None = None) -> go.Figure:
    """One panel per metric, one colour per run (the same in every panel and, for a method's or a
    metric's name, in every figure: ``rowsft.viz.style.series_colors``).

    ``runs``: ``{name: History | History.to_dict() | list of step dicts | DataFrame}`` (or a single
    run). ``metrics``: names logged by ``train`` (``loss``, ``lr``, eval ``accuracy``, ...) or
    ``"memory"``. ``smooth``: the running mean of ``loss``/``grad_norm`` (``"auto"``, a window in
    steps, or ``None``); ``continue_from``: draw resumed runs on cumulative steps — both described in
    the module help. Panels of metrics that no run logged stay, empty, so that live updates can fill them.
    """
    named = _named_runs(runs)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("name at least one metric to plot, e.g. metrics=('loss',)")
    offsets = step_offsets(named, continue_from, x)
    series = {(name, metric): metric_series(run, metric, x) for name, run in named.items() for metric in metrics}
    longest = max((len(xs) for (_, m), (xs, _) in series.items() if m in SMOOTHED), default=0)
    window = mean_window(smooth, longest)
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.07 if len(metrics) > 1 else 0)
    colors = series_colors(named)
    held_out = False
    for name, run in named.items():
        color, shift = colors[name], offsets[name]
        for row, metric in enumerate(metrics, start=1):
            xs, ys = series[(name, metric)]
            xs = xs + shift
            smoothed = window > 0 and metric in SMOOTHED and len(xs) > window
            raw = curve_trace(name, metric, color, showlegend=row == 1 and not smoothed, x=xs, y=ys)
            if smoothed:
                raw.update(mode="markers", showlegend=False, opacity=RAW_OPACITY, marker=dict(size=4, color=color),
                           hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra>{metric} of this step</extra>")
            fig.add_trace(raw, row=row, col=1)
            if smoothed:
                fig.add_trace(mean_trace(name, metric, color, showlegend=row == 1, x=xs,
                                         y=running_mean(ys, window), window=window), row=row, col=1)
            ex, ey = eval_series(run, metric, x)
            if len(ex):
                held_out = True
                fig.add_trace(go.Scatter(x=ex + shift, y=round_significant(ey), name=f"{name} · held-out",
                                         legendgroup=name, showlegend=False, mode="markers",
                                         marker=dict(symbol="diamond", size=9, color=color, line=dict(width=1, color="white")),
                                         meta={"run": name, "metric": metric, "kind": "eval"},
                                         hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra>held-out {metric}</extra>"),
                              row=row, col=1)
        if continue_from and name in continue_from:
            fig.add_vline(x=shift, line=dict(color=color, dash="dot", width=1.2))
    if held_out:       # one legend entry for the diamonds of every run
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name="held-out (evaluated)",
                                 marker=dict(symbol="diamond", size=9, color="#555555")), row=1, col=1)
    for row, metric in enumerate(metrics, start=1):
        axis = dict(title_text=AXIS_TITLES.get(metric, metric))
        if metric == "memory":
            axis.update(exponentformat="none", separatethousands=True)   # MiB, never SI "k"/"M" suffixes
        elif metric == "lr":
            axis.update(exponentformat="power")
        fig.update_yaxes(row=row, col=1, **axis)
    xtitle = x + (" (cumulative over resumed runs)" if continue_from else "")
    fig.update_xaxes(title_text=xtitle, row=len(metrics), col=1)
    if window and any(t.meta and t.meta.get("kind") == "mean" for t in fig.data):
        fig.update_layout(legend_title_text=f"lines: running mean<br>of {window} steps;<br>faint dots: each step")
    fig.update_layout(template=TEMPLATE, height=max(340, 230 * len(metrics) + 60), title=title or "Training curves",
                      meta={"rowsft": {"figure": "training_curves", "metrics": metrics, "x": x, "window": window,
                                       "offsets": offsets}})
    return fig


def curve_trace(run: str, metric: str, color: str, showlegend: bool = True, x=(), y=()) -> go.Scatter:
    """The line of one run in one metric's panel (legend name = run; ``meta = {"run", "metric"}``)."""
    x = np.asarray(x, dtype=np.float64)
    mode = "lines+markers" if metric == "accuracy" or len(x) < 30 else "lines"
    return go.Scatter(x=x, y=round_significant(y), name=run, legendgroup=run, showlegend=showlegend,
                      mode=mode, line=dict(color=color), meta={"run": run, "metric": metric},
                      hovertemplate=f"{run}<br>%{{x}}: %{{y:.4g}}<extra>{metric}</extra>")


def mean_trace(run: str, metric: str, color: str, showlegend: bool = True, x=(), y=(), window: int | None = None) -> go.Scatter:
    """The running-mean line of one run in one metric's panel (``meta = {"run", "metric", "kind": "mean"}``)."""
    meta = {"run": run, "metric": metric, "kind": "mean"}
    if window:
        meta["window"] = window
    label = f"running mean of {window}" if window else "running mean"
    return go.Scatter(x=np.asarray(x, dtype=np.float64), y=round_significant(y), name=run, legendgroup=run,
                      showlegend=showlegend, mode="lines", line=dict(color=color, width=2.2), meta=meta,
                      hovertemplate=f"{run}<br>%{{x}}: %{{y:.4g}}<extra>{label}</extra>")
