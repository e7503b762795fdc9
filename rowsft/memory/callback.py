"""`MemoryCallback`: memory figures of every step of a `rowsft.train` run, and measured peaks."""
from __future__ import annotations

import warnings

import torch

from rowsft.memory.measure import live_bytes, profile_peak
from rowsft.memory.report import (
    PARTS,
    MemoryReport,
    SavedTensorCounter,
    int8_inputs_counted,
    model_tensors,
    static_report,
)


class MemoryCallback:
    """Fills ``state.memory`` (and the step's History record, as ``memory_<part>``) during `rowsft.train`.

    Every step: the static parts (weights, gradients, optimizer, indices) and the activations saved
    by that step's forward passes (with gradient accumulation, the distinct storages over its
    micro-batches). The measured peak of the step (``peak_measured``: bytes live at its start plus
    the largest allocation above that): on CUDA every step, from the allocator's counters (free);
    on CPU every ``every`` steps through the profiler, which slows those steps down several times
    (``measure_cpu=False`` turns it off).
    """

    def __init__(self, every: int = 1, measure_cpu: bool = True):
        self.every = max(1, int(every))
        self.measure_cpu = measure_cpu
        self.static: MemoryReport | None = None
        self._counter = None
        self._profile = None
        self._cuda_start = None
        self.records: list[dict] = []

    def on_train_begin(self, state) -> None:
        self.static = static_report(state.model, state.optimizer or "adamw")
        self._exclude = model_tensors(state.model)
        device = next(state.model.parameters()).device
        self._device = device
        if device.type != "cuda" and self.measure_cpu:
            warnings.warn("MemoryCallback measures CPU peaks with torch.profiler, which slows the measured steps "
                          f"down; measuring every {self.every} step(s)", RuntimeWarning, stacklevel=2)

    def _measure_now(self, step: int) -> bool:
        if self._device.type == "cuda":
            return True  # the allocator's counters cost nothing
        return self.measure_cpu and step % self.every == 0

    def on_step_begin(self, state) -> None:
        self._counter = SavedTensorCounter(self._exclude, hold=False).__enter__()
        self._int8_inputs = int8_inputs_counted(state.model, self._counter)   # bitsandbytes int8 layers' kept inputs
        self._int8_inputs.__enter__()
        self._baseline = live_bytes(state.model, state.optimizer)
        if self._measure_now(state.step):
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
                self._cuda_start = torch.cuda.memory_allocated(self._device)
                torch.cuda.reset_peak_memory_stats(self._device)
            else:
                from torch.profiler import ProfilerActivity, profile
                self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                self._profile.__enter__()

    def _stop_measuring(self) -> int | None:
        peak = None
        if self._cuda_start is not None:
            torch.cuda.synchronize(self._device)
            peak = torch.cuda.max_memory_allocated(self._device) - self._cuda_start
            self._cuda_start = None
        if self._profile is not None:
            self._profile.__exit__(None, None, None)
            peak = profile_peak(self._profile)[0]
            self._profile = None
        if self._counter is not None:
            self._int8_inputs.__exit__(None, None, None)
            self._counter.__exit__(None, None, None)
        return peak

    def on_step_end(self, state) -> None:
        peak_delta = self._stop_measuring()
        counter, self._counter = self._counter, None
        figures = self.static.as_dict()
        figures.pop("method")
        figures["activations"] = counter.bytes if counter is not None else 0
        figures["total"] = sum(figures[p] for p in PARTS)
        if peak_delta is not None:
            figures["peak_measured"] = int(self._baseline + peak_delta)
        state.memory = figures
        if state.history is not None and state.history.steps and state.history.steps[-1]["step"] == state.step:
            state.history.steps[-1].update({f"memory_{k}": v for k, v in figures.items()})
        self.records.append({"step": state.step, **figures})

    def on_train_end(self, state) -> None:
        self._stop_measuring()
        self._counter = None
