"""Importance heatmap: block index × neuron, one panel per module type, chosen neurons marked.

Neuron binning
--------------
A layer can have thousands of neurons (SmolLM2-135M: 1536 MLP rows, 30 blocks). Wider than
``max_columns`` (256 by default), neighbouring neurons are binned: every column covers
``bin = ceil(width / max_columns)`` consecutive neurons (the last one may be shorter) and shows
their ``max`` (default; an important neuron never disappears) or ``mean``. The x value of a
column is the first neuron of its bin, so the axis stays in neuron numbers. In ``order="sorted"``
each block's scores are sorted in decreasing order first (x = rank), so the curve of importance and
where the chosen neurons fall in it can be read at a glance. Values are rounded to 4 significant
digits (float32) so that saved notebooks stay small.

The figure remembers how it was drawn in ``fig.layout.meta["rowsft"]``, so :func:`mark_selection`
can move the marks of a new selection onto it (a ``go.Figure`` or a live ``go.FigureWidget``)
without redrawing the heatmap.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.targets import module_type as module_type_of
from rowsft.viz.style import TEMPLATE, group_by_type, layer_of, round_significant, score_vectors, selection_marks

REDUCTIONS = ("max", "mean")
ORDERS = ("original", "sorted")
MARK_COLOR = "#e41a1c"


def bin_size(width: int, max_columns: int = 256) -> int:
    """Neurons per heatmap column: 1 when ``width <= max_columns``, else ``ceil(width / max_columns)``."""
    if max_columns < 1:
        raise ValueError(f"max_columns must be at least 1, got {max_columns}")
    return max(1, math.ceil(width / max_columns))


def bin_neurons(matrix, max_columns: int = 256, reduce: str = "max") -> tuple[np.ndarray, int]:
    """Bin the columns of ``matrix`` (rows × neurons, NaN = no neuron) → ``(binned, bin_size)``.

    Column ``c`` of the result reduces neurons ``c*bin … (c+1)*bin - 1`` with ``reduce`` ("max" or
    "mean"), ignoring NaN.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, width = matrix.shape
    size = bin_size(width, max_columns)
    if size == 1:
        return matrix.copy(), 1
    columns = math.ceil(width / size)
    padded = np.full((rows, columns * size), np.nan)
    padded[:, :width] = matrix
    blocks = padded.reshape(rows, columns, size)                     # (rows, columns, bin)
    with np.errstate(all="ignore"):
        valid = ~np.isnan(blocks)
        if reduce == "max":
            out = np.where(valid, blocks, -np.inf).max(axis=2)
        else:
            out = np.where(valid, blocks, 0.0).sum(axis=2) / np.maximum(valid.sum(axis=2), 1)
        out[~valid.any(axis=2)] = np.nan
    return out, size


def _panel(names: list[str], vectors: dict, order: str, max_columns: int, reduce: str):
    """One module type: z (blocks × columns), x (first neuron of each column), y labels, bin, order maps."""
    width = max(len(vectors[n]) for n in names)
    matrix = np.full((len(names), width), np.nan)                    # (blocks, neurons)
    positions = {}                                                   # name -> column position of each neuron id
    for r, name in enumerate(names):
        v = vectors[name]
        if order == "sorted":
            ranking = np.argsort(-v, kind="stable")                  # neuron ids by decreasing score
            matrix[r, :len(v)] = v[ranking]
            pos = np.empty(len(v), dtype=np.int64)
            pos[ranking] = np.arange(len(v))
            positions[name] = pos
        else:
            matrix[r, :len(v)] = v
            positions[name] = np.arange(len(v))
    z, size = bin_neurons(matrix, max_columns, reduce)
    x = np.arange(z.shape[1]) * size
    y = [layer_of(n) if layer_of(n) is not None else i for i, n in enumerate(names)]
    if len(set(y)) != len(y):
        y = list(range(len(names)))
    return z, x, y, size, positions


