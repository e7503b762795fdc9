"""Where the memory of a fine-tuning step goes: an analytic breakdown, a fast prediction, a measurement,
and a training callback that records them step by step.

- :mod:`rowsft.memory.report`: ``MemoryReport``, ``breakdown`` (one counted forward), ``static_report``;
- :mod:`rowsft.memory.prediction`: ``predict`` from shapes alone (milliseconds, for sliders);
- :mod:`rowsft.memory.measure`: ``measure_peak`` from PyTorch's own allocation accounting;
- :mod:`rowsft.memory.callback`: ``MemoryCallback`` for ``rowsft.train``.
"""
from __future__ import annotations

from rowsft.memory.callback import MemoryCallback
from rowsft.memory.measure import cpu_peak, live_bytes, measure_peak, region_peak, unique_storage_bytes
from rowsft.memory.prediction import PREDICTOR_VERSION, predict
from rowsft.memory.report import (
                                  PARTS,
                                  MemoryReport,
                                  SavedTensorCounter,
                                  activation_bytes,
                                  breakdown,
                                  index_bytes,
                                  model_tensors,
                                  optimizer_bytes,
                                  static_report,
)

__all__ = ["MemoryCallback", "MemoryReport", "PARTS", "SavedTensorCounter", "activation_bytes", "breakdown",
           "cpu_peak", "index_bytes", "live_bytes", "measure_peak", "model_tensors", "optimizer_bytes", "predict", "PREDICTOR_VERSION",
           "region_peak", "static_report", "unique_storage_bytes"]
