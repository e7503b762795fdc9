"""Shared measurement for the benchmarks: every method is measured the same way, side by side.

For each method: build a fresh model, prepare it (apply rows, wrap in LoRA, ...), run warm-up
steps, time ``steps`` optimizer steps without any profiler attached (median reported), then
measure the peak bytes of one more full training step with ``rowsft.memory.measure_peak``
(CUDA: ``max_memory_allocated``; CPU: the profiler's memory events — never RSS).
Results are printed as a table and written to ``benchmarks/results/<name>.json`` atomically.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: no spinning threads on a shared machine
import torch  # noqa: E402

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


def time_steps(model, batch: dict, steps: int, warmup: int = 1, lr: float = 1e-4) -> list[float]:
    """Wall time of ``steps`` AdamW steps (forward, backward, step) over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    times = []
    for i in range(warmup + steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del opt
    return times


def measure_method(name: str, build: Callable[[], torch.nn.Module], batch: dict, steps: int = 3, warmup: int = 1,
                   extra: dict | None = None) -> MethodResult:
    """Build the prepared model, time it, then measure its peak step memory and analytic breakdown."""
    from rowsft import memory
    model = build()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = time_steps(model, batch, steps, warmup)
    model.zero_grad(set_to_none=True)
    peak = memory.measure_peak(model, batch)
    report = memory.breakdown(model, batch)
    result = MethodResult(name, trainable, int(peak["peak"]),
                          statistics.median(times), times, {k: int(v) for k, v in report.as_dict().items() if isinstance(v, (int, float))},
                          extra or {})
    del model
    return result


def table(results: list[MethodResult], reference: str | None = None) -> str:
    ref = next((r for r in results if r.method == reference), None)
    head = f"{'method':<28}{'trainable':>12}{'peak MiB':>11}{'analytic MiB':>14}{'step s':>9}"
    if ref:
        head += f"{'mem ×ref':>10}{'time ×ref':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        analytic = r.analytic.get("total", 0) / 2**20
        line = f"{r.method:<28}{r.trainable_parameters:>12,}{r.peak_bytes / 2**20:>11.1f}{analytic:>14.1f}{r.median_step_s:>9.3f}"
        if ref:
            line += f"{r.peak_bytes / ref.peak_bytes:>10.3f}{r.median_step_s / ref.median_step_s:>11.3f}"
        lines.append(line)
    return "\n".join(lines)


def write_results(name: str, payload: dict) -> Path:
    from rowsft.io_utils import atomic_write_text
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
               "date": time.strftime("%Y-%m-%d %H:%M"), **payload}
    atomic_write_text(path, json.dumps(payload, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    return path


def real_batch(tokenizer, batch_size: int, seq_len: int, task: str = "boolq", seed: int = 0) -> dict:
    """A training batch of real task text, padded/truncated to exactly ``seq_len`` tokens."""
    from rowsft import zoo
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
