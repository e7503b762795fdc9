"""Measured memory: the peak bytes of one real training step, from PyTorch's own allocation accounting.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` + ``max_memory_allocated`` around the step.
- CPU: ``torch.profiler.profile(activities=[CPU], profile_memory=True)`` records one ``[memory]``
  event per allocation (+bytes) and free (-bytes) of the CPU allocator. On torch 2.13 they are read
  from ``prof.profiler.kineto_results.events()`` (name ``"[memory]"``, ``nbytes()`` signed,
  ``start_ns()``); walking them in time order gives the running sum of live bytes, whose maximum is
  the peak *delta*. (Fallback for other versions: ``prof.events()``, whose ``[memory]`` entries carry
  ``cpu_memory_usage`` and whose ops carry their ``self_cpu_memory_usage``.)

Neither counts bytes that were live before the measured region, so the reported peak is
``baseline + peak_delta`` where ``baseline`` is the bytes of the tensors the step starts with
(parameters, buffers, the quantization statistics of bitsandbytes layers, optimizer state, the batch;
unique storages). Never RSS.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from rowsft.data.batching import to_device
from rowsft.layers.cast_weights import kept_copies
from rowsft.layers.tuner import parameters_to_train
from rowsft.lean_loss import training_loss
from rowsft.targets import is_quantized, linear_shape, quantization_tensors, weight_dtype


def storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr())


def unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied tensors count once)."""
    seen: dict[tuple, int] = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            continue
        seen.setdefault(storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def state_tensors(obj: Any):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from state_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from state_tensors(v)


def quantization_state(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors quantized layers keep beside their parameters (bitsandbytes' absmax per block, code tables,
    int8 row scales): part of the weights' memory, though neither parameters nor buffers."""
    return [t for module in model.modules() for t in quantization_tensors(module)]


def dequantized_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the largest quantized layer's weight dequantized to its float dtype: the transient that
    bitsandbytes makes and frees in each forward and backward of that layer (0 without quantized layers)."""
    sizes = [linear_shape(m)[0] * linear_shape(m)[1] * torch.empty((), dtype=weight_dtype(m)).element_size()
             for m in model.modules() if is_quantized(m) and not hasattr(m, "base_layer")]
    return max(sizes, default=0)


def live_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, extra: Any = ()) -> int:
    """Bytes live in ``model`` (parameters, buffers, quantization statistics, weights kept in the autocast dtype
    (`rowsft.layers.cast_weights`), gradients), ``optimizer``'s state and ``extra``."""
    tensors = list(model.parameters()) + list(model.buffers()) + quantization_state(model) + kept_copies(model)
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += list(state_tensors(optimizer.state))
    tensors += list(state_tensors(extra))
    return unique_storage_bytes(tensors)


# ---------------------------------------------------------------- peak of a region
def memory_deltas(prof) -> list[tuple[int, int]]:
    """``[(time, signed bytes), ...]`` of the CPU allocator events of a finished profile, in time order."""
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        events = [(e.start_ns(), e.nbytes()) for e in results.events()
                  if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")]
        return sorted(events, key=lambda x: x[0])
    out = []  # fallback: allocations are attributed to the op that made them, frees are [memory] events
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else getattr(e, "self_cpu_memory_usage", 0)
        if delta:
            out.append((e.time_range.start, delta))
    return sorted(out, key=lambda x: x[0])


def profile_peak(prof) -> tuple[int, int, int]:
    """``(peak, end, events)`` of a finished CPU memory profile: the most bytes allocated at once above
    its start, the bytes still allocated at its end, and how many allocator events it holds."""
    running = peak = 0
    deltas = memory_deltas(prof)
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return int(peak), int(running), len(deltas)


def cpu_peak(fn: Callable[[], Any]) -> dict:
    """Run ``fn()`` under the CPU memory profiler; ``{"peak_delta", "end_delta", "events", "result"}``:
    the most bytes allocated at once above the start, the bytes still allocated at the end."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    peak, end, events = profile_peak(prof)
    return {"peak_delta": peak, "end_delta": end, "events": events, "result": result}


def cuda_peak(fn: Callable[[], Any], device: torch.device) -> dict:
    """Run ``fn()`` and read the CUDA caching allocator's counters (same keys as `cpu_peak`)."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return {"peak_delta": int(torch.cuda.max_memory_allocated(device) - start),
            "end_delta": int(torch.cuda.memory_allocated(device) - start), "events": None, "result": result,
            "allocator_live_at_start": int(start)}


def region_peak(fn: Callable[[], Any], device: torch.device) -> dict:
    """`cuda_peak` on a CUDA device, `cpu_peak` elsewhere."""
    device = torch.device(device)
    return cuda_peak(fn, device) if device.type == "cuda" else cpu_peak(fn)


# ---------------------------------------------------------------- one training step
def _default_optimizer(params):
    # lr=0 keeps the weights still while allocating and computing exactly as a real AdamW step does
    return torch.optim.AdamW(params, lr=0.0)


def measure_peak(model: torch.nn.Module, batch: dict, optimizer_factory: Callable | None = None, steps: int = 2,
                 lean_logits: bool = True) -> dict:
    """Peak bytes of a full training step (forward, backward, optimizer step) of ``model`` on ``batch``.

    ``steps - 1`` warm-up steps run first so that the optimizer state exists, then the last step is
    measured (gradients of the previous step are dropped first, as `rowsft.train` does).
    ``optimizer_factory(params) -> Optimizer`` (default AdamW). The model's trainable weights, their
    gradients and its train/eval mode are restored afterwards. ``lean_logits``: compute the loss as
    `rowsft.train` does by default (LM head only at labelled positions, `rowsft.lean_loss`).

    Returns ``{"peak", "baseline", "peak_delta", "end_delta", "device", "source", "steps"}`` in bytes:
    ``peak = baseline + peak_delta``, ``baseline`` = parameters + buffers + optimizer state + batch.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = parameters_to_train(model)
    device = params[0].device
    batch = to_device(batch, device)
    saved_weights = [p.detach().clone() for p in params]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    optimizer = (optimizer_factory or _default_optimizer)(params)
    was_training = model.training

    def one_step():
        loss = training_loss(model, batch, lean_logits)
        loss.backward()
        optimizer.step()
        del loss

    try:
        model.train()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(steps - 1):
                optimizer.zero_grad(set_to_none=True)
                one_step()
            optimizer.zero_grad(set_to_none=True)
            baseline = live_bytes(model, optimizer, extra=batch)
            measured = region_peak(one_step, device)
    finally:
        with torch.no_grad():
            for p, w, g in zip(params, saved_weights, saved_grads):
                p.copy_(w)
                p.grad = g
        model.train(was_training)
        del optimizer
    source = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
              else "torch.profiler CPU memory events")
    out = {"peak": baseline + measured["peak_delta"], "baseline": baseline, "peak_delta": measured["peak_delta"],
           "end_delta": measured["end_delta"], "device": str(device), "source": source, "steps": steps}
    if "allocator_live_at_start" in measured:
        out["allocator_live_at_start"] = measured["allocator_live_at_start"]
    return out


__all__ = ["measure_peak", "cpu_peak", "cuda_peak", "region_peak", "live_bytes", "unique_storage_bytes",
           "quantization_state", "dequantized_weight_bytes"]
