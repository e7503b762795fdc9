"""ipywidgets controls for rowsft, built on the figures of ``rowsft.viz``.

They hold no training logic: they call rowsft's verbs (score, select, memory.predict, apply,
train) and render what the training callbacks report. Each piece works alone:

- :class:`LayerPicker` — module types × blocks, with "all attention" / "all MLP" shortcuts;
- :class:`BudgetControl` — rows per layer, ratio or LoRA-rank parity; trainable parameters,
  predicted memory against LoRA and full fine-tuning, heatmap marks;
- :class:`MetricChooser` — metric and unit, re-scored on a button press, with a progress bar;
- :class:`LiveCurves` — loss and memory per step of several runs, throttled live updates;
- :class:`TrainLauncher` — Launch / Stop around ``rowsft.train`` in a background thread;
- :class:`ExplorerPanel` — the budget explorer: short fine-tunes over budgets, accuracy with intervals;
- :class:`AdaptersPanel` — keep trained updates under names, switch between them, compare two
  (``keep_adapter`` / ``use_adapter`` / ``use_none`` / ``compare_adapters``: the same, without widgets);
- :class:`Dashboard` — all of them composed for one model and data set.

Bad input shows a red line in the control's status area, never a traceback. For notebooks,
:func:`fast_mode` reads ``ROWSFT_FAST`` and :func:`settings` gives the model, steps and rows to use.

Saved notebooks: plotly's ``FigureWidget`` (an anywidget) carries plotly.js (about 5 MB) in its
widget state. JupyterLab does not save widget state unless asked to, but ``jupyter nbconvert
--execute`` does; the dashboard uses three FigureWidgets (heatmap, predicted memory, live curves),
so clear the widget state before committing an executed notebook. Static figures from
``rowsft.viz`` carry only their data (float32, rounded).
"""
from __future__ import annotations

from rowsft._lazy import lazy_exports

# imported at once (no widgets there); the function ``settings`` must shadow its submodule's name for good
from rowsft.notebook.settings import FAST_SETTINGS, FULL_SETTINGS, NotebookSettings, fast_mode, settings

# name -> submodule of the widgets, imported on first use, so that ``rowsft.viz`` (and
# ``rowsft.viz``) need plotly but not ipywidgets
_NAMES = {"StatusArea": "_widgets", "BudgetControl": "budget", "Dashboard": "dashboard", "as_batches": "dashboard",
          "RunSummary": "launcher", "TrainLauncher": "launcher", "LayerPicker": "layer_picker",
          "CurveCallback": "live", "LiveCurves": "live", "CountingBatches": "metric", "MetricChooser": "metric",
          "ExplorerPanel": "explorer", "AdaptersPanel": "adapters", "KeptAdapter": "kept_adapters",
          "keep_adapter": "kept_adapters", "use_adapter": "kept_adapters", "use_none": "kept_adapters",
          "compare_adapters": "kept_adapters", "comparison_text": "kept_adapters"}

__all__ = ["AdaptersPanel", "BudgetControl", "CountingBatches", "CurveCallback", "Dashboard", "ExplorerPanel",
           "FAST_SETTINGS", "FULL_SETTINGS", "KeptAdapter", "LayerPicker", "LiveCurves", "MetricChooser",
           "NotebookSettings", "RunSummary", "StatusArea", "TrainLauncher", "as_batches", "compare_adapters",
           "comparison_text", "fast_mode", "keep_adapter", "settings", "use_adapter", "use_none"]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _NAMES)
