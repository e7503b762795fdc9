"""The budget explorer's figure: held-out accuracy (with 95% intervals) and predicted peak memory
against trainable parameters, one line per method and metric, LoRA at parity on the same axes, the
zero-shot model and the majority-class baseline as reference lines."""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.explore.summary import accuracy_interval, series
from rowsft.viz.style import MIB, TEMPLATE, series_colors

DODGE_DECADES = 0.01        # how far apart (on the log x axis) series at one budget are drawn


def _mean_over_seeds(records: list[dict]) -> list[tuple[int, float, float, float, float | None, str]]:
    """Per budget: (trainable parameters, mean accuracy, lowest low, highest high, peak bytes, budget label)."""
    by_budget: dict[str, list[dict]] = {}
    for r in records:
        by_budget.setdefault(str(r["budget"]), []).append(r)
    rows = []
    for label, group in by_budget.items():
        stats = [accuracy_interval(r) for r in group]
        rows.append((group[0]["trainable_parameters"], sum(s[0] for s in stats) / len(stats),
                     min(s[1] for s in stats), max(s[2] for s in stats), group[0].get("predicted_peak_bytes"), label))
    return sorted(rows)


def budget_ticks(trainable: list[int], most: int = 8) -> dict:
    """Tick settings for the log x axis: 1-2-5 ticks per decade when the budgets span at least one, else ticks at the
    budgets themselves (up to ``most``, three significant digits), so a narrow range (every point near 300k
    parameters) still has labels."""
    values = sorted({int(v) for v in trainable if v and v > 0})
    if not values or values[-1] >= 10 * values[0]:
        return {"dtick": "D2"}
    step = max(1, -(-len(values) // most))
    return {"tickvals": values[::step], "tickformat": ".3~s"}         # 305,280 → "305k", not "305.28k"


def budget_explorer(records: list[dict], title: str | None = None) -> go.Figure:
    """Accuracy and predicted peak memory against trainable parameters (log axis) for the records of
    `rowsft.explore_budgets`. Error bars: 95% Wilson intervals (over seeds, the widest)."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("held-out accuracy (95% interval)", "predicted peak memory"))
    tuned = [r for r in records if r["method"] != "zero-shot"]
    names = list(dict.fromkeys(series(r) for r in tuned))
    colors = series_colors(names)
    for i, name in enumerate(names):
        rows = _mean_over_seeds([r for r in tuned if series(r) == name])
        x = [row[0] for row in rows]
        nudge = 10 ** (DODGE_DECADES * (i - (len(names) - 1) / 2))     # series at one budget side by side, not on top
        shown_x = [value * nudge for value in x]
        acc = [row[1] for row in rows]
        color = colors[name]
        fig.add_trace(go.Scatter(
            x=shown_x, y=acc, customdata=x, name=name, legendgroup=name, mode="lines+markers", line_color=color,
            error_y=dict(type="data", symmetric=False, array=[row[3] - row[1] for row in rows],
                         arrayminus=[row[1] - row[2] for row in rows]),
            text=[row[5] for row in rows],
            hovertemplate="budget %{text}<br>%{customdata:,} trainable<br>accuracy %{y:.3f}<extra>" + name + "</extra>"),
            row=1, col=1)
        peaks = [(row[0], row[4] / MIB) for row in rows if row[4] is not None]
        fig.add_trace(go.Scatter(x=[p[0] * nudge for p in peaks], y=[p[1] for p in peaks], customdata=[p[0] for p in peaks],
                                 name=name, legendgroup=name, showlegend=False, mode="lines+markers", line_color=color,
                                 hovertemplate="%{customdata:,} trainable<br>%{y:.1f} MiB<extra>" + name + "</extra>"),
                      row=1, col=2)
    references = [r for r in records if r["method"] == "zero-shot"]
    if references:
        result = references[0]["evaluation"]
        fig.add_hline(y=float(result["accuracy"]), line=dict(color="#555", dash="dot", width=1), row=1, col=1,
                      annotation_text="zero-shot", annotation_position="bottom right")
        majority = result.get("majority")
        if majority:
            fig.add_hline(y=float(majority["accuracy"]), line=dict(color="#999", dash="dash", width=1), row=1, col=1,
                          annotation_text="majority class", annotation_position="top right")
    x_title = "trainable parameters" + (" (series nudged apart to show each)" if len(names) > 1 else "")
    ticks = {"tickformat": "~s", **budget_ticks([r["trainable_parameters"] for r in tuned])}
    for col in (1, 2):
        fig.update_xaxes(type="log", title_text=x_title, row=1, col=col, **ticks)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="predicted peak (MiB)", exponentformat="none", separatethousands=True, row=1, col=2)
    task = records[0]["task"] if records else ""
    n = records[0]["evaluation"]["n"] if records else 0
    steps = tuned[0]["steps"] if tuned else 0
    fig.update_layout(template=TEMPLATE, height=420, width=980,
                      title=title or f"What a budget buys: {task}, {steps} steps, {n} held-out questions")
    return fig

