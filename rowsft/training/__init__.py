"""Stage 4, training: ``train(model, batches, steps=...)`` and what it reports.

- :mod:`rowsft.training.config`: ``TrainConfig`` (every knob with its help);
- :mod:`rowsft.training.loop`: ``train``, ``TrainState``, ``NonFiniteLossError``;
- :mod:`rowsft.training.parts`: schedule, optimizer, micro-batches, Ctrl-C deferral, checkpointing;
- :mod:`rowsft.training.callbacks`: ``Callback`` and the built-in progress bar and logger;
- :mod:`rowsft.training.history`: ``History``, a JSON-safe record of a run;
- :mod:`rowsft.training.dynamic`: ``DynamicMask`` (SPEFT dynamic masks, a callback);
- :mod:`rowsft.training.learning_rates`: each method's tuned default rate;
- :mod:`rowsft.training.lr_range`: ``lr_range_test``, a quick rate finder for new settings.
The loss itself is :func:`rowsft.lean_loss.training_loss`.
"""
from __future__ import annotations

from rowsft.training.callbacks import Callback
from rowsft.training.config import TrainConfig
from rowsft.training.dynamic import DynamicMask
from rowsft.training.history import History
from rowsft.training.learning_rates import DEFAULT_LEARNING_RATES, default_learning_rate
from rowsft.training.loop import NonFiniteLossError, TrainState, train
from rowsft.training.lr_range import RangeTestResult, lr_range_test
from rowsft.training.parts import lr_at

__all__ = ["Callback", "DEFAULT_LEARNING_RATES", "DynamicMask", "History", "NonFiniteLossError", "RangeTestResult",
           "TrainConfig", "TrainState", "default_learning_rate", "lr_at", "lr_range_test", "train"]
