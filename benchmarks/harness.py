"""Shared measurement for the benchmarks: every method is measured the same way, side by side.

Every method gets a fresh model, prepared (rows applied, LoRA wrapped, ...); after warm-up the
timed optimizer steps of all methods are interleaved round-robin with no profiler attached (median
reported), then the peak bytes of one more full training step of each are measured with
``rowsft.memory.measure_peak`` (CUDA: ``max_memory_allocated``; CPU: the profiler's memory events,
never RSS).
Results are printed as a table and written to ``benchmarks/results/<name>.json`` atomically.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads on a shared machine
import torch  # noqa: E402
from rowsft.lean_loss import training_loss

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class MethodResult:
    method: str
    trainable_parameters: int
    peak_bytes: int
    median_step_s: float
    step_times_s: list[float] = field(default_factory=list)
    analytic: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def precision(autocast: str | None):
    """The context every step runs in: ``torch.autocast`` to ``autocast`` ("bf16", "fp16") on the
    model's device type, or nothing (the models' own dtype, float32 here)."""
    if autocast is None:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[autocast])


class _Stepper:
    """One model with its AdamW over the trainable parameters, stepping on a fixed batch: the optimizer `rowsft.train`
    builds (fused where torch has the kernel, as transformers' Trainer defaults to), for every method alike."""

    def __init__(self, model, batch: dict, lr: float = 1e-4, autocast: str | None = None):
        from rowsft.training import TrainConfig
        from rowsft.training.parts import build_optimizer
        self.model, self.batch, self.autocast = model, batch, autocast
        self.opt = build_optimizer([p for p in model.parameters() if p.requires_grad], TrainConfig(lr=lr))
        model.train()

    def step(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with precision(self.autocast):
            loss = training_loss(self.model, self.batch)   # as rowsft.train computes it (LM head at labelled positions)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def measure_methods(builders: list[tuple[str, Callable[[], torch.nn.Module]]], batch: dict, steps: int = 3,
                    warmup: int = 1, extras: list[dict] | None = None, compile_model: bool = False,
                    autocast: str | None = None, order_seed: int | None = 0) -> list[MethodResult]:
    """Measure several methods side by side.

    Every model is built first; then the timed steps are interleaved, one step of every method per round, so
    background load on a shared machine falls on all methods alike and the ratios stay fair. The order within a
    round is drawn afresh each round (``order_seed``; None: the same order every round, A B C A B C …), so what one
    method leaves behind (a cold cache, memory handed back to the system) does not always fall on the same next
    one; each timed step's place in its round is kept in ``extra["positions"]``. Peak
    memory is measured afterwards, one model at a time, with `rowsft.memory.measure_peak`.
    ``compile_model``: wrap each model in ``torch.compile`` (inductor); the first step's time, which
    includes compiling forward and backward, goes to ``extra["first_step_s"]``. ``autocast``: run every
    step, the measured one included, under `precision` (weights stay as loaded; no analytic figure then,
    since `rowsft.memory.breakdown` prices the models' own dtype).
    """
    from rowsft import memory
    extras = [dict(e) for e in (extras or [{}] * len(builders))]
    steppers = [_Stepper(torch.compile(build()) if compile_model else build(), batch, autocast=autocast)
                for _, build in builders]
    times: list[list[float]] = [[] for _ in steppers]
    rng = random.Random(order_seed)
    for i in range(warmup + steps):
        order = list(range(len(steppers)))
        if order_seed is not None:
            rng.shuffle(order)
        for position, j in enumerate(order):
            dt = steppers[j].step()
            if i == 0:
                extras[j]["first_step_s"] = dt
            if i >= warmup:
                times[j].append(dt)
                extras[j].setdefault("positions", []).append(position)
    results = []
    for j, ((name, _), st) in enumerate(zip(builders, steppers)):
        model = st.model
        st.opt = None
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        with precision(autocast):
            peak = memory.measure_peak(model, batch)
        analytic = memory.breakdown(model, batch).byte_counts() if autocast is None else {}
        results.append(MethodResult(name, trainable, int(peak["peak"]), statistics.median(times[j]), times[j],
                                    analytic, extras[j]))
        steppers[j] = None
        del model, st
    return results


def table(results: list[MethodResult], reference: str | None = None) -> str:
    ref = next((r for r in results if r.method == reference), None)
    head = f"{'method':<40}{'trainable':>12}{'peak MiB':>11}{'analytic MiB':>14}{'step s':>9}"
    if ref:
        head += f"{'mem ×ref':>10}{'time ×ref':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        analytic = f"{r.analytic['total'] / 2**20:.1f}" if "total" in r.analytic else "-"
        line = f"{r.method:<40}{r.trainable_parameters:>12,}{r.peak_bytes / 2**20:>11.1f}{analytic:>14}{r.median_step_s:>9.3f}"
        if ref:
            line += f"{r.peak_bytes / ref.peak_bytes:>10.3f}{r.median_step_s / ref.median_step_s:>11.3f}"
        lines.append(line)
    return "\n".join(lines)


def write_results(name: str, payload: dict, path: Path | None = None) -> Path:
    """``payload`` with the machine, command and date, written atomically to ``benchmarks/results/<name>.json``, or to
    ``path`` (a results file being updated in place, wherever it lies)."""
    from rowsft.io_utils import atomic_write_text
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    atomic_write_text(path, json.dumps(payload, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    return path


def real_batch(tokenizer, batch_size: int, seq_len: int, task: str = "boolq", seed: int = 0) -> dict:
    """A training batch of real task text, padded/truncated to exactly ``seq_len`` tokens."""
    from rowsft import data as zoo
    data = zoo.load_dataset(task, seed=seed)
    batches = zoo.batches(data["train"], tokenizer, batch_size=batch_size, max_length=seq_len, seed=seed)
    batch = next(iter(batches))
    t = batch["input_ids"].shape[1]
    if t < seq_len:  # pad to the full length so every method sees seq_len tokens
        pad = seq_len - t
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=pad_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
        if batch["labels"].dim() == 2:
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=-100)
    return batch
