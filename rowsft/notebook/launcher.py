"""Launch and Stop buttons around ``rowsft.train``: training in place, with the notebook responsive.

Launch runs ``train`` on the notebook's own model in a background thread (``threading.Thread``,
daemon), with a ``threading.Event`` as ``stop_event``; Stop sets the event, so the run ends after
the step in flight and the model is left consistent (no half-applied optimizer step). While a run
is going, Launch says so in the status area instead of starting a second one. ``wait()`` joins the
thread (for tests and nbval). After the run a summary shows accuracy before/after (from an
injected ``eval_fn(model)``), peak memory and time.

Threads and widgets: the kernel's main thread stays free, so button clicks are handled during the
run. Callback updates (progress bar, live curves) are made from the training thread and reach
the browser as comm messages through ipykernel's IOPub channel, which is safe from any thread; the
curves throttle themselves behind a lock (see ``rowsft.notebook.live``). Limits: Python threads
share the GIL (PyTorch releases it inside its kernels, so the UI stays fluid); a kernel without
threads (JupyterLite/Pyodide) must use ``background=False``, which trains in the foreground.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import ipywidgets as widgets

from rowsft.memory.callback import MemoryCallback
from rowsft.notebook._widgets import Displayable, StatusArea, error_message, format_bytes, log
from rowsft.training.loop import train
from rowsft.viz.style import memory_value


@dataclass
class RunSummary:
    """What one launched run did."""
    run: str
    steps: int
    max_steps: int
    stopped: bool
    seconds: float
    final_loss: float | None = None
    peak_memory: float | None = None
    peak_memory_kind: str | None = None      # "measured" (allocator peak) or "analytic" (MemoryCallback total)
    accuracy_before: float | None = None
    accuracy_after: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def as_html(self) -> str:
        def acc(v):
            return "n/a" if v is None else f"{100 * v:.1f} %"
        rows = [("run", self.run), ("steps", f"{self.steps} / {self.max_steps}" + (" (stopped)" if self.stopped else "")),
                ("time", f"{self.seconds:.1f} s"),
                ("final loss", "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"),
                ("peak memory", format_bytes(self.peak_memory)
                 + (f" ({self.peak_memory_kind})" if self.peak_memory_kind and self.peak_memory is not None else "")),
                ("accuracy", f"{acc(self.accuracy_before)} → {acc(self.accuracy_after)}")]
        cells = "".join(f"<tr><td style='padding:1px 10px 1px 0'><b>{k}</b></td><td>{v}</td></tr>" for k, v in rows)
        return f"<table>{cells}</table>"


def _accuracy(result) -> float | None:
    if result is None:
        return None
    if isinstance(result, dict):
        result = result.get("accuracy")
    return None if result is None else float(result)


class _Progress:
    """Callback: progress bar and peak of the memory figures, from the training thread."""

    def __init__(self, bar: widgets.IntProgress):
        self.bar, self.peak, self.last_step = bar, None, 0

    def on_train_begin(self, state) -> None:
        self.bar.max = max(1, int(state.max_steps or 1))
        self.bar.value = 0

    def on_step_end(self, state) -> None:
        self.last_step = int(state.step)
        self.bar.value = min(self.last_step, self.bar.max)
        memory = memory_value(getattr(state, "memory", None) or {})
        if memory is not None:
            self.peak = memory if self.peak is None else max(self.peak, memory)


class TrainLauncher(Displayable):
    """Launch / Stop controls for training ``model`` on ``batches`` in place.

    ``curves``: a ``LiveCurves`` to draw into (shared by several launchers to overlay runs).
    ``eval_fn(model)``: accuracy (a float or ``{"accuracy": ...}``) before and after the run.
    ``prepare(model)``: called on Launch before the thread starts (e.g. apply the current selection);
    an error there is shown and nothing starts. ``train_fn`` defaults to ``rowsft.train``;
    ``train_kwargs`` go to it (``progress=False`` unless given). ``record_memory``: add a
    ``rowsft.memory.MemoryCallback`` (every step; allocator peaks on CUDA, no CPU profiler) so the
    curves and the summary show memory; default on with the real ``train``, off with a custom
    ``train_fn``. ``background=False`` trains in the foreground (for kernels without threads).
    """

    def __init__(self, model, batches: Iterable, steps: int = 60, lr: float = 2e-4, run_name: str = "row-sparse",
                 curves=None, eval_fn: Callable | None = None, prepare: Callable | None = None,
                 train_fn: Callable | None = None, train_kwargs: dict | None = None, background: bool = True,
                 record_memory: bool | None = None):
        self.model, self.batches, self.curves = model, batches, curves
        self.eval_fn, self.prepare, self._train_fn = eval_fn, prepare, train_fn
        self.train_kwargs = {"progress": False, **(train_kwargs or {})}
        self.background = background
        self.record_memory = train_fn is None if record_memory is None else bool(record_memory)
        self.history = None
        self.summary: RunSummary | None = None
        self.error: BaseException | None = None
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.steps = widgets.BoundedIntText(value=steps, min=1, max=10 ** 7, description="steps",
                                            layout=widgets.Layout(width="170px"))
        self.lr = widgets.FloatText(value=lr, description="lr", layout=widgets.Layout(width="170px"))
        self.run_name = widgets.Text(value=run_name, description="run", layout=widgets.Layout(width="220px"))
        self.launch_button = widgets.Button(description="Launch", button_style="success", icon="play")
        self.launch_button.add_class("rowsft-launch")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=steps, layout=widgets.Layout(width="240px"))
        self.status = StatusArea()
        self.summary_html = widgets.HTML("")
        self.summary_html.add_class("rowsft-summary")
        self.launch_button.on_click(lambda _: self.launch())
        self.stop_button.on_click(lambda _: self.stop())
        self.widget = widgets.VBox([widgets.HBox([self.run_name, self.steps, self.lr]),
                                    widgets.HBox([self.launch_button, self.stop_button, self.progress]),
                                    self.status, self.summary_html])

    @property
    def train_fn(self) -> Callable:
        if self._train_fn is None:
            self._train_fn = train
        return self._train_fn

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ buttons
    def launch(self) -> bool:
        """Start a run (what Launch does); False (and a message) when it cannot start."""
        with self._lock:
            if self.running:
                self.status.error(f"a run is already in progress (step {self._progress.last_step}/{self.progress.max}): "
                                  "press Stop or wait for it to end before launching another")
                return False
            steps, lr, run = int(self.steps.value), float(self.lr.value), self.run_name.value.strip() or "run"
            if steps < 1 or not lr > 0:
                self.status.error(f"steps must be ≥ 1 and lr > 0 (got steps={steps}, lr={lr})")
                return False
            if self.prepare is not None:
                try:
                    self.prepare(self.model)
                except Exception as exc:  # noqa: BLE001 - shown, not raised
                    log.debug("prepare failed", exc_info=True)
                    self.status.error(f"Cannot launch: {error_message(exc)}")
                    return False
            self.stop_event = threading.Event()
            self.error, self.history, self.summary = None, None, None
            self.progress.max, self.progress.value = steps, 0   # a new run starts at 0, not at the last run's step
            self._progress = _Progress(self.progress)
            self.progress.bar_style = "info"
            self.summary_html.value = ""
            self._set_running(True)
            self.status.info(f"training {run} for {steps} steps…")
            args = (steps, lr, run)
            if not self.background:
                self._run(*args)
                return True
            self._thread = threading.Thread(target=self._run, args=args, name=f"rowsft-train-{run}", daemon=True)
            self._thread.start()
            return True

    def stop(self) -> None:
        """Ask the run to end after the current step (what Stop does)."""
        if not self.running:
            self.status.info("no run in progress")
            return
        self.stop_event.set()
        self.status.info("stopping after the current step…")

    def wait(self, timeout: float | None = None):
        """Block until the run ends (or ``timeout`` seconds); returns its ``History`` (None if none)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.history

    # ------------------------------------------------------------------ the run (training thread)
    def _run(self, steps: int, lr: float, run: str) -> None:
        start = time.perf_counter()
        try:
            before = _accuracy(self.eval_fn(self.model)) if self.eval_fn else None
            callbacks = [self._progress] + ([self.curves.callback(run)] if self.curves is not None else [])
            if self.record_memory:
                callbacks.insert(0, MemoryCallback(every=1, measure_cpu=False))
            history = self.train_fn(self.model, self.batches, steps=steps, lr=lr, callbacks=callbacks,
                                    stop_event=self.stop_event, **self.train_kwargs)
            self.history = history
            after = _accuracy(self.eval_fn(self.model)) if self.eval_fn else None
            records = list(getattr(history, "steps", []) or [])
            measured = [r["memory_peak_measured"] for r in records if r.get("memory_peak_measured") is not None]
            totals = [m for m in (memory_value(r) for r in records) if m is not None]
            totals += [self._progress.peak] if self._progress.peak is not None else []
            peak, kind = (max(measured), "measured") if measured else (max(totals, default=None), "analytic")
            self.summary = RunSummary(run=run, steps=len(records), max_steps=steps,
                                      stopped=bool(getattr(history, "stopped", False)) or self.stop_event.is_set(),
                                      seconds=time.perf_counter() - start,
                                      final_loss=records[-1].get("loss") if records else None,
                                      peak_memory=peak, peak_memory_kind=kind, accuracy_before=before,
                                      accuracy_after=after)
            self.summary_html.value = self.summary.as_html()
            self.progress.bar_style = "warning" if self.summary.stopped else "success"
            self.status.success(f"{run}: {'stopped after' if self.summary.stopped else 'done,'} "
                                f"{self.summary.steps} steps in {self.summary.seconds:.1f} s")
        except BaseException as exc:  # noqa: BLE001 - a thread's error must reach the user, not stderr
            self.error = exc
            log.debug("training failed", exc_info=True)
            self.progress.bar_style = "danger"
            self.status.error(f"Training {run} failed: {error_message(exc)}")
        finally:
            self._set_running(False)

    def _set_running(self, running: bool) -> None:
        # Launch stays clickable during a run: a click then explains why no second run starts.
        self.launch_button.description = "Launch (running…)" if running else "Launch"
        self.stop_button.disabled = not running
