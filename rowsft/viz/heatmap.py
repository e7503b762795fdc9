"""Importance heatmap: block index × neuron, one panel per module type, chosen neurons marked.

Neuron binning
--------------
A layer can have thousands of neurons (SmolLM2-135M: 1536 MLP rows, 30 blocks). Wider than
``max_columns`` (256 by default), neighbouring neurons are binned: every column covers
``bin = ceil(width / max_columns)`` consecutive neurons and shows their ``max`` (default; an
important neuron never disappears) or ``mean``. When ``bin`` does not divide the width, the few
neurons left over join the last column (which then holds fewer than ``2 × bin``), so that no column
stands for a lone edge neuron. The x value of a column is the first neuron of its bin, so the axis
stays in neuron numbers, and the axis title says the bin size. In ``order="sorted"`` each block's
scores are sorted in decreasing order first (x = rank), so the curve of importance and where the
chosen neurons fall in it can be read at a glance. Values are rounded to 4 significant digits
(float32) so that saved notebooks stay small.

Colours
-------
All panels share one colour scale. Its range is clipped to percentiles of the values drawn (the
binned, and with ``log=True`` log10, values of every panel pooled): ``clip=(1, 99)`` by default,
so that one outlier does not wash every panel into one colour; values beyond take the end colours,
and the colour bar's title says so. ``clip=None`` spans the full range; ``zrange=(low, high)`` sets
it, e.g. to share one range between figures. :func:`metric_heatmaps` draws several metrics side by
side on one shared range.

Marks
-----
Chosen neurons are thin red ticks drawn inside their block's row (their height is at most the
row's), one per marked column; :func:`mark_selection` moves them onto a figure (a ``go.Figure`` or a
live ``go.FigureWidget``) without redrawing the heatmap. The figure remembers how it was drawn in
``fig.layout.meta["rowsft"]``.
"""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rowsft.targets import module_type as module_type_of
from rowsft.viz.style import (TEMPLATE, block_axis, group_by_type, layer_of, round_significant, score_vectors,
                              selection_marks)

REDUCTIONS = ("max", "mean")
ORDERS = ("original", "sorted")
MARK_COLOR = "#e41a1c"
DEFAULT_CLIP = (1.0, 99.0)
PANEL_GAP_PX = 90          # between a panel's bottom and the next panel's top: tick labels, axis title, panel title
TOP_PX, BOTTOM_PX = 80, 20
MARK_FILL = 0.8            # a mark's height as a share of its block row


def bin_size(width: int, max_columns: int = 256) -> int:
    """Neurons per heatmap column: 1 when ``width <= max_columns``, else ``ceil(width / max_columns)``."""
    if max_columns < 1:
        raise ValueError(f"max_columns must be at least 1, got {max_columns}")
    return max(1, math.ceil(width / max_columns))


