"""Loss, accuracy and memory curves of several training runs, overlaid (one colour per run).

A run is a ``History`` (``.steps``/``.evals`` lists of dicts), ``History.to_dict()``, a list of
step dicts or a DataFrame. A metric is looked up in the step records first, then in the eval
records (``accuracy``); ``"memory"`` means the memory figure of each step (see
``rowsft.viz.style.memory_value``) and is drawn in MiB.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.viz.style import TEMPLATE, memory_value, round_significant, run_records

MIB = 2 ** 20
AXIS_TITLES = {"loss": "loss", "memory": "memory (MiB)", "accuracy": "accuracy", "lr": "learning rate"}


def metric_series(run, metric: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` arrays of one metric of one run; empty arrays when the run never logged it."""
    steps, evals = run_records(run)
    if metric == "memory":
        pairs = [(r.get(x), memory_value(r)) for r in steps]
        pairs = [(a, b / MIB) for a, b in pairs if a is not None and b is not None]
    else:
        source = steps if any(metric in r for r in steps) else evals
        pairs = [(r.get(x), r.get(metric)) for r in source]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None and np.isfinite(float(b))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    xs, ys = zip(*pairs)
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def _named_runs(runs) -> dict:
    if isinstance(runs, Mapping) and "steps" not in runs:
        return dict(runs)
    return {"run": runs}


def training_curves(runs, metrics: Sequence[str] = ("loss", "memory"), x: str = "step",
                    title: str | None = None) -> go.Figure:
    """One panel per metric, one line per run (same colour for a run across panels).

    ``runs``: ``{name: History | History.to_dict() | list of step dicts | DataFrame}`` (or a single
    run). ``metrics``: names logged by ``train`` (``loss``, ``lr``, eval ``accuracy``, ...) or
    ``"memory"``. Panels of metrics that no run logged stay, empty, so that live updates can fill them.
    """
    named = _named_runs(runs)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("name at least one metric to plot, e.g. metrics=('loss',)")
    fig = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[AXIS_TITLES.get(m, m) for m in metrics])
    colors = TEMPLATE.layout.colorway
    for i, (name, run) in enumerate(named.items()):
        color = colors[i % len(colors)]
        for row, metric in enumerate(metrics, start=1):
            xs, ys = metric_series(run, metric, x)
            fig.add_trace(curve_trace(name, metric, color, showlegend=row == 1, x=xs, y=ys), row=row, col=1)
    for row, metric in enumerate(metrics, start=1):
        fig.update_yaxes(title_text=AXIS_TITLES.get(metric, metric), row=row, col=1)
    fig.update_xaxes(title_text=x, row=len(metrics), col=1)
    fig.update_layout(template=TEMPLATE, height=max(300, 230 * len(metrics)), title=title or "Training curves",
                      meta={"rowsft": {"figure": "training_curves", "metrics": metrics, "x": x}})
    return fig


def curve_trace(run: str, metric: str, color: str, showlegend: bool = True, x=(), y=()) -> go.Scatter:
    """The line of one run in one metric's panel (legend name = run; ``meta = {"run", "metric"}``)."""
    x = np.asarray(x, dtype=np.float64)
    mode = "lines+markers" if metric == "accuracy" or len(x) < 30 else "lines"
    return go.Scatter(x=x, y=round_significant(y), name=run, legendgroup=run, showlegend=showlegend,
                      mode=mode, line=dict(color=color), meta={"run": run, "metric": metric},
                      hovertemplate=f"{run}<br>%{{x}}: %{{y:.4g}}<extra>{metric}</extra>")
