"""The training loop: `train(model, batches, steps=...)` → `History`.

It trains whatever parameters require grad (after ``rowsft.apply`` only the sparse deltas; after
``rowsft.baselines.full_finetune`` everything; after ``rowsft.baselines.lora`` the LoRA factors)
with AdamW, a warm-up + decay schedule, gradient accumulation, gradient clipping, optional
gradient checkpointing and optional bf16 autocast (forward and loss under ``torch.autocast``; backward and the
optimizer step outside it, the weights and optimizer state in the model's dtype). Callbacks (see `rowsft.training.callbacks`) watch every step; a ``threading.Event``,
``state.request_stop()`` or Ctrl-C ends the run cleanly after the current step: no optimizer step
is ever half-applied, the model's train/eval mode is restored and ``History.stopped`` is set.

Loss normalisation under gradient accumulation: each micro-batch's loss (the model's own mean over
its label tokens) is divided by ``grad_accum_steps`` before ``backward``; the step's reported loss
is the mean of the micro-batch losses. This equals one big batch exactly when the micro-batches
hold the same number of label tokens (full-length batches, classification), and is the usual
approximation otherwise.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from rowsft.data.batching import to_device
from rowsft.layers.tuner import parameters_to_train
from rowsft.lean_loss import training_loss
from rowsft.training import parts
from rowsft.training.config import TrainConfig
from rowsft.training.history import History
from rowsft.training.parts import lr_at


@dataclass
class TrainState:
    """What callbacks see. ``step``: the last completed optimizer step (in ``on_step_begin``, the step
    about to run); ``loss``: its loss (mean over the accumulation micro-batches); ``lr``: the learning
    rate it used; ``epoch``: 0-based pass over the batches of its last micro-batch; ``elapsed``: seconds
    since the start; ``memory``: bytes figures filled by a `MemoryCallback` ({} otherwise);
    ``metrics``: the last evaluation's result."""
    step: int = 0
    max_steps: int | None = None
    loss: float = math.nan
    lr: float = 0.0
    epoch: int = 0
    elapsed: float = 0.0
    grad_norm: float | None = None
    memory: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    history: History | None = None
    model: Any = None
    optimizer: Any = None
    config: TrainConfig | None = None
    stop_reason: str | None = None

    def request_stop(self, reason: str = "request_stop") -> None:
        """Ask the loop to end after the current step."""
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def stop_requested(self) -> bool:
        return self.stop_reason is not None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; ``.step`` names the step, ``.history`` holds the run so far."""

    def __init__(self, message: str, step: int, history: History):
        super().__init__(message)
        self.step, self.history = step, history


class _Run:
    """One call of `train`: the state, and the steps that change it."""

    def __init__(self, model, batches, cfg, max_steps, epochs, callbacks, eval_data, stop_event):
        self.model, self.cfg, self.eval_data, self.stop_event = model, cfg, eval_data, stop_event
        parts.check_trainable_model(model)
        parts.check_device(cfg.device)
        self.params = parameters_to_train(model)
        if eval_data is not None and not callable(eval_data):
            raise TypeError("eval_data must be a function fn(model) -> dict of metrics, e.g. "
                            "lambda m: rowsft.evaluate(m, tokenizer, data['validation'])")
        self.device = torch.device(cfg.device) if cfg.device is not None else self.params[0].device
        parts.check_autocast(cfg.autocast, self.device)
        if cfg.device is not None:
            model.to(cfg.device)
        self.optimizer = parts.build_optimizer(self.params, cfg)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.stream = parts.micro_batches(batches, epochs, cfg)
        self.callbacks = parts.builtin_callbacks(callbacks, cfg)
        n_trainable = sum(p.numel() for p in self.params)
        n_total = sum(p.numel() for p in model.parameters())
        self.history = History(config=cfg.to_dict(), meta={
            "trainable_parameters": n_trainable, "total_parameters": n_total, "device": str(self.device),
            "max_steps": max_steps, "dtype": str(self.params[0].dtype).replace("torch.", ""), "autocast": cfg.autocast})
        self.state = TrainState(max_steps=max_steps, lr=lr_at(1, cfg, max_steps), history=self.history, model=model,
                                optimizer=self.optimizer, config=cfg)
        self.start = time.perf_counter()

    # ------------------------------------------------------------ the run
    def run(self) -> History:
        state, history = self.state, self.history
        was_training = self.model.training
        restore_checkpointing = parts.enable_checkpointing(self.model) if self.cfg.gradient_checkpointing else None
        if self.cfg.seed is not None:
            torch.manual_seed(self.cfg.seed)
        self.model.train()
        self.start = time.perf_counter()
        try:
            try:
                self.callbacks.call("on_train_begin", state)
                while (state.max_steps is None or state.step < state.max_steps) and not self._stop_now():
                    if not self._step():
                        break  # the batches ran out (epochs done)
                    self.callbacks.call("on_step_end", state)
                    if self.eval_data is not None and self.cfg.eval_every and state.step % self.cfg.eval_every == 0:
                        self._evaluate()
                if self.eval_data is not None and not (history.evals and history.evals[-1]["step"] == state.step):
                    self._evaluate()
            except KeyboardInterrupt:
                state.request_stop("keyboard_interrupt")
            self._finish()
            try:
                self.callbacks.call("on_train_end", state)
            except KeyboardInterrupt:
                state.request_stop("keyboard_interrupt")
                self._finish()
        except BaseException as error:
            history.stopped, history.stop_reason = True, state.stop_reason or f"error: {type(error).__name__}"
            self._finish(keep_reason=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    self.callbacks.call("on_train_end", state)
                except BaseException:  # noqa: BLE001 - the first error is the one to report
                    pass
            raise
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            if restore_checkpointing is not None:
                restore_checkpointing()
            self.model.train(was_training)
        return history

    def _finish(self, keep_reason: bool = False) -> None:
        self.state.elapsed = self.history.wall_time = time.perf_counter() - self.start
        if not keep_reason:
            self.history.stopped = self.state.stop_requested
            self.history.stop_reason = self.state.stop_reason

    def _stop_now(self) -> bool:
        if self.stop_event is not None and self.stop_event.is_set():
            self.state.request_stop("stop_event")
        return self.state.stop_requested

    # ------------------------------------------------------------ one optimizer step
    def _step(self) -> bool:
        """Run one optimizer step; False when no batch was left. A KeyboardInterrupt before the update
        abandons the step (gradients dropped, weights untouched) and propagates."""
        state, cfg = self.state, self.cfg
        step = state.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        state.memory, state.step = {}, step
        try:
            self.callbacks.call("on_step_begin", state)
            losses, epoch, bad = self._forward_backward()
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            state.step = step - 1
            raise
        if not losses:
            state.step = step - 1
            return False
        grad_norm = self._clip()
        if bad is None and not math.isfinite(grad_norm):
            bad = f"the gradient norm is {grad_norm}"
        factor = parts.lr_factor(step, cfg, state.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        record = {"step": step, "loss": sum(losses) / len(losses), "lr": self.optimizer.param_groups[0]["lr"],
                  "epoch": epoch, "grad_norm": grad_norm}
        if bad is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.nan_policy == "raise":
                state.step = step - 1
                state.request_stop("nonfinite_loss")
                raise NonFiniteLossError(f"{bad} at step {step}: no update was applied. Lower the learning rate, check the "
                                         "batches (a batch whose labels are all -100 gives a NaN loss), or pass "
                                         "nan_policy='skip'", step, self.history)
            warnings.warn(f"{bad} at step {step}: skipped that update (nan_policy='skip')", RuntimeWarning, stacklevel=4)
            record["skipped"] = True
        else:
            with parts.deferred_interrupt() as interrupted:
                self.optimizer.step()
            if interrupted["hit"]:
                state.request_stop("keyboard_interrupt")
        record["elapsed"] = time.perf_counter() - self.start
        state.loss, state.lr, state.epoch, state.grad_norm, state.elapsed = (
            record["loss"], record["lr"], epoch, grad_norm, record["elapsed"])
        self.history.steps.append(record)
        return True

    def _forward_backward(self) -> tuple[list[float], int, str | None]:
        """Accumulate the gradients of up to ``grad_accum_steps`` micro-batches."""
        accum = self.cfg.grad_accum_steps
        losses: list[float] = []
        epoch = self.state.epoch
        for _ in range(accum):
            try:
                epoch, batch = next(self.stream)
            except StopIteration:
                break
            with parts.autocast_context(self.cfg.autocast, self.device):
                loss = training_loss(self.model, to_device(batch, self.device), lean=self.cfg.lean_logits)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                return losses, epoch, f"the loss is {value} (micro-batch {len(losses)})"
            (loss / accum).backward()
        if 0 < len(losses) < accum:  # the last epoch ended inside an accumulation group: rescale to a mean
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(accum / len(losses))
        return losses, epoch, None

    def _clip(self) -> float:
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.cfg.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.max_grad_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))

    def _evaluate(self) -> None:
        state = self.state
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.eval_data(self.model)
        finally:
            self.model.train()
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_data must return a dict of metrics, got {type(metrics).__name__}")
        state.metrics = dict(metrics)
        summary = {k: v for k, v in state.metrics.items() if k != "per_question"}   # the history keeps the figures
        self.history.evals.append({"step": state.step, **summary, "elapsed": time.perf_counter() - self.start})
        self.callbacks.call("on_eval", state)


def train(model: torch.nn.Module, batches: Iterable, steps: int | None = None, epochs: int | None = None,
          lr: float | None = None, config: TrainConfig | None = None, callbacks: Iterable = (), eval_data=None,
          stop_event=None, **overrides) -> History:
    """Train the parameters of ``model`` that require grad; return the `History`.

    ``batches``: any re-iterable of dicts the model takes as ``model(**batch)`` and that gives
    ``.loss`` (``rowsft.batches(...)``, a list). The run lasts ``steps`` optimizer steps, cycling
    over the batches, or ``epochs`` passes (one pass when neither is given; the first limit reached
    wins when both are). ``lr`` (default 1e-4) and ``**overrides`` set `TrainConfig` fields over
    ``config``. ``callbacks``: objects with ``on_train_begin / on_step_begin / on_step_end / on_eval /
    on_train_end(state)`` or plain functions (taken as ``on_step_end``). ``eval_data``: a function
    ``fn(model) -> dict`` of metrics, called every ``eval_every`` steps and at the end (in eval mode,
    without grad). ``stop_event``: a ``threading.Event``; once set, the run ends after the current
    step. Calling ``train`` again continues from the current weights with a fresh optimizer.
    """
    cfg = parts.resolve_config(TrainConfig, config, lr, overrides)
    max_steps, epochs = parts.run_length(batches, steps, epochs, cfg.grad_accum_steps)
    return _Run(model, batches, cfg, max_steps, epochs, callbacks, eval_data, stop_event).run()
