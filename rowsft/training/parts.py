"""Pieces of the training loop, each testable alone: learning-rate schedule, optimizer, the
micro-batch stream over epochs, loss extraction, Ctrl-C deferral and gradient checkpointing."""
from __future__ import annotations

import contextlib
import math
import signal
import threading
import warnings
from typing import Callable, Iterable

import torch

from rowsft.checks import check_count, check_real
from rowsft.layers.tuner import sparse_layers
from rowsft.memory.callback import MemoryCallback
from rowsft.training.callbacks import CallbackList, LogCallback, ProgressBar
from rowsft.training.config import AUTOCAST_DTYPES, TrainConfig


def lr_factor(step: int, config: TrainConfig, max_steps: int | None) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (1-based): linear warm-up
    ``step / (warmup + 1)``, then ``1 - progress`` (linear), ``(1 + cos(pi * progress)) / 2`` (cosine)
    or 1 (constant), where progress runs from 0 at the first step after warm-up to 1 at ``max_steps``.
    Without a known ``max_steps`` the schedule stays constant after warm-up. A function ``schedule``
    gives the factor itself (a finite number >= 0), with no warm-up."""
    if callable(config.schedule):
        factor = config.schedule(step)
        check_real(f"schedule({step})", factor, 0.0)
        return float(factor)
    warmup = config.warmup_steps or (math.ceil(config.warmup_ratio * max_steps) if max_steps else 0)
    if step <= warmup:
        return step / (warmup + 1)
    if config.schedule == "constant" or not max_steps:
        return 1.0
    progress = min(1.0, (step - 1 - warmup) / max(1, max_steps - warmup))
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, config: TrainConfig, max_steps: int | None) -> float:
    """Learning rate of optimizer step ``step`` (1-based)."""
    return config.lr * lr_factor(step, config, max_steps)


# device types whose trained tensors torch's fused AdamW kernel takes (torch.optim's fused implementations)
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")


def fused_adamw_fits(params: list[torch.nn.Parameter]) -> bool:
    """Whether torch's fused AdamW takes every tensor of ``params``: floating point, on a device it has the kernel for."""
    return all(p.is_floating_point() and p.device.type in FUSED_ADAMW_DEVICES for p in params)


