"""The learning-rate range test's figure: training loss against the rate (log axis), the smoothed
curve, and the suggested rate and the lowest-loss rate marked, with a tuned rate for comparison."""
from __future__ import annotations

import plotly.graph_objects as go

from rowsft.viz.style import TEMPLATE


def lr_range_figure(result, tuned_lr: float | None = None, title: str | None = None) -> go.Figure:
    """``result``: a ``RangeTestResult`` (or its ``as_dict()``). ``tuned_lr``: a rate to show beside the
    suggestion (e.g. the default from the measured sweep)."""
    data = result if isinstance(result, dict) else result.as_dict()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=data["lrs"], y=data["losses"], mode="markers", name="loss of each step",
                             marker=dict(color="#bbbbbb", size=5)))
    finite = [(lr, s) for lr, s in zip(data["lrs"], data["smoothed"]) if s != float("inf")]
    fig.add_trace(go.Scatter(x=[lr for lr, _ in finite], y=[s for _, s in finite], mode="lines",
                             name="smoothed", line=dict(color="#1f77b4", width=2)))
    marks = [("suggested (lowest ÷ 10)", data.get("suggestion"), "#2ca02c"),
             ("lowest smoothed loss", data.get("min_loss_lr"), "#7f7f7f"),
             ("tuned default", tuned_lr, "#ff7f0e")]
    for name, lr, color in marks:
        if lr:
            fig.add_vline(x=lr, line=dict(color=color, dash="dash", width=1.5))
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=f"{name}: {lr:.1e}",
                                     line=dict(color=color, dash="dash")))
    if finite:
        low = min(s for _, s in finite)
        fig.update_yaxes(range=[0.9 * low, max(2.5 * low, finite[0][1] * 1.05)])
    fig.update_xaxes(type="log", title_text="learning rate", exponentformat="power")
    fig.update_yaxes(title_text="training loss")
    fig.update_layout(template=TEMPLATE, height=380, width=720, legend=dict(x=0.01, y=0.99, bgcolor="rgba(255,255,255,0.8)"),
                      title=title or "Learning-rate range test: pick a rate where the loss still falls steeply")
    return fig