def importance_heatmap(scores, selection=None, module_type: str | None = None, order: str = "original",
                       max_columns: int = 256, reduce: str = "max", log: bool = False,
                       title: str | None = None, colorscale: str = "Viridis") -> go.Figure:
    """Heatmap of importance scores: one panel per module type, y = block index, x = neuron.

    ``scores``: ``Scores``, dict name → tensor, or ``Scores.tidy()``. ``selection``: optional
    ``Selection`` (or dict name → indices) whose neurons are marked with red ticks. ``module_type``:
    draw only this type (e.g. ``"mlp.up_proj"`` or ``"up_proj"``). ``order``: ``"original"``
    (neuron ids) or ``"sorted"`` (by decreasing score within each block). ``log``: colour by
    ``log10(score)``. Neuron binning (``max_columns``, ``reduce``) is described in the module help.
    All panels share one colour scale, which suits scores normalised per layer (``rowsft.score``
    divides by the layer mean by default); use ``log=True`` for raw, heavy-tailed metrics.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    vectors, unit = score_vectors(scores)
    panels = group_by_type(vectors)
    if module_type is not None:
        wanted = {t: ns for t, ns in panels.items() if t == module_type_of(module_type)}
        if not wanted:
            raise ValueError(f"no scores of module type {module_type!r}; types here: {list(panels)}")
        panels = wanted
    types = list(panels)
    heights = [max(110, min(220, 8 * len(panels[t]) + 40)) for t in types]       # px per panel
    fig = make_subplots(rows=len(types), cols=1, subplot_titles=types, vertical_spacing=min(0.08, 0.3 / len(types)),
                        row_heights=heights)
    meta_panels = []
    for i, t in enumerate(types, start=1):
        z, x, y, size, _ = _panel(panels[t], vectors, order, max_columns, reduce)
        shown = np.log10(np.where(z > 0, z, np.nan)) if log else z
        what = "neuron rank" if order == "sorted" else "neuron"
        span = f"bin of {size} {what}s from %{{x}}" if size > 1 else f"{what} %{{x}}"
        fig.add_trace(go.Heatmap(
            z=round_significant(shown), x=x.astype(np.int32), y=np.asarray(y, dtype=np.int32), coloraxis="coloraxis",
            name=f"scores:{t}", xgap=0, ygap=1,
            hovertemplate=f"block %{{y}}<br>{span}<br>{'log10 ' if log else ''}{reduce if size > 1 else 'score'}"
                          " %{z:.4g}<extra>" + t + "</extra>"), row=i, col=1)
        if size > 1:
            chosen = f"%{{customdata}} of {size} {what}s chosen in the bin from %{{x}}"
        else:
            chosen = "neuron %{customdata} (rank %{x})" if order == "sorted" else "neuron %{x}"
        fig.add_trace(go.Scatter(x=[], y=[], customdata=[], mode="markers", name=f"selected:{t}", showlegend=False,
                                 marker=dict(symbol="line-ns-open", color=MARK_COLOR, size=9, line=dict(width=2)),
                                 hovertemplate=f"block %{{y}}<br>{chosen}<extra>selected</extra>"), row=i, col=1)
        if i == len(types):  # one axis title at the bottom: on inner panels it would overlap the next title
            fig.update_xaxes(title_text=what + (" (binned)" if size > 1 else ""), row=i, col=1)
        fig.update_yaxes(title_text="block", autorange="reversed", row=i, col=1)
        meta_panels.append({"type": t, "names": panels[t], "bin": size})
    metric = getattr(scores, "metric", None)
    fig.update_layout(
        template=TEMPLATE, height=sum(heights) + 120,
        title=title or f"Importance ({metric or 'scores'}, unit {unit}, {order} order)",
        coloraxis=dict(colorscale=colorscale, colorbar=dict(title="log10 score" if log else "score")),
        meta={"rowsft": {"figure": "importance_heatmap", "order": order, "max_columns": max_columns,
                         "reduce": reduce, "panels": meta_panels}})
    if selection is not None:
        mark_selection(fig, scores, selection)
    return fig


def selection_points(scores, selection, order: str = "original", max_columns: int = 256,
                     module_type: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Where the chosen neurons fall on the heatmap: ``{type: (x, y, info)}`` (int32 arrays), one point
    per marked column (a column is marked when at least one of its neurons is chosen). ``info`` is the
    number of chosen neurons in the column when neurons are binned, else the neuron id."""
    vectors, _ = score_vectors(scores)
    marks = selection_marks(selection, scores)
    out = {}
    for t, names in group_by_type(vectors).items():
        if module_type is not None and t != module_type_of(module_type):
            continue
        _, x_cols, y, size, positions = _panel(names, vectors, order, max_columns, "max")
        xs, ys, infos = [], [], []
        for r, name in enumerate(names):
            chosen = marks.get(name)
            if chosen is None or len(chosen) == 0:
                continue
            chosen = chosen[chosen < len(positions[name])]
            columns = positions[name][chosen] // size                 # heatmap column of each chosen neuron
            if size == 1:
                by_column = np.argsort(columns)
                xs.extend(x_cols[columns[by_column]].tolist())
                infos.extend(chosen[by_column].tolist())
            else:
                columns, counts = np.unique(columns, return_counts=True)
                xs.extend(x_cols[columns].tolist())
                infos.extend(counts.tolist())
            ys.extend([y[r]] * (len(xs) - len(ys)))
        out[t] = (np.asarray(xs, dtype=np.int32), np.asarray(ys, dtype=np.int32), np.asarray(infos, dtype=np.int32))
    return out


def mark_selection(fig: go.Figure, scores, selection) -> go.Figure:
    """Move the red marks of ``fig`` (made by :func:`importance_heatmap`) to ``selection``; in place.

    Works on a ``go.FigureWidget`` too (one batched update). ``selection=None`` clears the marks.
    """
    meta = (fig.layout.meta or {}).get("rowsft", {}) if isinstance(fig.layout.meta, dict) else {}
    if meta.get("figure") != "importance_heatmap":
        raise ValueError("mark_selection needs a figure made by rowsft.viz.importance_heatmap")
    types = [p["type"] for p in meta["panels"]]
    points = selection_points(scores, selection or {}, meta["order"], meta["max_columns"]) if selection is not None else {}
    traces = {tr.name: tr for tr in fig.data}
    updater = fig.batch_update() if isinstance(fig, go.FigureWidget) else _nullcontext()
    with updater:
        for t in types:
            empty = np.zeros(0, np.int32)
            x, y, info = points.get(t, (empty, empty, empty))
            trace = traces[f"selected:{t}"]
            trace.x, trace.y, trace.customdata = x, y, info
    return fig


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
