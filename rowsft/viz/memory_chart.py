"""Training memory of several methods side by side, as stacked bars.

One bar per method (row-sparse, LoRA, full fine-tuning, ...), one coloured segment per component
of a ``MemoryReport``: weights (grey), trainable, gradients, optimizer, activations, indices (and
``transient``, the logits' peak, when reported). Segment heights are the reported bytes, unchanged,
except that a report counting ``trainable`` inside ``weights`` (``rowsft.memory.MemoryReport``) shows
``weights`` as its frozen part so the bar's height is the report's ``total``.

A method that trains its weights in place (every weight trainable, no frozen part: full
fine-tuning) keeps a grey "weights" segment too, with the "trainable" segment drawn over it,
hatched, rather than stacked: the bar reads "these weights, all of them trained" and its height
stays the total. The y axis is in MiB (2**20 bytes; tick labels in MiB, no SI "MB"/"GB"); each
bar's total is written above it, clear of the measured-peak marker (a black diamond) when there is
one. When the methods train different numbers of parameters, each bar's label says how many (from
``trainable_parameters``, else the reports' own count, else the trainable MiB).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import plotly.graph_objects as go

from rowsft.viz.style import MIB, TEMPLATE, compact_count, mib_axis, report_dict

COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations", "indices", "transient")
COMPONENT_COLORS = {"weights": "#9e9e9e", "trainable": "#1f77b4", "gradients": "#ff7f0e",
                    "optimizer": "#d62728", "activations": "#2ca02c", "indices": "#9467bd", "transient": "#bcbd22"}
COUNT_KEYS = ("trainable_parameters", "trainable_params")
IN_PLACE_TINT = "rgba(31, 119, 180, 0.35)"   # the trainable colour, see-through: the grey weights show under it
LABEL_GAP_PX = 10          # between the top of a bar (or of its measured-peak marker) and its total label


def _count_of(report) -> float | None:
    """The trainable-parameter count a report carries (attribute, dict key or ``details``), if any."""
    for key in COUNT_KEYS:
        value = getattr(report, key, None) if not isinstance(report, Mapping) else report.get(key)
        if value is None and isinstance(getattr(report, "details", None), Mapping):
            value = report.details.get(key)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            return float(value)
    return None


def _named_reports(reports) -> tuple[dict[str, dict[str, float]], dict[str, float | None]]:
    """``({method: {component: bytes}}, {method: trainable parameters or None})`` from a dict of
    reports or a list of reports with ``.method``."""
    if isinstance(reports, Mapping) and not hasattr(reports, "as_dict") \
            and not all(isinstance(v, (int, float)) for v in reports.values()):
        named = dict(reports)
    else:
        items = [reports] if hasattr(reports, "as_dict") or isinstance(reports, Mapping) else list(reports)
        named = {}
        for i, r in enumerate(items):
            name = getattr(r, "method", None) or (r.get("method") if isinstance(r, Mapping) else None) or f"method {i + 1}"
            named[str(name)] = r
    if not named:
        raise ValueError("no memory report to draw: pass {method: MemoryReport} or a list of MemoryReports")
    counts = {name: _count_of(r) for name, r in named.items()}
    table = {}
    for name, r in named.items():
        parts = report_dict({k: v for k, v in r.items() if k not in COUNT_KEYS} if isinstance(r, Mapping) else r)
        table[name] = {k: v for k, v in parts.items() if k not in COUNT_KEYS}
    return table, counts


def trains_in_place(parts: Mapping[str, float]) -> bool:
    """True when a report has trainable bytes and no frozen weights (full fine-tuning)."""
    return parts.get("trainable", 0.0) > 0 and parts.get("weights", 0.0) == 0


def bar_labels(table: dict, counts: dict, trainable_parameters: Mapping[str, float] | None = None) -> dict[str, str]:
    """Each method's x label: its name, and its trainable budget when the methods' budgets differ."""
    counts = {m: (float(trainable_parameters[m]) if trainable_parameters and m in trainable_parameters else counts.get(m))
              for m in table}
    if all(c is not None for c in counts.values()):
        budgets = {m: f"{compact_count(c)} trainable" for m, c in counts.items()}
        differ = len(set(counts.values())) > 1
    else:
        trainable = {m: table[m].get("trainable", 0.0) for m in table}
        budgets = {m: f"{t / MIB:,.1f} MiB trainable" for m, t in trainable.items()}
        differ = len(set(trainable.values())) > 1
    if not differ:
        return {m: m for m in table}
    return {m: f"{m}<br>{budgets[m]}" + ("<br>(all weights)" if trains_in_place(table[m]) else "") for m in table}


def memory_breakdown(reports, measured: Mapping[str, float] | None = None, components=COMPONENTS,
                     title: str | None = None, trainable_parameters: Mapping[str, float] | None = None) -> go.Figure:
    """Stacked bars of training memory per method; heights are bytes, the axis reads in MiB.

    ``reports``: ``{method: MemoryReport | dict of bytes}`` or a list of ``MemoryReport`` (named by
    their ``.method``). ``measured``: optional ``{method: peak bytes}`` drawn as diamonds.
    ``components``: stacking order; numeric fields not listed are stacked after them ("total" is
    never stacked: it is the bar's height). ``trainable_parameters``: optional ``{method: count}``
    for the bar labels (a report's own ``trainable_parameters`` is used when it has one).
    """
    table, counts = _named_reports(reports)
    methods = list(table)
    extra = [k for r in table.values() for k in r if k not in components]
    order = list(components) + list(dict.fromkeys(extra))
    in_place = {m: trains_in_place(table[m]) for m in methods}
    fig = go.Figure()
    level = np.zeros(len(methods))                            # top of the stack so far, per method
    weights_base = np.zeros(len(methods))
    for component in order:
        y = np.array([table[m].get(component, 0.0) for m in methods], dtype=np.float64)
        shown = y.copy()
        if component == "weights":                            # in-place methods: their weights are the trainable ones
            shown = np.array([table[m].get("trainable", 0.0) if in_place[m] else v for m, v in zip(methods, y)])
        if not np.any(y) and not np.any(shown) and (component not in COMPONENTS or component == "transient"):
            continue
        base = level.copy()
        color = COMPONENT_COLORS.get(component)
        marker: dict = dict(color=color, line=dict(width=0))
        hover = [f"{component}: {v / MIB:,.2f} MiB" for v in shown]
        if component == "trainable":
            overlay = [i for i, m in enumerate(methods) if in_place[m]]
            for i in overlay:                                 # hatched over the grey weights, not stacked
                base[i] = weights_base[i]
                hover[i] = f"trainable: {y[i] / MIB:,.2f} MiB (all of the weights, trained in place)"
            if overlay:                                       # tinted blue over the grey, outlined, hatched
                marker = dict(color=[(IN_PLACE_TINT if in_place[m] else color) for m in methods],
                              line=dict(width=[2.0 if in_place[m] else 0 for m in methods], color=color),
                              pattern=dict(shape=["/" if in_place[m] else "" for m in methods], size=9, solidity=0.15))
        if component == "weights":
            weights_base = base.copy()
            hover = [f"weights: {v / MIB:,.2f} MiB" + (" (all trainable)" if in_place[m] else " (frozen)")
                     for m, v in zip(methods, shown)]
        fig.add_trace(go.Bar(x=methods, y=y if component == "trainable" else shown, base=base, name=component,
                             marker=marker, customdata=hover, hovertemplate="%{x}<br>%{customdata}<extra></extra>"))
        stacked = y if component != "trainable" else np.array([0.0 if in_place[m] else v for m, v in zip(methods, y)])
        level = level + (shown if component != "trainable" else stacked)
    totals = level
    tops = totals.copy()
    if measured:
        unknown = set(measured) - set(methods)
        if unknown:
            raise ValueError(f"measured peaks for {sorted(unknown)} have no report; methods here: {methods}")
        xs = [m for m in methods if m in measured]
        peaks = [float(measured[m]) for m in xs]
        fig.add_trace(go.Scatter(x=xs, y=peaks, mode="markers", name="measured peak",
                                 marker=dict(symbol="diamond", color="black", size=10, line=dict(width=1, color="white")),
                                 customdata=np.round(np.array(peaks) / MIB, 2),
                                 hovertemplate="%{x}<br>measured peak: %{customdata:,} MiB<extra></extra>"))
        for m, p in zip(xs, peaks):
            i = methods.index(m)
            tops[i] = max(tops[i], p)
    for m, total, top in zip(methods, totals, tops):
        clear = LABEL_GAP_PX + (6 if measured and m in measured else 0)     # above the diamond's top half
        fig.add_annotation(x=m, y=top, text=f"{total / MIB:,.1f} MiB", showarrow=False, yanchor="bottom",
                           yshift=clear, font=dict(size=11, color="#222222"))
    labels = bar_labels(table, counts, trainable_parameters)
    fig.update_layout(template=TEMPLATE, barmode="overlay", bargap=0.35, title=title or "Training memory per method",
                      yaxis=mib_axis(max(tops.max(initial=0.0), 1.0), headroom=1.18),
                      xaxis=dict(tickmode="array", tickvals=methods, ticktext=[labels[m] for m in methods],
                                 showgrid=False, tickangle=0),
                      width=max(560, 150 * len(methods) + 260),
                      legend=dict(traceorder="reversed"),          # top of the legend = top of the stack
                      meta={"rowsft": {"figure": "memory_breakdown", "totals": [float(t) for t in totals],
                                       "in_place": [m for m in methods if in_place[m]]}})
    return fig
