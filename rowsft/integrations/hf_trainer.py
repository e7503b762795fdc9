"""rowsft under ``transformers.Trainer``: rowsft callbacks listen to a Trainer run, checkpoints carry the adapter.

A model after ``rowsft.apply`` trains under an unchanged ``Trainer``: the Trainer's optimizer only takes
parameters that require grad, i.e. the deltas. :class:`RowSFTTrainerCallback` is a ``TrainerCallback``
that

- forwards the Trainer's events to rowsft callbacks (``on_train_begin`` / ``on_step_begin`` /
  ``on_step_end`` / ``on_eval`` / ``on_train_end``) with a live `rowsft.training.TrainState`
  (``step, max_steps, loss, lr, epoch, elapsed, memory, metrics, history, model, optimizer``), so
  `rowsft.memory.MemoryCallback`, the notebook's live curves or any ``fn(state)`` work unchanged;
- stops the Trainer when a callback calls ``state.request_stop()`` or a ``stop_event`` is set;
- writes the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into every
  ``checkpoint-N`` folder the Trainer saves (``save_adapter=True``), as PEFT checkpoints hold theirs.

Usage::

    rowsft.apply(model, selection)
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=...,
                      callbacks=[RowSFTTrainerCallback([MemoryCallback(), print_loss])])
    trainer.train()
    rowsft.save_adapter(model, "runs/x")      # the final adapter (trainer.save_model writes the full model)

With a model sharded by FSDP2 (``fully_shard``, `rowsft.distributed.shard`, accelerate's ``fsdp_version: 2``)
the checkpoint adapters are gathered from every rank and written by rank 0; FSDP1 and DeepSpeed are
refused when training begins, with a message naming FSDP2.

``state.loss`` is the step's mean loss per label token on this process, taken from the model's own
outputs in training mode (a forward hook), so it is exact every step, not only at ``logging_steps``.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterable

import torch
from transformers import TrainerCallback

from rowsft.distributed import SHARD_ORDER, check_supported_wrapper, is_sharded, unwrap
from rowsft.layers.adapter_checks import CONFIG_NAME, WEIGHTS_NAME
from rowsft.layers.adapters import save_adapter
from rowsft.layers.tuner import sparse_layers
from rowsft.training.callbacks import CallbackList
from rowsft.training.history import History
from rowsft.training.loop import TrainState


class RowSFTTrainerCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that drives rowsft callbacks and saves adapters in checkpoints.

    ``callbacks``: rowsft callbacks (objects with ``on_step_end(state)`` etc., or plain functions
    taken as ``on_step_end``). ``stop_event``: a ``threading.Event`` that ends the run after the current
    step when set. ``save_adapter``: also write the rowsft adapter into each ``checkpoint-N`` folder.
    After the run, ``.history`` is a `rowsft.training.History` of the steps and evaluations.
    """

    def __init__(self, callbacks: Iterable[Any] = (), stop_event: threading.Event | None = None,
                 save_adapter: bool = True):
        self.callbacks = CallbackList(callbacks)
        self.stop_event = stop_event
        self.save_adapter = save_adapter
        self.state: TrainState | None = None
        self.history = History()
        self._hook = None
        self._losses: list[tuple[float, float]] = []     # (loss sum, label count) per micro-batch
        self._lr: float | None = None
        self._start = 0.0

    # ---------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        check_trainer_parallelism(args, model)
        if self.save_adapter and model is not None and not sparse_layers(unwrap(model)):
            raise ValueError(f"{type(unwrap(model)).__name__} has no rowsft sparse layer, so the Trainer would "
                             "fine-tune every weight and no adapter could be saved: call rowsft.apply(model, "
                             "selection) before trainer.train(), or pass save_adapter=False to only forward events")
        self.history = History(config={"trainer": True, "learning_rate": args.learning_rate,
                                        "max_steps": state.max_steps})
        self.state = TrainState(step=state.global_step, max_steps=state.max_steps or None, lr=args.learning_rate,
                                history=self.history, model=model, optimizer=_inner_optimizer(optimizer))
        self._start = time.perf_counter()
        self._attach_loss_hook(model)
        self.callbacks.call("on_train_begin", self.state)
        return self._maybe_stop(control)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.state is None:
            return control
        self._losses.clear()
        self._lr = None
        self.state.step = state.global_step + 1
        self.state.optimizer = _inner_optimizer(optimizer) or self.state.optimizer
        self.callbacks.call("on_step_begin", self.state)
        return self._maybe_stop(control)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and optimizer.param_groups:
            self._lr = float(optimizer.param_groups[0]["lr"])   # the lr this step uses
        return control

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if self.state is None:
            return control
        s = self.state
        s.step = state.global_step
        s.loss = self._step_loss()
        s.lr = self._lr if self._lr is not None else _current_lr(optimizer, lr_scheduler, args.learning_rate)
        s.epoch = int(state.epoch or 0)
        s.elapsed = time.perf_counter() - self._start
        s.memory = {}
        # recorded before the callbacks run, as rowsft.train does: a MemoryCallback adds its figures to it
        self.history.steps.append({"step": s.step, "loss": s.loss, "lr": s.lr, "elapsed": s.elapsed, "epoch": s.epoch})
        self.callbacks.call("on_step_end", s)
        return self._maybe_stop(control)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.state is None:
            return control
        self.state.metrics = dict(metrics or {})
        self.history.evals.append({"step": state.global_step, **self.state.metrics})
        self.callbacks.call("on_eval", self.state)
        return self._maybe_stop(control)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_adapter or model is None:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if is_sharded(unwrap(model)):
            save_adapter_into(model, folder)     # every rank gathers its slices; rank 0 writes
        elif args.should_save and os.path.isdir(folder):
            save_adapter_into(model, folder)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._detach_loss_hook()
        if self.state is None:
            return control
        self.history.wall_time = time.perf_counter() - self._start
        if self.state.stop_requested:
            self.history.stopped, self.history.stop_reason = True, self.state.stop_reason
        self.callbacks.call("on_train_end", self.state)
        return control

    # ---------------------------------------------------------------- helpers
    def _maybe_stop(self, control):
        if self.state is not None and self.stop_event is not None and self.stop_event.is_set():
            self.state.request_stop("stop_event")
        if self.state is not None and self.state.stop_requested:
            control.should_training_stop = True
        return control

    def _attach_loss_hook(self, model) -> None:
        self._detach_loss_hook()
        if model is None:
            return
        self._hook = model.register_forward_hook(self._record_loss, with_kwargs=True)

    def _detach_loss_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record_loss(self, module, args, kwargs, output) -> None:
        """Keep each training micro-batch's loss as (sum over label tokens, label tokens)."""
        if not module.training:
            return
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None or not torch.is_tensor(loss):
            return
        loss = float(loss.detach())
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:
            self._losses.append((loss, 1.0))          # the model's own mean: average the micro-batches
            return
        # the model divided its token sum by the step's token count: undo that with the local count
        labels = kwargs.get("shift_labels")
        if labels is None:
            labels = kwargs.get("labels")
            logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
            if labels is not None and logits is not None and logits.dim() == 3:
                labels = labels[..., 1:]               # causal LM losses shift the labels
        count = float(labels.ne(-100).sum()) if torch.is_tensor(labels) else 1.0
        self._losses.append((loss * float(num_items), count))

    def _step_loss(self) -> float:
        if not self._losses:
            return float("nan")
        total = sum(s for s, _ in self._losses)
        count = sum(c for _, c in self._losses)
        return total / max(count, 1e-12)


