"""Score distributions per block, and how much two metrics agree on which neurons matter.

Box plots are drawn from precomputed statistics (quartiles, min/max whiskers, mean), not from
every neuron's score, so a model with 200 layers of 1536 neurons gives a figure of a few kB.
Overlaps always show the random baseline: two random top-k sets of ``n`` neurons share ``k/n``.
:func:`metric_overlap` aggregates (a few bars per module type, one line per measure over blocks)
instead of one bar per layer, so that 30 blocks × 7 module types stay readable.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.scoring.agreement import spearman, top_count, topk_overlap
from rowsft.targets import module_type as module_type_of
from rowsft.viz.style import (TEMPLATE, block_axis, group_by_type, layer_of, round_significant, score_vectors,
                              series_colors)


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
    groups = group_by_type(vectors)
    colors = series_colors(groups)
    blocks = 0
    for t, names in groups.items():
        if module_type is not None and t != module_type_of(module_type):
            continue
        blocks = max(blocks, len(names))
        stats = np.array([[np.min(v), *np.percentile(vectors[n], [25, 50, 75]), np.max(v), np.mean(v)]
                          for n in names for v in [vectors[n]]])           # (blocks, 6)
        lo, q1, med, q3, hi, mean = round_significant(stats).T
        fig.add_trace(go.Box(x=_block_axis(names), lowerfence=lo, q1=q1, median=med, q3=q3, upperfence=hi,
                             mean=mean, name=t, boxpoints=False, marker_color=colors[t], line_width=1))
    if not fig.data:
        raise ValueError(f"no scores of module type {module_type!r}; types here: {list(group_by_type(vectors))}")
    fig.update_layout(template=TEMPLATE, boxmode="group", title=title or f"Score distribution per block "
                      f"({getattr(scores, 'metric', None) or 'scores'}, unit {unit})",
                      yaxis_title="score", yaxis_type="log" if log else "linear", yaxis_exponentformat="power")
    if all(layer_of(n) is not None for n in vectors):
        fig.update_xaxes(**block_axis(blocks))
    else:
        fig.update_xaxes(title_text="layer")
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


def _mean_by(rows: list[dict], key: str) -> dict:
    """``{value of key: (mean overlap, min, max, mean random, mean spearman, count)}`` in first-seen order."""
    out = {}
    for value in dict.fromkeys(r[key] for r in rows):
        part = [r for r in rows if r[key] == value]
        overlaps = np.array([r["overlap"] for r in part])
        rhos = np.array([r["spearman"] for r in part], dtype=np.float64)
        out[value] = (float(overlaps.mean()), float(overlaps.min()), float(overlaps.max()),
                      float(np.mean([r["random"] for r in part])), float(np.nanmean(rhos)) if np.isfinite(rhos).any()
                      else float("nan"), len(part))
    return out


def metric_overlap(scores_a, scores_b, k=0.1, labels: tuple[str, str] | None = None,
                   title: str | None = None) -> go.Figure:
    """Agreement of two metrics, aggregated so that it reads at a glance. ``k``: count or ratio.

    Left, per module type (averaged over its blocks): the top-k overlap (bar, whiskers from the
    lowest to the highest block), the Spearman rank correlation (bar) and what two random picks would
    share (k/n, a grey tick). Right, per block (averaged over module types): the same two measures as
    lines, the random expectation dashed. The per-layer numbers are in :func:`overlap_table`.
    """
    rows = overlap_table(scores_a, scores_b, k)
    la, lb = labels or (getattr(scores_a, "metric", None) or "A", getattr(scores_b, "metric", None) or "B")
    by_type = _mean_by(rows, "type")
    have_blocks = all(r["block"] is not None for r in rows)
    cols = 2 if have_blocks else 1
    fig = make_subplots(rows=1, cols=cols, horizontal_spacing=0.1, column_widths=[0.45, 0.55] if cols == 2 else None,
                        subplot_titles=("per module type (mean over blocks; whiskers: lowest–highest block)",
                                        "per block (mean over module types)")[:cols])
    overlap_color, rho_color, random_color = "#1f77b4", "#ff7f0e", "#555555"
    types = list(by_type)
    ov = np.array([by_type[t][0] for t in types])
    fig.add_trace(go.Bar(x=types, y=round_significant(ov), name="top-k overlap", legendgroup="overlap",
                         marker_color=overlap_color, offsetgroup="overlap",
                         error_y=dict(type="data", symmetric=False, color="#333333", thickness=1, width=3,
                                      array=round_significant([by_type[t][2] - by_type[t][0] for t in types]),
                                      arrayminus=round_significant([by_type[t][0] - by_type[t][1] for t in types])),
                         customdata=[by_type[t][5] for t in types],
                         hovertemplate="%{x}: mean overlap %{y:.3f} over %{customdata} blocks<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Bar(x=types, y=round_significant([by_type[t][4] for t in types]), name="Spearman ρ",
                         legendgroup="rho", marker_color=rho_color, offsetgroup="rho",
                         hovertemplate="%{x}: mean Spearman ρ %{y:.3f}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=types, y=round_significant([by_type[t][3] for t in types]), name="random picks (k/n)",
                             legendgroup="random", mode="markers", offsetgroup="overlap",
                             marker=dict(symbol="line-ew", size=26, line=dict(width=2.5, color=random_color)),
                             hovertemplate="%{x}: random picks share %{y:.3f}<extra></extra>"), row=1, col=1)
    low = min(0.0, float(np.nanmin([r["spearman"] for r in rows] + [0.0])))
    fig.update_yaxes(range=[low - 0.05 if low < 0 else 0.0, 1.05], title_text="overlap (fraction) · ρ", row=1, col=1)
    if have_blocks:
        by_block = _mean_by(rows, "block")
        blocks = sorted(by_block)
        fig.add_trace(go.Scatter(x=blocks, y=round_significant([by_block[b][0] for b in blocks]), name="top-k overlap",
                                 legendgroup="overlap", showlegend=False, mode="lines+markers",
                                 line=dict(color=overlap_color, width=2), marker_size=5,
                                 hovertemplate="block %{x}: mean overlap %{y:.3f}<extra></extra>"), row=1, col=2)
        fig.add_trace(go.Scatter(x=blocks, y=round_significant([by_block[b][4] for b in blocks]), name="Spearman ρ",
                                 legendgroup="rho", showlegend=False, mode="lines+markers",
                                 line=dict(color=rho_color, width=2), marker_size=5,
                                 hovertemplate="block %{x}: mean Spearman ρ %{y:.3f}<extra></extra>"), row=1, col=2)
        fig.add_trace(go.Scatter(x=blocks, y=round_significant([by_block[b][3] for b in blocks]),
                                 name="random picks (k/n)", legendgroup="random", showlegend=False, mode="lines",
                                 line=dict(color=random_color, dash="dash", width=1.5),
                                 hovertemplate="block %{x}: random picks share %{y:.3f}<extra></extra>"), row=1, col=2)
        fig.update_yaxes(range=[low - 0.05 if low < 0 else 0.0, 1.05], row=1, col=2)
        fig.update_xaxes(row=1, col=2, **block_axis(len(blocks)))
    fig.update_layout(template=TEMPLATE, barmode="group", scattermode="group", height=420, width=1000 if cols == 2 else 620,
                      legend=dict(orientation="h", x=0.0, y=-0.22, xanchor="left", yanchor="top"),
                      margin=dict(b=90), title=title or f"Do {la} and {lb} pick the same neurons? (k = {k})")
    fig.update_annotations(font_size=12)
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
                               texttemplate="%{z:.2f}", hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
                               colorbar=dict(title="overlap", thickness=14)))
    longest = max(len(str(label)) for label in labels)
    label_px = 12 + 8 * longest                      # room for the longest label at 12 px (never clipped)
    cells = 64 * len(labels)
    fig.update_layout(template=TEMPLATE, title=title or f"Mean top-k overlap between metrics (k={k})",
                      yaxis=dict(autorange="reversed", showgrid=False, automargin=True, ticks=""),
                      xaxis=dict(showgrid=False, automargin=True, tickangle=-30 if longest > 6 else 0, ticks=""),
                      margin=dict(l=label_px + 10, b=label_px // 2 + 40, t=70, r=20),
                      width=max(420, cells + label_px + 140), height=max(360, cells + label_px // 2 + 140))
    return fig
