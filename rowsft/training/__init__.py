"""Stage 4, training: ``train(model, batches, steps=...)`` and what it reports.

- :mod:`rowsft.training.config`: ``TrainConfig`` (every knob with its help);
- :mod:`rowsft.training.loop`: ``train``, ``TrainState``, ``NonFiniteLossError``;
- :mod:`rowsft.training.parts`: schedule, optimizer, micro-batches, Ctrl-C deferral, checkpointing;
- :mod:`rowsft.training.callbacks`: ``Callback`` and the built-in progress bar and logger;
- :mod:`rowsft.training.history`: ``History``, a JSON-safe record of a run;
- :mod:`rowsft.training.dynamic`: ``DynamicMask`` (SPEFT dynamic masks, a callback).
The loss itself is :func:`rowsft.lean_loss.training_loss`.
"""
from __future__ import annotations

from rowsft.training.callbacks import Callback
from rowsft.training.config import TrainConfig
from rowsft.training.dynamic import DynamicMask
from rowsft.training.history import History
from rowsft.training.loop import NonFiniteLossError, TrainState, train
from rowsft.training.parts import lr_at

__all__ = ["Callback", "DynamicMask", "History", "NonFiniteLossError", "TrainConfig", "TrainState", "lr_at", "train"]