def check_trainer_parallelism(args, model) -> None:
    """Refuse, when training begins, the sharded setups rowsft does not support (DeepSpeed, FSDP1); DDP and
    FSDP2 pass."""
    if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
        raise NotImplementedError("rowsft does not support DeepSpeed under the Trainer: it is not tested under "
                                  "DeepSpeed's engine. For sharded training use torch FSDP2 (fully_shard; in accelerate "
                                  f"configs fsdp_version: 2), with rowsft.apply first. Order: {SHARD_ORDER}.")
    if model is not None:
        check_supported_wrapper(model)


def _inner_optimizer(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (which the Trainer hands out)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def _current_lr(optimizer, lr_scheduler, default: float) -> float:
    if optimizer is not None and getattr(optimizer, "param_groups", None):
        return float(optimizer.param_groups[0]["lr"])
    if lr_scheduler is not None:
        return float(lr_scheduler.get_last_lr()[0])
    return float(default)


def save_adapter_into(model: torch.nn.Module, folder: str | os.PathLike) -> list[str]:
    """Write the rowsft adapter files of ``model`` into an existing ``folder`` (e.g. a Trainer
    checkpoint) without touching its other files; returns the file names written. A model sharded with
    FSDP2: call it on every rank (rank 0 writes)."""
    save_adapter(unwrap(model), folder, overwrite=True)
    return sorted([CONFIG_NAME, WEIGHTS_NAME])


def trainer_checkpoint_adapter(checkpoint: str | os.PathLike) -> str:
    """The folder holding a checkpoint's adapter (the checkpoint itself); a clear error if there is none."""
    checkpoint = os.fspath(checkpoint)
    if not os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        raise FileNotFoundError(f"{checkpoint} holds no rowsft adapter (adapter_config.json); train with "
                                "callbacks=[RowSFTTrainerCallback()] so checkpoints carry the adapter")
    return checkpoint


__all__ = ["RowSFTTrainerCallback", "save_adapter_into", "trainer_checkpoint_adapter", "check_trainer_parallelism"]
