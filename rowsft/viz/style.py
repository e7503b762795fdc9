"""Shared helpers of the figure builders: plain-data conversion, compact numbers, a small template.

Every builder accepts plain data (a ``Scores``, a dict of tensors/arrays, a tidy DataFrame, a
``Selection`` or a dict of index tensors, ``MemoryReport``-like objects with ``as_dict()``,
``History``-like objects) and turns it into numpy here, so that the builders never depend on the
classes of the core modules, only on their documented shapes.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import plotly.graph_objects as go

from rowsft.targets import layer_index as _layer_index
from rowsft.targets import module_type

MIB = 2 ** 20   # every memory figure is in MiB (binary), never SI MB/GB

FONT = "Arial, Liberation Sans, DejaVu Sans, sans-serif"   # Liberation Sans: Arial's metrics where Arial is missing
# Colours of series that are not one of SERIES_COLORS' names, in order (also the template's colorway).
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f"]

# A few-line template instead of plotly's default one (~6.5 kB of JSON repeated in every saved figure).
# Axis titles and tick labels are pushed clear of each other (automargin), titles sit top left.
TEMPLATE = go.layout.Template(layout=dict(
    font=dict(family=FONT, size=12, color="#222222"), plot_bgcolor="white", paper_bgcolor="white",
    title=dict(x=0.01, xanchor="left", font=dict(size=15)), colorway=PALETTE,
    xaxis=dict(showgrid=True, gridcolor="#eeeeee", zeroline=False, linecolor="#444444", automargin=True, ticks="outside"),
    yaxis=dict(showgrid=True, gridcolor="#eeeeee", zeroline=False, linecolor="#444444", automargin=True, ticks="outside"),
    hovermode="closest", margin=dict(l=60, r=20, t=60, b=50)))

# One colour per method and per importance metric, the same in every figure. A series is coloured by
# the metric its name mentions, else by the method (``"row · taylor"`` → taylor, ``"LoRA r=8"`` → LoRA,
# ``"rows k=16"`` → row); names that mention neither take the next free colour of PALETTE.
SERIES_COLORS = {
    # methods (trainable units and baselines)
    "row": "#1f77b4", "column": "#17becf", "element": "#9467bd", "group": "#3b4cc0", "lean": "#6baed6",
    "lora": "#ff7f0e", "full": "#d62728", "zero-shot": "#555555",
    # importance metrics
    "taylor": "#2ca02c", "magnitude": "#8c564b", "wanda": "#e377c2", "random": "#7f7f7f",
    "activation": "#bcbd22", "zo-taylor": "#74c476", "fisher": "#637939", "hessian": "#ad494a",
    "gradient": "#843c39", "snip": "#a55194", "synflow": "#5254a3", "grasp": "#e7969c", "force": "#8ca252",
    "taylor-fo": "#31a354",
}
METRIC_KEYS = ("zo-taylor", "taylor-fo", "taylor", "magnitude", "wanda", "random", "activation", "fisher",
               "hessian", "gradient", "snip", "synflow", "grasp", "force")
METHOD_ALIASES = {"row": "row", "rows": "row", "rowsft": "row", "column": "column", "columns": "column",
                  "col": "column", "element": "element", "elements": "element", "speft": "element",
                  "group": "group", "groups": "group", "lean": "lean", "lora": "lora", "peft": "lora",
                  "full": "full", "zero": "zero-shot"}

SIGNIFICANT_DIGITS = 4


def as_widget(fig: go.Figure) -> go.FigureWidget:
    """The figure as an interactive ``go.FigureWidget`` (needs ``anywidget``), for in-place updates."""
    if isinstance(fig, go.FigureWidget):
        return fig
    try:
        return go.FigureWidget(fig)
    except ImportError as e:
        raise ImportError(f"as_widget needs anywidget and ipywidgets ({e}); install them with "
                          "pip install 'rowsft[notebook]', or show the plain figure instead") from None


def round_significant(values, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """float32 copy of ``values`` rounded to ``digits`` significant digits (NaN and inf kept).

    Keeps hover labels readable and saved figures compressible; plotly stores the array as
    base64 float32, 4 bytes a value.
    """
    x = np.asarray(values, dtype=np.float64)
    out = x.copy()
    finite = np.isfinite(x) & (x != 0)
    magnitude = np.floor(np.log10(np.abs(x[finite])))
    scale = 10.0 ** (digits - 1 - magnitude)
    out[finite] = np.round(x[finite] * scale) / scale
    return out.astype(np.float32)


def series_key(name: str) -> str | None:
    """The :data:`SERIES_COLORS` key a series name refers to: the metric it mentions, else its method."""
    text = str(name).lower().replace("_", "-")
    for key in METRIC_KEYS:           # longest first: "zo-taylor" before "taylor"
        if re.search(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", text):
            return key
    for token in re.split(r"[^a-z0-9]+", text):
        if token in METHOD_ALIASES:
            return METHOD_ALIASES[token]
    return None


def series_colors(names) -> dict[str, str]:
    """``{name: colour}``: each name's fixed colour (:func:`series_key`), distinct within the figure;
    a name without a fixed colour, or whose colour another name took first, gets the next free one."""
    names = list(dict.fromkeys(str(n) for n in names))
    out: dict[str, str] = {}
    for name in names:
        key = series_key(name)
        if key is not None and SERIES_COLORS[key] not in out.values():
            out[name] = SERIES_COLORS[key]
    free = [c for c in PALETTE + list(SERIES_COLORS.values()) if c not in out.values()]
    for name in names:
        if name not in out:
            out[name] = free.pop(0) if free else PALETTE[len(out) % len(PALETTE)]
    return {name: out[name] for name in names}


def block_dtick(count: int) -> int:
    """Tick step of a block axis of ``count`` blocks: 1 up to 12 blocks, then 2, 5, 10 (integers only)."""
    for step in (1, 2, 5, 10, 20, 50):
        if count <= 12 * step:
            return step
    return 100


def block_axis(count: int, title: str | None = "block") -> dict:
    """Axis settings of a block-index axis: integer ticks only (never -0.5, 0.5, ...)."""
    axis = dict(tickmode="linear", tick0=0, dtick=block_dtick(count), tickformat="d")
    if title is not None:
        axis["title_text"] = title
    return axis


def nice_step(span: float, target: int = 6) -> float:
    """A 1-2-5 step that cuts ``span`` into about ``target`` intervals."""
    if not np.isfinite(span) or span <= 0:
        return 1.0
    raw = span / max(1, target)
    magnitude = 10.0 ** np.floor(np.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)


def mib_axis(max_bytes: float, title: str = "memory (MiB)", headroom: float = 1.15) -> dict:
    """A y axis for data in *bytes* that reads in MiB (2**20 bytes): ticks at round MiB values labelled
    in MiB (no SI "MB"/"GB" suffix), range from 0 to ``headroom`` × ``max_bytes``."""
    top = max(float(max_bytes), 1.0) * headroom / MIB
    step = nice_step(top)
    ticks = np.arange(0.0, top + step / 2, step)
    decimals = max(0, -int(np.floor(np.log10(step)))) if step < 1 else 0
    return dict(title_text=title, tickmode="array", tickvals=(ticks * MIB).tolist(),
                ticktext=[f"{t:,.{decimals}f}" for t in ticks], range=[0.0, top * MIB])


def reference_line(fig: go.Figure, y: float, text: str, color: str = "#555555", dash: str = "dash",
                   row: int | None = None, col: int | None = None) -> go.Figure:
    """A horizontal reference line (e.g. "random picks") whose label sits just right of the plot
    area, outside it, so that it never covers a bar or a point; in place, returns ``fig``.
    ``row``/``col``: the panel of a figure made with subplots."""
    yref, right = "y", 1.0
    if row is not None:
        subplot = fig.get_subplot(row, col or 1)
        yref = "y" + subplot.yaxis.plotly_name[len("yaxis"):]
        right = subplot.xaxis.domain[1]
        fig.add_hline(y=y, line=dict(color=color, dash=dash, width=1.2), row=row, col=col or 1)
    else:
        fig.add_hline(y=y, line=dict(color=color, dash=dash, width=1.2))
    fig.add_annotation(x=right, xref="paper", xanchor="left", xshift=4, y=y, yref=yref, text=text,
                       showarrow=False, font=dict(size=11, color=color))
    margin = fig.layout.margin.r if fig.layout.margin.r is not None else TEMPLATE.layout.margin.r
    fig.update_layout(margin_r=max(margin, 12 + 7 * len(text)))
    return fig


def compact_count(n: float) -> str:
    """3_190_000 → '3.19 M', 2_400_000 → '2.4 M', 12_300 → '12.3 k', 950 → '950'."""
    n = float(n)
    for size, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.0f}"


def to_numpy(value) -> np.ndarray:
    """A tensor, list or array as a float64 numpy array (CPU, detached)."""
    if hasattr(value, "detach"):
        value = value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float64)


def layer_of(name: str) -> int | None:
    return _layer_index(name)


def score_vectors(scores) -> tuple[dict[str, np.ndarray], str]:
    """``{name: 1-D score vector}`` and the unit, from a ``Scores``, a dict, or a tidy DataFrame.

    Element scores ``(d_out, d_in)`` are reduced to one value per row (their mean over ``d_in``),
    so that every layer is one heatmap row of neurons.
    """
    unit = getattr(scores, "unit", None)
    if _is_dataframe(scores):
        missing = {"layer", "neuron", "score"} - set(scores.columns)
        if missing:
            raise ValueError(f"the score table lacks the columns {sorted(missing)}; pass Scores.tidy() "
                             "(columns layer, module_type, layer_index, neuron, score)")
        out = {}
        for layer, part in scores.groupby("layer", sort=False):
            part = part.sort_values("neuron")
            out[str(layer)] = part["score"].to_numpy(dtype=np.float64)
        return _check_vectors(out), unit or "row"
    if not isinstance(scores, Mapping):
        raise TypeError(f"expected Scores, a dict name → tensor or a tidy DataFrame, got {type(scores).__name__}")
    out = {}
    for name, value in scores.items():
        arr = to_numpy(value)
        if arr.ndim == 2:
            arr = arr.mean(axis=1)
            unit = unit or "element"
        elif arr.ndim != 1:
            raise ValueError(f"scores of {name!r} have shape {arr.shape}; expected (n,) or (d_out, d_in)")
        out[str(name)] = arr
    return _check_vectors(out), unit or "row"


def _check_vectors(out: dict) -> dict:
    if not out:
        raise ValueError("the scores are empty: score at least one layer before plotting")
    return out


def _is_dataframe(value) -> bool:
    return hasattr(value, "columns") and hasattr(value, "groupby")


def group_by_type(names) -> dict[str, list[str]]:
    """Names grouped by `rowsft.targets.module_type` (first-seen order), each sorted by block index."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(module_type(name), []).append(name)
    big = 10 ** 9
    return {t: sorted(ns, key=lambda n: (layer_of(n) if layer_of(n) is not None else big, n))
            for t, ns in groups.items()}


