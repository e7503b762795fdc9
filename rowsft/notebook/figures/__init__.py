"""Plotly figure builders for rowsft: pure functions from plain data to ``go.Figure``; the public
face is :mod:`rowsft.viz`, which re-exports them. They live beside the widgets that draw them live
because the project keeps plotly and ipywidgets out of the core package: only ``rowsft/viz.py`` and
``rowsft/notebook/`` may import them (importing this subpackage does not import ipywidgets).

Usable without widgets: show them inline, or save with ``fig.write_html(...)`` /
``fig.write_image(...)`` (PNG needs kaleido). Each builder takes plain data — ``Scores`` (or a
dict name → tensor, or ``Scores.tidy()``), ``Selection`` (or dict name → indices),
``MemoryReport``-like objects (``as_dict()``) and ``History``-like runs — and returns a figure:

- :func:`importance_heatmap` — block × neuron per module type, chosen neurons marked; wide layers
  binned into ≤ ``max_columns`` columns (max or mean per bin); :func:`mark_selection` moves the marks.
- :func:`score_distributions` — box per block and module type.
- :func:`metric_overlap` / :func:`overlap_matrix` — do two metrics pick the same neurons?
- :func:`memory_breakdown` — stacked bytes per method (weights, trainable, gradients, optimizer,
  activations, indices).
- :func:`training_curves` — loss / accuracy / memory of several runs.
- :func:`as_widget` — a ``go.FigureWidget`` of any of them, for live updates in a notebook.
"""
from ._common import TEMPLATE, as_widget, round_significant, selection_marks, type_key
from .curves import metric_series, training_curves
from .heatmap import bin_neurons, bin_size, importance_heatmap, mark_selection, selection_points
from .memory_chart import COMPONENTS, memory_breakdown
from .scores import metric_overlap, overlap_matrix, overlap_table, score_distributions, spearman

__all__ = ["TEMPLATE", "COMPONENTS", "as_widget", "bin_neurons", "bin_size", "importance_heatmap", "mark_selection",
           "selection_points", "selection_marks", "score_distributions", "metric_overlap", "overlap_matrix",
           "overlap_table", "spearman", "memory_breakdown", "training_curves", "metric_series",
           "round_significant", "type_key"]
