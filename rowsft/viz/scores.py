"""Score distributions per block, and how much two metrics agree on which neurons matter.

Box plots are drawn from precomputed statistics (quartiles, min/max whiskers, mean), not from
every neuron's score, so a model with 200 layers of 1536 neurons gives a figure of a few kB.
Overlaps always show the random baseline: two random top-k sets of ``n`` neurons share ``k/n``.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.scoring.agreement import spearman, top_count, topk_overlap
from rowsft.targets import module_type as module_type_of
from rowsft.viz.style import TEMPLATE, group_by_type, layer_of, round_significant, score_vectors


def _block_axis(names: list[str]) -> list:
    y = [layer_of(n) for n in names]
    return y if None not in y and len(set(y)) == len(y) else names


def score_distributions(scores, module_type: str | None = None, log: bool = False,
                        title: str | None = None) -> go.Figure:
    """One box per block and module type: quartiles, median, mean, whiskers at min and max.

    ``scores``: ``Scores``, dict name → tensor, or ``Scores.tidy()``. ``log``: logarithmic y axis.
    """
    vectors, unit = score_vectors(scores)
    fig = go.Figure()
    for t, names in group_by_type(vectors).items():
        if module_type is not None and t != module_type_of(module_type):
            continue
        stats = np.array([[np.min(v), *np.percentile(vectors[n], [25, 50, 75]), np.max(v), np.mean(v)]
                          for n in names for v in [vectors[n]]])           # (blocks, 6)
        lo, q1, med, q3, hi, mean = round_significant(stats).T
        fig.add_trace(go.Box(x=_block_axis(names), lowerfence=lo, q1=q1, median=med, q3=q3, upperfence=hi,
                             mean=mean, name=t, boxpoints=False))
    if not fig.data:
        raise ValueError(f"no scores of module type {module_type!r}; types here: {list(group_by_type(vectors))}")
    fig.update_layout(template=TEMPLATE, boxmode="group", title=title or f"Score distribution per block "
                      f"({getattr(scores, 'metric', None) or 'scores'}, unit {unit})",
                      xaxis_title="block", yaxis_title="score", yaxis_type="log" if log else "linear")
    return fig


def overlap_table(scores_a, scores_b, k=0.1) -> list[dict]:
    """Per layer present in both: ``{layer, type, block, n, k, overlap, random, spearman}``.

    ``overlap`` is the shared fraction of the two top-k sets, ``random`` the expected one (k/n).
    """
    va, _ = score_vectors(scores_a)
    vb, _ = score_vectors(scores_b)
    rows = []
    for t, names in group_by_type([n for n in va if n in vb]).items():
        for name in names:
            a, b = va[name], vb[name]
            if len(a) != len(b):
                raise ValueError(f"{name}: the two score sets have {len(a)} and {len(b)} values; "
                                 "compare scores of the same unit and model")
            kk = top_count(k, len(a))
            rows.append({"layer": name, "type": t, "block": layer_of(name), "n": len(a), "k": kk,
                         "overlap": topk_overlap(a, b, kk), "random": kk / len(a), "spearman": spearman(a, b)})
    if not rows:
        raise ValueError("the two score sets have no layer in common")
    return rows


def metric_overlap(scores_a, scores_b, k=0.1, labels: tuple[str, str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Agreement of two metrics per block and module type: top-k overlap (bars, with the random
    baseline k/n as a dashed line) and Spearman rank correlation (lines). ``k``: count or ratio."""
    rows = overlap_table(scores_a, scores_b, k)
    la, lb = labels or (getattr(scores_a, "metric", None) or "A", getattr(scores_b, "metric", None) or "B")
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=(f"top-k overlap ({la} vs {lb})", "Spearman rank correlation"))
    types = list(dict.fromkeys(r["type"] for r in rows))
    colors = TEMPLATE.layout.colorway
    for i, t in enumerate(types):
        part = [r for r in rows if r["type"] == t]
        x = _block_axis([r["layer"] for r in part])
        color = colors[i % len(colors)]
        fig.add_trace(go.Bar(x=x, y=round_significant([r["overlap"] for r in part]), name=t, legendgroup=t,
                             marker_color=color, customdata=[r["k"] for r in part],
                             hovertemplate="block %{x}<br>overlap %{y:.3f} of top %{customdata}<extra>" + t + "</extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=round_significant([r["spearman"] for r in part]), name=t, legendgroup=t,
                                 showlegend=False, mode="lines+markers", line_color=color), row=2, col=1)
        fig.add_trace(go.Scatter(x=x, y=round_significant([r["random"] for r in part]), name="random (k/n)",
                                 legendgroup="random", showlegend=i == 0, mode="lines",
                                 line=dict(color=color, dash="dash", width=1)), row=1, col=1)
    fig.update_yaxes(range=[0, 1.05], title_text="fraction", row=1, col=1)
    fig.update_yaxes(range=[-1.05, 1.05], title_text="ρ", row=2, col=1)
    fig.update_xaxes(title_text="block", row=2, col=1)
    fig.update_layout(template=TEMPLATE, barmode="group", height=600,
                      title=title or f"Do {la} and {lb} pick the same neurons?")
    return fig


def overlap_matrix(scores_by_metric: dict, k=0.1, title: str | None = None) -> go.Figure:
    """Metric × metric heatmap of the mean top-k overlap over all layers (diagonal = 1).

    ``scores_by_metric``: ``{label: Scores}``, e.g. ``{"taylor": s1, "magnitude": s2, "random": s3}``.
    """
    labels = list(scores_by_metric)
    if len(labels) < 2:
        raise ValueError("overlap_matrix needs at least two score sets to compare")
    z = np.eye(len(labels))
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            rows = overlap_table(scores_by_metric[a], scores_by_metric[labels[j]], k)
            z[i, j] = z[j, i] = np.mean([r["overlap"] for r in rows])
    fig = go.Figure(go.Heatmap(z=round_significant(z), x=labels, y=labels, zmin=0, zmax=1, colorscale="Blues",
                               texttemplate="%{z:.2f}", hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title or f"Mean top-k overlap between metrics (k={k})",
                      yaxis_autorange="reversed", width=150 + 70 * len(labels), height=150 + 60 * len(labels))
    return fig
