"""Training memory of several methods side by side, as stacked bars of bytes.

One bar per method (row-sparse, LoRA, full fine-tuning, ...), one coloured segment per component
of a ``MemoryReport``: weights, trainable, gradients, optimizer, activations, indices (and
``transient``, the logits' peak, when reported). Segment heights are the reported bytes, unchanged,
except that a report counting ``trainable`` inside ``weights`` (``rowsft.memory.MemoryReport``) shows
``weights`` as its frozen part so the bar's height is the report's ``total``. The axis prints bytes
with SI prefixes (kB, MB, GB), hover labels in MiB. A measured peak per method can be overlaid as a
black diamond.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import plotly.graph_objects as go

from rowsft.viz.style import TEMPLATE, report_dict

COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "activations", "indices", "transient")
COMPONENT_COLORS = {"weights": "#9e9e9e", "trainable": "#1f77b4", "gradients": "#ff7f0e",
                    "optimizer": "#d62728", "activations": "#2ca02c", "indices": "#9467bd", "transient": "#bcbd22"}
MIB = 2 ** 20


def _named_reports(reports) -> dict[str, dict[str, float]]:
    """``{method: {component: bytes}}`` from a dict of reports or a list of reports with ``.method``."""
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
    return {name: report_dict(r) for name, r in named.items()}


def memory_breakdown(reports, measured: Mapping[str, float] | None = None, components=COMPONENTS,
                     title: str | None = None) -> go.Figure:
    """Stacked bars of training memory per method; heights are bytes.

    ``reports``: ``{method: MemoryReport | dict of bytes}`` or a list of ``MemoryReport`` (named by
    their ``.method``). ``measured``: optional ``{method: peak bytes}`` drawn as diamonds.
    ``components``: stacking order; numeric fields not listed are stacked after them ("total" is
    never stacked: it is the bar's height).
    """
    table = _named_reports(reports)
    methods = list(table)
    extra = [k for r in table.values() for k in r if k not in components]
    order = list(components) + list(dict.fromkeys(extra))
    fig = go.Figure()
    for component in order:
        y = np.array([table[m].get(component, 0.0) for m in methods], dtype=np.float64)
        if not np.any(y) and (component not in COMPONENTS or component == "transient"):
            continue
        fig.add_trace(go.Bar(x=methods, y=y, name=component, marker_color=COMPONENT_COLORS.get(component),
                             customdata=np.round(y / MIB, 2),
                             hovertemplate="%{x}<br>" + component + ": %{customdata} MiB<extra></extra>"))
    totals = [sum(table[m].values()) for m in methods]
    fig.add_trace(go.Scatter(x=methods, y=totals, mode="text", text=[f"{t / MIB:,.1f} MiB" for t in totals],
                             textposition="top center", showlegend=False, hoverinfo="skip", name="total"))
    if measured:
        unknown = set(measured) - set(methods)
        if unknown:
            raise ValueError(f"measured peaks for {sorted(unknown)} have no report; methods here: {methods}")
        xs = [m for m in methods if m in measured]
        peaks = [float(measured[m]) for m in xs]
        fig.add_trace(go.Scatter(x=xs, y=peaks, mode="markers", name="measured peak",
                                 marker=dict(symbol="diamond", color="black", size=11),
                                 customdata=np.round(np.array(peaks) / MIB, 2),
                                 hovertemplate="%{x}<br>measured peak: %{customdata} MiB<extra></extra>"))
    fig.update_layout(template=TEMPLATE, barmode="stack", title=title or "Training memory per method",
                      yaxis=dict(title="bytes", tickformat=".3s", ticksuffix="B", rangemode="tozero"),
                      legend=dict(traceorder="normal"))
    return fig
