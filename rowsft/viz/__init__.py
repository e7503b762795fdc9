"""Stage 6, figures: plotly builders for rowsft, pure functions from plain data to ``go.Figure``.

The library never imports plotly; this package and :mod:`rowsft.notebook` do, and importing
``rowsft.viz`` does not import ipywidgets. The widgets of :mod:`rowsft.notebook` draw these figures live.

Usable without widgets: show them inline, or save with ``save_figure(fig, "figure.html")`` /
``save_figure(fig, "figure.png")`` (PNG needs kaleido and a Chromium). Each builder takes plain
data — ``Scores`` (or a dict name → tensor, or ``Scores.tidy()``), ``Selection`` (or dict name → indices),
``MemoryReport``-like objects (``as_dict()``) and ``History``-like runs — and returns a figure:

- :func:`importance_heatmap` — block × neuron per module type, chosen neurons marked; wide layers
  binned into ≤ ``max_columns`` columns (max or mean per bin); colours clipped to percentiles
  (1st–99th by default); :func:`mark_selection` moves the marks.
- :func:`metric_heatmaps` — several metrics' heatmaps on one shared colour range.
- :func:`score_distributions` — box per block and module type.
- :func:`metric_overlap` / :func:`overlap_matrix` — do two metrics pick the same neurons?
- :func:`memory_breakdown` — stacked memory per method in MiB (weights in grey, trainable, gradients,
  optimizer, activations, indices), measured peaks, the trainable budget in the labels when it differs.
- :func:`training_curves` — loss / accuracy / memory of several runs: running mean over faint raw
  points, held-out points, resumed runs on cumulative steps (``continue_from``).
- :func:`lr_range_figure` — loss against learning rate of `rowsft.lr_range_test`.
- :func:`save_figure` — HTML (offline) or PNG/SVG/PDF (kaleido driving a local Chromium) in one call;
  ``rowsft.viz.export.static_renderer`` stores a PNG beside each figure in executed notebooks.
- :func:`as_widget` — a ``go.FigureWidget`` of any of them, for live updates in a notebook.

One style for all (:mod:`rowsft.viz.style`): the small :data:`TEMPLATE`, one colour per method and
metric kept across figures (:data:`SERIES_COLORS`, :func:`series_colors`), memory in MiB (2**20 bytes,
:func:`mib_axis`), whole-number block ticks (:func:`block_axis`), reference lines labelled outside
the plot (:func:`reference_line`).
"""
from __future__ import annotations

from rowsft.scoring.agreement import spearman
from rowsft.targets import module_type as type_key  # the module-type vocabulary of the figures (one for the project)
from rowsft.viz.curves import metric_series, training_curves
from rowsft.viz.explorer import budget_explorer
from rowsft.viz.export import save_figure
from rowsft.viz.heatmap import (bin_neurons, bin_size, color_range, importance_heatmap, mark_selection, metric_heatmaps,
                                selection_points)
from rowsft.viz.lr_range import lr_range_figure
from rowsft.viz.memory_chart import COMPONENTS, memory_breakdown
from rowsft.viz.scores import metric_overlap, overlap_matrix, overlap_table, score_distributions
from rowsft.viz.style import (MIB, SERIES_COLORS, TEMPLATE, as_widget, block_axis, mib_axis, reference_line,
                              round_significant, selection_marks, series_colors)

__all__ = ["TEMPLATE", "budget_explorer", "COMPONENTS", "as_widget", "bin_neurons", "bin_size", "importance_heatmap", "mark_selection",
           "selection_points", "selection_marks", "score_distributions", "metric_overlap", "overlap_matrix",
           "overlap_table", "spearman", "memory_breakdown", "training_curves", "metric_series",
           "round_significant", "save_figure", "type_key", "lr_range_figure", "metric_heatmaps", "color_range",
           "MIB", "SERIES_COLORS", "series_colors", "block_axis", "mib_axis", "reference_line"]
