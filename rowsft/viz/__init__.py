"""Stage 6, figures: plotly builders for rowsft, pure functions from plain data to ``go.Figure``.

The library never imports plotly; this package and :mod:`rowsft.notebook` do, and importing
``rowsft.viz`` does not import ipywidgets. The widgets of :mod:`rowsft.notebook` draw these figures live.

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
- :func:`save_figure` — HTML (offline) or PNG/SVG/PDF (kaleido) in one call.
- :func:`as_widget` — a ``go.FigureWidget`` of any of them, for live updates in a notebook.
"""
from __future__ import annotations

from rowsft.scoring.agreement import spearman
from rowsft.targets import module_type as type_key  # the module-type vocabulary of the figures (one for the project)
from rowsft.viz.curves import metric_series, training_curves
from rowsft.viz.explorer import budget_explorer
from rowsft.viz.export import save_figure
from rowsft.viz.heatmap import bin_neurons, bin_size, importance_heatmap, mark_selection, selection_points
from rowsft.viz.memory_chart import COMPONENTS, memory_breakdown
from rowsft.viz.scores import metric_overlap, overlap_matrix, overlap_table, score_distributions
from rowsft.viz.style import TEMPLATE, as_widget, round_significant, selection_marks

__all__ = ["TEMPLATE", "budget_explorer", "COMPONENTS", "as_widget", "bin_neurons", "bin_size", "importance_heatmap", "mark_selection",
           "selection_points", "selection_marks", "score_distributions", "metric_overlap", "overlap_matrix",
           "overlap_table", "spearman", "memory_breakdown", "training_curves", "metric_series",
           "round_significant", "save_figure", "type_key"]
