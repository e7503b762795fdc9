"""Training callbacks: the hooks `rowsft.train` calls, and how it calls them.

A callback is any object with some of these methods, each receiving the live `TrainState`:

- ``on_train_begin(state)`` once, before the first step;
- ``on_step_begin(state)`` before each optimizer step (``state.step`` is the step about to run);
- ``on_step_end(state)`` after each optimizer step (``state.loss``, ``state.lr`` ... describe it);
- ``on_eval(state)`` after each evaluation (``state.metrics``);
- ``on_train_end(state)`` once, also when the run was stopped early.

Only the methods present are called. A plain function is taken as ``on_step_end``. Subclassing
`Callback` is optional; it only documents the names.
"""
from __future__ import annotations

from typing import Any, Iterable

HOOKS = ("on_train_begin", "on_step_begin", "on_step_end", "on_eval", "on_train_end")


class Callback:
    """Base class with no-op hooks; override the ones you need."""

    def on_train_begin(self, state) -> None: ...
    def on_step_begin(self, state) -> None: ...
    def on_step_end(self, state) -> None: ...
    def on_eval(self, state) -> None: ...
    def on_train_end(self, state) -> None: ...


class FunctionCallback(Callback):
    """Wraps a plain function ``fn(state)`` as an ``on_step_end`` callback."""

    def __init__(self, fn):
        self.fn = fn

    def on_step_end(self, state) -> None:
        self.fn(state)

    def __repr__(self) -> str:
        return f"FunctionCallback({getattr(self.fn, '__name__', self.fn)!r})"


def as_callback(obj: Any):
    """``obj`` itself when it has a hook method, a `FunctionCallback` when it is a plain callable."""
    if any(callable(getattr(obj, h, None)) for h in HOOKS):
        return obj
    if callable(obj):
        return FunctionCallback(obj)
    raise TypeError(f"callback {obj!r} has none of the methods {HOOKS} and is not callable; "
                    "pass an object with e.g. on_step_end(state), or a function fn(state)")


class CallbackList:
    """Calls one hook on every callback that has it, in order."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = [as_callback(c) for c in callbacks]

    def __iter__(self):
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def call(self, hook: str, state) -> None:
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if callable(method):
                method(state)


class ProgressBar(Callback):
    """A ``tqdm.auto`` bar over the steps, showing the loss (and last eval) every ``log_every`` steps."""

    def __init__(self, log_every: int = 1):
        self.log_every = max(1, int(log_every))
        self.bar = None

    def on_train_begin(self, state) -> None:
        from tqdm.auto import tqdm
        self.bar = tqdm(total=state.max_steps, desc="train", unit="step", dynamic_ncols=True)

    def on_step_end(self, state) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        if state.step % self.log_every == 0:
            post = {"loss": f"{state.loss:.4g}", "lr": f"{state.lr:.2e}"}
            post.update({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in (state.metrics or {}).items()})
            self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogCallback(Callback):
    """Logs ``step, loss, lr`` through the ``rowsft.training`` logger every ``log_every`` steps."""

    def __init__(self, log_every: int = 10):
        import logging
        self.log_every = max(1, int(log_every))
        self.logger = logging.getLogger("rowsft.training")

    def on_step_end(self, state) -> None:
        if state.step % self.log_every == 0:
            self.logger.info("step %d/%s loss %.4f lr %.3g", state.step, state.max_steps, state.loss, state.lr)

    def on_eval(self, state) -> None:
        self.logger.info("step %d eval %s", state.step, state.metrics)
