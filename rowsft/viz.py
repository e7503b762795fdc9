"""Plotly figure builders for rowsft (``rowsft.viz``): pure functions from plain data to ``go.Figure``.

Usable without widgets: show them inline, or save with ``fig.write_html(...)``. The builders live in
:mod:`rowsft.notebook.figures` (one module each: heatmap, score distributions and overlaps, memory
chart, training curves); this module is their public name. Importing it needs plotly, not ipywidgets.
"""
from __future__ import annotations

from .notebook.figures import (COMPONENTS, TEMPLATE, as_widget, bin_neurons, bin_size, importance_heatmap,
                               mark_selection, memory_breakdown, metric_overlap, metric_series, overlap_matrix,
                               overlap_table, round_significant, score_distributions, selection_marks,
                               selection_points, spearman, training_curves, type_key)

__all__ = ["TEMPLATE", "COMPONENTS", "as_widget", "bin_neurons", "bin_size", "importance_heatmap", "mark_selection",
           "selection_points", "selection_marks", "score_distributions", "metric_overlap", "overlap_matrix",
           "overlap_table", "spearman", "memory_breakdown", "training_curves", "metric_series",
           "round_significant", "type_key"]