def bin_starts(width: int, size: int) -> np.ndarray:
    """First neuron of each column: ``0, size, 2·size, ...``; ``width // size`` columns, the remainder
    (fewer than ``size`` neurons) joining the last one."""
    return np.arange(max(1, width // size)) * size


def bin_neurons(matrix, max_columns: int = 256, reduce: str = "max") -> tuple[np.ndarray, int]:
    """Bin the columns of ``matrix`` (rows × neurons, NaN = no neuron) → ``(binned, bin_size)``.

    Column ``c`` of the result reduces neurons ``c*bin … (c+1)*bin - 1`` with ``reduce`` ("max" or
    "mean"), ignoring NaN; the last column also takes the ``width % bin`` neurons left over.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, width = matrix.shape
    size = bin_size(width, max_columns)
    if size == 1:
        return matrix.copy(), 1
    starts = bin_starts(width, size)
    valid = ~np.isnan(matrix)
    counts = np.add.reduceat(valid.astype(np.int64), starts, axis=1)
    with np.errstate(all="ignore"):
        if reduce == "max":
            out = np.maximum.reduceat(np.where(valid, matrix, -np.inf), starts, axis=1)
        else:
            out = np.add.reduceat(np.where(valid, matrix, 0.0), starts, axis=1) / np.maximum(counts, 1)
    out[counts == 0] = np.nan
    return out, size


def column_of(positions: np.ndarray, size: int, columns: int) -> np.ndarray:
    """Heatmap column of neuron positions (the leftover neurons belong to the last column)."""
    return np.minimum(np.asarray(positions) // size, columns - 1)


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
    return z, x, y, size, positions, width


def _ordinal(p: float) -> str:
    p = float(p)
    if p <= 0:
        return "min"
    if p >= 100:
        return "max"
    text = f"{p:g}"
    if not text.isdigit():
        return text + "th"
    n = int(text)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def color_range(values, clip: tuple[float, float] | None = DEFAULT_CLIP) -> tuple[float, float]:
    """``(low, high)`` of the colour scale: the ``clip`` percentiles of the finite ``values`` (all of
    them when ``clip`` is None); a constant input gets a small range around its value."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in values]) if isinstance(values, (list, tuple)) \
        else np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 1.0
    if clip is None:
        low, high = float(flat.min()), float(flat.max())
    else:
        lo_p, hi_p = (float(c) for c in clip)
        if not 0 <= lo_p < hi_p <= 100:
            raise ValueError(f"clip must be two percentiles 0 <= low < high <= 100, got {clip!r}")
        low, high = (float(v) for v in np.percentile(flat, [lo_p, hi_p]))
    if high <= low:
        pad = abs(low) * 0.01 or 1.0
        low, high = low - pad, high + pad
    return low, high


def colorbar_title(log: bool, clip, zrange) -> str:
    what = "log10 score" if log else "score"
    if zrange is not None:
        return f"{what}<br>(range set)"
    if clip is None:
        return f"{what}<br>(full range)"
    low, high = clip
    return f"{what}<br>(clipped to the<br>{_ordinal(low)}–{_ordinal(high)} pct)"


def _panel_height(rows: int) -> int:
    """Pixels of a panel of ``rows`` block rows: about 8 px a row, between 110 and 400."""
    return int(max(110, min(400, 8 * rows)))


def _draw(panels: list[dict], vectors: dict, order: str, max_columns: int, reduce: str, log: bool,
          clip, zrange, colorscale: str, title: str, cols: int = 1, meta: dict | None = None) -> go.Figure:
    """The heatmap figure of ``panels`` (``{"key", "title", "names"}``), laid out in ``cols`` columns."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    drawn = []
    for p in panels:
        z, x, y, size, _, width = _panel(p["names"], vectors, order, max_columns, reduce)
        with np.errstate(all="ignore"):
            shown = np.log10(np.where(z > 0, z, np.nan)) if log else z
        drawn.append((p, round_significant(shown), x, y, size, width))
    low, high = (float(zrange[0]), float(zrange[1])) if zrange is not None \
        else color_range([d[1] for d in drawn], clip)
    if not high > low:
        raise ValueError(f"zrange must be (low, high) with low < high, got {zrange!r}")
    rows = math.ceil(len(drawn) / cols)
    heights = [max(_panel_height(len(set(d[3]))) for d in drawn[r * cols:(r + 1) * cols]) for r in range(rows)]
    plot_px = sum(heights) + PANEL_GAP_PX * (rows - 1)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[d[0]["title"] for d in drawn],
                        vertical_spacing=PANEL_GAP_PX / plot_px if rows > 1 else 0.0,
                        horizontal_spacing=0.1 if cols > 1 else 0.0, row_heights=heights)
    what = "neuron rank" if order == "sorted" else "neuron"
    meta_panels = []
    for i, (p, shown, x, y, size, width) in enumerate(drawn):
        row, col = i // cols + 1, i % cols + 1
        key = p["key"]
        span = f"bin of {size} {what}s from %{{x}}" if size > 1 else f"{what} %{{x}}"
        fig.add_trace(go.Heatmap(
            z=shown, x=x.astype(np.int32), y=np.asarray(y, dtype=np.int32), coloraxis="coloraxis",
            name=f"scores:{key}", xgap=0, ygap=0,
            hovertemplate=f"block %{{y}}<br>{span}<br>{'log10 ' if log else ''}{reduce if size > 1 else 'score'}"
                          " %{z:.4g}<extra>" + key + "</extra>"), row=row, col=col)
        if size > 1:
            chosen = f"%{{customdata}} of {size} {what}s chosen in the bin from %{{x}}"
        else:
            chosen = "neuron %{customdata} (rank %{x})" if order == "sorted" else "neuron %{x}"
        blocks = max(y) - min(y) + 1
        row_px = heights[row - 1] / blocks
        mark_px = float(max(2.0, min(14.0, MARK_FILL * row_px)))
        fig.add_trace(go.Scatter(x=[], y=[], customdata=[], mode="markers", name=f"selected:{key}", showlegend=False,
                                 marker=dict(symbol="line-ns", color=MARK_COLOR, size=mark_px,
                                             line=dict(width=1.5, color=MARK_COLOR)),
                                 hovertemplate=f"block %{{y}}<br>{chosen}<extra>selected</extra>"), row=row, col=col)
        columns = len(x)
        last = width - int(x[-1])
        if size > 1:
            bins = f"bins of {size}" + (f"; the last holds {last}" if last != size else "")
            xtitle = f"{what} ({bins}; {reduce} shown)"
        else:
            xtitle = what
        fig.update_xaxes(title_text=xtitle, title_standoff=4, range=[-size / 2, float(x[-1]) + size / 2],
                         showgrid=False, row=row, col=col)
        fig.update_yaxes(range=[max(y) + 0.5, min(y) - 0.5], showgrid=False, row=row, col=col,
                         **block_axis(blocks, "block" if col == 1 else None))
        meta_panels.append({"type": p.get("type", key), "key": key, "names": p["names"], "bin": size,
                            "columns": columns})
    fig.update_layout(
        template=TEMPLATE, height=plot_px + TOP_PX + BOTTOM_PX + 40, margin=dict(t=TOP_PX, b=BOTTOM_PX + 40),
        title=title,
        coloraxis=dict(colorscale=colorscale, cmin=low, cmax=high,
                       colorbar=dict(title=dict(text=colorbar_title(log, clip, zrange), font=dict(size=11)),
                                     thickness=14, len=min(1.0, 420 / plot_px) if plot_px > 420 else 1.0,
                                     y=1.0, yanchor="top")),
        meta={"rowsft": {"order": order, "max_columns": max_columns, "reduce": reduce, "log": log,
                         "zrange": [low, high], "clip": list(clip) if clip is not None and zrange is None else None,
                         "panels": meta_panels, **(meta or {})}})
    return fig


def importance_heatmap(scores, selection=None, module_type: str | None = None, order: str = "original",
                       max_columns: int = 256, reduce: str = "max", log: bool = False,
                       title: str | None = None, colorscale: str = "Viridis",
                       clip: tuple[float, float] | None = DEFAULT_CLIP,
                       zrange: tuple[float, float] | None = None) -> go.Figure:
    """Heatmap of importance scores: one panel per module type, y = block index, x = neuron.

    ``scores``: ``Scores``, dict name → tensor, or ``Scores.tidy()``. ``selection``: optional
    ``Selection`` (or dict name → indices) whose neurons are marked with thin red ticks. ``module_type``:
    draw only this type (e.g. ``"mlp.up_proj"`` or ``"up_proj"``). ``order``: ``"original"``
    (neuron ids) or ``"sorted"`` (by decreasing score within each block). ``log``: colour by
    ``log10(score)``. ``clip``: the percentiles the colour range is clipped to (default 1st–99th,
    ``None``: the full range); ``zrange``: an explicit ``(low, high)`` instead. Neuron binning
    (``max_columns``, ``reduce``) is described in the module help. All panels share one colour
    scale, which suits scores normalised per layer (``rowsft.score`` divides by the layer mean by
    default); use ``log=True`` for raw, heavy-tailed metrics.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    vectors, unit = score_vectors(scores)
    panels = panels_of_type(group_by_type(vectors), module_type)
    metric = getattr(scores, "metric", None)
    fig = _draw([{"key": t, "type": t, "title": t, "names": ns} for t, ns in panels.items()], vectors, order,
                max_columns, reduce, log, clip, zrange, colorscale,
                title or f"Importance ({metric or 'scores'}, unit {unit}, {order} order)",
                meta={"figure": "importance_heatmap"})
    if selection is not None:
        mark_selection(fig, scores, selection)
    return fig


def panels_of_type(groups: dict, module_type: str | None, where: str = "") -> dict:
    """``groups`` (module type → layer names) kept to ``module_type`` (all when None); a ValueError
    listing the types there when it has none."""
    if module_type is None:
        return groups
    wanted = {t: ns for t, ns in groups.items() if t == module_type_of(module_type)}
    if not wanted:
        raise ValueError(f"{where}no scores of module type {module_type!r}; types here: {list(groups)}")
    return wanted


def metric_heatmaps(scores_by_metric: dict, module_type: str | None = None, order: str = "sorted",
                    max_columns: int = 128, reduce: str = "max", log: bool = False, title: str | None = None,
                    colorscale: str = "Viridis", clip: tuple[float, float] | None = DEFAULT_CLIP,
                    zrange: tuple[float, float] | None = None, cols: int | None = None) -> go.Figure:
    """Several metrics' heatmaps side by side on **one** colour range (shared colour bar), so that
    their colours compare: ``{label: Scores}`` → one panel per metric (× module type).

    ``module_type``: one type (e.g. ``"up_proj"``) or ``None`` for all. ``order``: ``"sorted"`` by
    default (each block's scores in decreasing order). ``clip``/``zrange``: as in
    :func:`importance_heatmap`, over the values of every panel pooled. ``cols``: panels per row
    (default 2 for 4 or more panels, else 1).
    """
    if not scores_by_metric:
        raise ValueError("metric_heatmaps needs at least one score set: {label: Scores}")
    vectors: dict = {}
    panels = []
    for label, scores in scores_by_metric.items():
        v, _ = score_vectors(scores)
        groups = panels_of_type(group_by_type(v), module_type, f"{label}: ")
        for t, names in groups.items():
            key = f"{label} · {t}"          # vectors are keyed "label␟layer name"; the block index stays readable
            vectors.update({f"{label}\u241f{n}": v[n] for n in names})
            panels.append({"key": key, "type": t, "title": str(label) if len(groups) == 1 else key,
                           "names": [f"{label}\u241f{n}" for n in names]})
    cols = cols or (2 if len(panels) >= 4 else 1)
    what = f"{module_type_of(module_type)} " if module_type is not None else ""
    fig = _draw(panels, vectors, order, max_columns, reduce, log, clip, zrange, colorscale,
                title or f"{what}importance by metric ({order} order), one colour scale", cols=cols,
                meta={"figure": "metric_heatmaps"})
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
        _, x_cols, y, size, positions, _ = _panel(names, vectors, order, max_columns, "max")
        xs, ys, infos = [], [], []
        for r, name in enumerate(names):
            chosen = marks.get(name)
            if chosen is None or len(chosen) == 0:
                continue
            chosen = chosen[chosen < len(positions[name])]
            columns = column_of(positions[name][chosen], size, len(x_cols))   # heatmap column of each chosen neuron
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