def selection_marks(selection, scores=None) -> dict[str, np.ndarray]:
    """Chosen neuron ids per *score* name: ``{name: sorted int array}``.

    ``selection``: a ``Selection``, a dict name → indices, or ``None``. For row/column scores the
    indices are used as they are. For group scores (``scores.groups``), a group's neurons are read
    back from the indices of its first member that the selection covers. Element selections mark
    the rows that hold at least one chosen weight.
    """
    if selection is None:
        return {}
    groups = getattr(scores, "groups", None) or {}
    layers = getattr(selection, "layers", None)
    out: dict[str, np.ndarray] = {}
    for name in selection:
        idx = to_numpy(selection[name]).astype(np.int64).reshape(-1)
        if layers is not None and name in layers and layers[name].unit == "element":
            idx = np.unique(idx // int(layers[name].shape[1]))
        out[str(name)] = np.unique(idx)
    for gname, group in groups.items():
        for member in getattr(group, "members", ()):
            if member.module in out:
                out[gname] = _member_to_neurons(member, out[member.module], group.size)
                break
    return out


def _member_to_neurons(member, indices: np.ndarray, size: int) -> np.ndarray:
    """Invert ``GroupMember.indices``: neuron ids whose row/column blocks contain ``indices``."""
    offsets = np.asarray(sorted(member.offsets))
    base = offsets[np.searchsorted(offsets, indices, side="right") - 1]
    neurons = (indices - base) // int(member.block)
    return np.unique(neurons[(neurons >= 0) & (neurons < size)])


def report_dict(report) -> dict[str, float]:
    """Numeric fields of a ``MemoryReport``-like object (``as_dict()``) or a dict of bytes, as
    disjoint parts that add up to the total (``total`` itself left out).

    ``rowsft.memory.MemoryReport`` counts ``trainable`` inside ``weights`` (and its ``total`` leaves it
    out); when the fields say so (``total`` equals the sum without ``trainable``), ``weights`` becomes
    the frozen part, ``weights - trainable``, so that stacked parts never count a byte twice.
    """
    if hasattr(report, "as_dict"):
        report = report.as_dict()
    if not isinstance(report, Mapping):
        raise TypeError(f"expected a MemoryReport (with as_dict()) or a dict of bytes, got {type(report).__name__}")
    parts = {str(k): float(v) for k, v in report.items() if k != "total" and _is_number(v)}
    total = report.get("total")
    trainable = parts.get("trainable", 0.0)
    if _is_number(total) and trainable and "weights" in parts \
            and abs(sum(parts.values()) - trainable - float(total)) <= 0.5:
        parts["weights"] -= trainable
    return parts


def run_records(run) -> tuple[list[dict], list[dict]]:
    """``(steps, evals)`` lists of dicts from a ``History``, its ``to_dict()``, a list of dicts or a DataFrame."""
    if hasattr(run, "steps") and not isinstance(run, Mapping):
        return list(run.steps), list(getattr(run, "evals", []) or [])
    if isinstance(run, Mapping):
        return list(run.get("steps", [])), list(run.get("evals", []) or [])
    if _is_dataframe(run):
        return run.to_dict("records"), []
    if isinstance(run, (list, tuple)):
        return [dict(r) for r in run], []
    raise TypeError(f"expected a History, History.to_dict(), a list of step dicts or a DataFrame, got {type(run).__name__}")


# rowsft.memory.MemoryCallback puts its figures in ``state.memory`` ("total", "peak_measured", ...) and
# in the History step records as "memory_<part>"; "total" is there every step, the measured peak only
# on measured steps, so curves use the total.
MEMORY_KEYS = ("memory", "total", "memory_total", "peak", "peak_bytes", "allocated", "memory_allocated")


def memory_value(record: Mapping) -> float | None:
    """The memory figure (bytes) of one logged step: the first of :data:`MEMORY_KEYS` present,
    else the largest value whose key mentions memory/bytes/peak; ``None`` when there is none."""
    for key in MEMORY_KEYS:
        value = record.get(key)
        if isinstance(value, Mapping):
            value = memory_value(value)
        if _is_number(value):
            return float(value)
    candidates = [float(v) for k, v in record.items()
                  if _is_number(v) and any(w in str(k).lower() for w in ("memory", "bytes", "peak"))]
    return max(candidates) if candidates else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and np.isfinite(float(value))
