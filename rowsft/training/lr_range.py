"""A learning-rate range test: a quick way to find a workable rate for a new model, task or budget.

Train for a few dozen steps while the learning rate grows geometrically from ``min_lr`` to
``max_lr`` and watch the training loss (Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017): it falls once the rate is large enough to make progress and blows up once the
rate is too large. The usual reading takes a rate about ten times below the one where the smoothed
loss is lowest. It is a guide, not a tuned value: the learning-rate sweep of
``benchmarks/lr_sweep.py`` is what picks rowsft's defaults, and the tutorials compare the two.

The test trains the model it is given; every trainable tensor is copied first and put back at the
end (also after an error or Ctrl-C), so the model leaves the test exactly as it came in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

from rowsft.checks import check_count, check_real
from rowsft.training.callbacks import Callback
from rowsft.training.loop import train


@dataclass
class RangeTestResult:
    """The rates tried and the losses seen, with the reading of the curve."""
    lrs: list[float] = field(default_factory=list)        # (steps,) the rate of each step
    losses: list[float] = field(default_factory=list)     # (steps,) the training loss of each step
    smoothed: list[float] = field(default_factory=list)   # (steps,) bias-corrected exponential moving average
    min_loss_lr: float | None = None                      # the rate at the lowest smoothed loss
    suggestion: float | None = None                       # min_loss_lr / 10
    diverged_at: float | None = None                      # the rate where the smoothed loss passed diverge x its minimum

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Divergence(Callback):
    """Stops the test once the smoothed loss passes ``factor`` times its minimum (or turns non-finite)."""

    def __init__(self, result: RangeTestResult, beta: float, factor: float):
        self.result, self.beta, self.factor = result, beta, factor
        self.average, self.best = 0.0, math.inf

    def on_step_end(self, state) -> None:
        r = self.result
        r.lrs.append(float(state.lr))
        r.losses.append(float(state.loss))
        if not math.isfinite(state.loss):
            r.smoothed.append(math.inf)
            r.diverged_at = float(state.lr)
            state.request_stop("diverged")
            return
        self.average = self.beta * self.average + (1 - self.beta) * float(state.loss)
        smoothed = self.average / (1 - self.beta ** len(r.losses))
        r.smoothed.append(smoothed)
        self.best = min(self.best, smoothed)
        if len(r.losses) > 3 and smoothed > self.factor * self.best:
            r.diverged_at = float(state.lr)
            state.request_stop("diverged")


def lr_range_test(model: torch.nn.Module, batches: Iterable, min_lr: float = 1e-5, max_lr: float = 1e-1,
                  steps: int = 40, smoothing: float = 0.8, diverge: float = 4.0, **train_kwargs) -> RangeTestResult:
    """Rates from ``min_lr`` to ``max_lr`` over ``steps`` steps (geometric); the model is restored after.

    ``model``: already prepared for training (``rowsft.apply``, a peft model, ...). ``smoothing``:
    the moving average's weight of the past (0 = none). The test stops early once the smoothed
    loss exceeds ``diverge`` times its minimum. Other keywords go to ``rowsft.train`` (e.g.
    ``seed``); the schedule, the clipping and the progress bar are the test's own.
    """
    check_real("min_lr", min_lr, 0.0, inclusive=False)
    check_real("max_lr", max_lr, 0.0, inclusive=False)
    if max_lr <= min_lr:
        raise ValueError(f"max_lr ({max_lr}) must be larger than min_lr ({min_lr}), e.g. min_lr=1e-5, max_lr=1e-1")
    check_count("steps", steps, 4)
    check_real("smoothing", smoothing, 0.0)
    if smoothing >= 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    check_real("diverge", diverge, 1.0, inclusive=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has nothing to train: prepare it first (rowsft.apply(model, selection), "
                         "or a peft LoRA model)")
    saved = [p.detach().clone() for p in trainable]                    # the state the model is restored to
    ratio = max_lr / min_lr
    result = RangeTestResult()
    try:
        train(model, batches, steps=steps, lr=min_lr, schedule=lambda step: ratio ** ((step - 1) / (steps - 1)),
              max_grad_norm=None, nan_policy="skip", progress=train_kwargs.pop("progress", False),
              callbacks=[_Divergence(result, smoothing, diverge), *train_kwargs.pop("callbacks", ())], **train_kwargs)
    finally:
        with torch.no_grad():
            for parameter, copy in zip(trainable, saved):
                parameter.copy_(copy)
    finite = [(loss, lr) for loss, lr in zip(result.smoothed, result.lrs) if math.isfinite(loss)]
    if finite:
        result.min_loss_lr = min(finite)[1]
        result.suggestion = result.min_loss_lr / 10
    return result