def build_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names over ``params``. AdamW runs fused (one kernel for all tensors; on CPU about a
    quarter of the per-tensor loop's time for 210 small deltas) where it can, unless ``config.fused`` says otherwise."""
    if callable(config.optimizer):
        return config.optimizer(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    fits = fused_adamw_fits(params)
    if config.fused and not fits:
        devices = sorted({f"{p.device.type} {p.dtype}" for p in params})
        raise ValueError(f"fused=True: torch's fused AdamW takes floating-point tensors on {', '.join(FUSED_ADAMW_DEVICES)}; "
                         f"the trained tensors are {', '.join(devices)}; set fused=None (fused where it can) or False")
    fused = fits if config.fused is None else config.fused
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                             fused=True if fused else None)


def micro_batches(batches: Iterable, epochs: int | None, config: TrainConfig):
    """Yield ``(epoch, batch)`` over ``epochs`` passes (forever when None), re-iterating ``batches``."""
    one_shot = iter(batches) is batches if hasattr(batches, "__next__") else False
    epoch = 0
    while epochs is None or epoch < epochs:
        if hasattr(batches, "set_epoch"):
            batches.set_epoch(epoch)
        if config.shuffle:
            if not hasattr(batches, "__getitem__") or not hasattr(batches, "__len__"):
                raise TypeError("shuffle=True needs a sized, indexable collection of batches (e.g. a list)")
            gen = torch.Generator().manual_seed((config.seed or 0) + epoch)
            order = torch.randperm(len(batches), generator=gen).tolist()
            epoch_iter = (batches[i] for i in order)
        else:
            epoch_iter = iter(batches)
        count = 0
        for batch in epoch_iter:
            count += 1
            yield epoch, batch
        if count == 0:
            raise ValueError("the dataset gave no batches" + ("" if epoch == 0 else
                             f" in epoch {epoch}: a one-shot iterator cannot be re-iterated; pass a list or rowsft.batches(...)"))
        if one_shot:
            return
        epoch += 1


@contextlib.contextmanager
def deferred_interrupt():
    """Hold Ctrl-C (SIGINT) back while an optimizer step runs; ``flag["hit"]`` tells if one came. A caller that
    ignores SIGINT (``SIG_IGN``, as a background job does) keeps its handler: nothing can interrupt the step."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        yield flag
        return
    signal.signal(signal.SIGINT, lambda *_: flag.__setitem__("hit", True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def enable_checkpointing(model: torch.nn.Module) -> Callable[[], None]:
    """Turn on non-reentrant gradient checkpointing; return the function that undoes it."""
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(model, "gradient_checkpointing_enable", None)
    if enable is None:
        raise ValueError(f"gradient_checkpointing=True needs a transformers model (with gradient_checkpointing_enable); "
                         f"{type(model).__name__} has none")
    was_on = bool(getattr(model, "is_activation_checkpointing", False))
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    import inspect
    kwarg = "activation_checkpointing_kwargs" if "activation_checkpointing_kwargs" in inspect.signature(enable).parameters \
        else "gradient_checkpointing_kwargs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable(**{kwarg: {"use_reentrant": False}})
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    frozen_inputs = embeddings is None or not any(p.requires_grad for p in embeddings.parameters())
    if frozen_inputs and hasattr(model, "enable_input_require_grads") and not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()

    def restore() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            if not had_input_hooks and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
            if not was_on:
                disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                disable()
    return restore


def run_length(batches: Iterable, steps: int | None, epochs: int | None, accum: int) -> tuple[int | None, int | None]:
    """``(max_steps, epochs)`` of the run (None when unknown / unbounded)."""
    for name, value in (("steps", steps), ("epochs", epochs)):
        if value is not None:
            check_count(name, value, 1, f"(or None); pass e.g. {name}=10")
    if steps is None and epochs is None:
        epochs = 1
    n = len(batches) if hasattr(batches, "__len__") else None
    if n == 0:
        raise ValueError("the dataset gave no batches")
    by_epochs = math.ceil(epochs * n / accum) if (epochs is not None and n is not None) else None
    candidates = [s for s in (steps, by_epochs) if s is not None]
    return (min(candidates) if candidates else None), (None if steps is not None and epochs is None else epochs)


def check_device(device) -> None:
    """A one-line ValueError when ``device`` names CUDA but this torch has none (before anything moves)."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not a device torch knows ({error}); use 'cpu', 'cuda' or 'cuda:0'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: this torch has no CUDA (or sees no GPU); use device='cpu' (--device cpu)")


def autocast_context(autocast: str | None, device: torch.device):
    """The context a step's forward and loss run in: ``torch.autocast`` on ``device``'s type to ``autocast``'s dtype
    (`rowsft.training.config.AUTOCAST_DTYPES`), or nothing for None."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, AUTOCAST_DTYPES[autocast]))


def check_autocast(autocast: str | None, device: torch.device) -> None:
    """A clear error, before training starts, where ``device`` cannot run ``autocast``."""
    if autocast is None:
        return
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"autocast={autocast!r} runs on CPU and CUDA; the model trains on {device.type}: "
                         f"train with autocast=None")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16 arithmetic: train with "
                         f"autocast=None")


def check_trainable_model(model) -> None:
    """Refuse a model whose sparse updates are merged into the weights: its forward would not reach them."""
    merged = [name for name, layer in sparse_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"the model is merged ({len(merged)} sparse layers, e.g. {merged[0]}, have their updates "
                         "folded into the weights, so no gradient reaches them); call rowsft.unmerge(model) first")


def resolve_config(config_class, config, lr: float | None, overrides: dict):
    """``config`` (or the defaults) with ``lr`` and ``overrides`` applied; unknown names are an error."""
    import dataclasses
    if config is not None and not isinstance(config, config_class):
        raise TypeError(f"config must be a rowsft.TrainConfig, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"train() got unknown options {unknown}; TrainConfig fields are {sorted(names)}")
    if lr is not None:
        overrides = {"lr": lr, **overrides}
    return dataclasses.replace(config or config_class(), **overrides)


def builtin_callbacks(user_callbacks: Iterable, cfg: TrainConfig):
    """Memory recording first (so later callbacks read ``state.memory``), then the user's, then the
    progress bar (or, without one, a logger)."""
    user = list(user_callbacks or ())
    found = []
    if cfg.memory_every:
        if not any(isinstance(c, MemoryCallback) for c in user):
            found.append(MemoryCallback(every=cfg.memory_every))
    found += user
    found.append(ProgressBar(cfg.log_every) if cfg.progress else LogCallback(cfg.log_every))
    return CallbackList(found)
