"""Where the memory of a fine-tuning step goes: an analytic breakdown, a fast prediction, a measurement.

- `breakdown(model, batch)` → `MemoryReport`: weights, trainable, gradients, optimizer state,
  activations (counted exactly: the bytes autograd saves for backward during one forward of
  ``batch``, over unique storages, parameters and buffers excluded), the index buffers of rowsft's
  sparse layers, and the largest transient (logits and their gradient).
- `predict(model, selection_or_method, batch_size, seq_len)` → `MemoryReport` without any forward
  pass (see `rowsft.memory.prediction` for the activation formula).
- `measure_peak(model, batch)` → the peak bytes of one real training step, from PyTorch's
  allocation accounting (see `rowsft.memory.measure`).
- `MemoryCallback`: records these figures during `rowsft.train` into ``state.memory``.

The analytic total ``weights + gradients + optimizer + activations + indices + transient`` is an
upper bound of the peak of a step: gradients and activations do not fully coexist (activations are
freed while gradients appear during backward), which matters only when the trainable part is large.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields

import torch

from rowsft.data.batching import to_device
from rowsft.layers.rebuild import transparent
from rowsft.layers.sparse import is_sparse_layer
from rowsft.lean_loss import lean_forward
from rowsft.memory.measure import (
    dequantized_weight_bytes,
    quantization_state,
    state_tensors,
    storage_key,
    unique_storage_bytes,
)
from rowsft.targets import quantization_kind

MiB = 1024 ** 2
PARTS = ("weights", "gradients", "optimizer", "activations", "indices", "transient")

# optimizer name -> state tensors it keeps per trained weight (each the weight's size and dtype)
OPTIMIZER_MOMENTS = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}


@dataclass
class MemoryReport:
    """Bytes of each part of a training step's memory. ``trainable`` is part of ``weights`` (listed
    for reference, not added twice); ``total`` adds the `PARTS`."""
    weights: int = 0
    trainable: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    indices: int = 0
    transient: int = 0
    method: str = ""
    details: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(getattr(self, p) for p in PARTS))

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        d["total"] = self.total
        return d

    def byte_counts(self) -> dict[str, int]:
        """The byte figures alone (`as_dict` without ``method``), as ints, for tables and results files."""
        return {k: int(v) for k, v in self.as_dict().items() if k != "method"}

    def __str__(self) -> str:
        rows = [("weights", self.weights), ("  of which trainable", self.trainable)] + \
               [(p, getattr(self, p)) for p in PARTS[1:]] + [("total", self.total)]
        width = max(len(r[0]) for r in rows)
        title = f"memory ({self.method})" if self.method else "memory"
        lines = [title] + [f"  {name:<{width}}  {value / MiB:10.2f} MiB" for name, value in rows]
        return "\n".join(lines)


# ---------------------------------------------------------------- static parts
def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def optimizer_bytes(trainable: list[torch.Tensor], optimizer="adamw") -> int:
    """Optimizer state of ``trainable`` tensors: AdamW keeps 2 moments per weight (in the weight's dtype,
    as ``torch.optim.AdamW`` does; fp32 for fp32 weights), SGD none, SGD with momentum one. An
    optimizer object is priced by its actual state when it has one, else by its kind. The per-tensor
    step counters (a 4-byte scalar each) are not counted."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if optimizer.state:
            return unique_storage_bytes(t for t in state_tensors(optimizer.state) if t.dim() > 0)
        name = type(optimizer).__name__.lower()
        momentum = optimizer.defaults.get("momentum", 0.0)
        optimizer = "adamw" if name.startswith("adam") else ("sgd-momentum" if momentum else "sgd")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_MOMENTS)} or a torch.optim.Optimizer, "
                         f"got {optimizer!r}")
    return OPTIMIZER_MOMENTS[optimizer] * sum(t.numel() * t.element_size() for t in trainable)


def index_bytes(model: torch.nn.Module) -> int:
    """Bytes of the index buffers of rowsft sparse layers (any module with ``indices`` and ``unit``)."""
    total = 0
    for module in model.modules():
        if is_sparse_layer(module):
            total += module.indices.numel() * module.indices.element_size()
            extra = getattr(module, "bias_indices", None)
            if torch.is_tensor(extra):
                total += extra.numel() * extra.element_size()
    return total


def pretrained_row_copies(model: torch.nn.Module) -> list[torch.Tensor]:
    """The pretrained rows that layers training their rows inside the base weight keep (`rowsft.layers.in_weight`):
    weight data, as large as those layers' deltas."""
    return [m.pretrained_rows for m in model.modules() if torch.is_tensor(getattr(m, "pretrained_rows", None))]


def static_report(model: torch.nn.Module, optimizer="adamw", method: str | None = None) -> MemoryReport:
    """Weights, trainable, gradients, optimizer and indices of ``model`` (no activations)."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    trainable_bytes = unique_storage_bytes(trainable)
    idx = index_bytes(model)
    weights = unique_storage_bytes(params + quantization_state(model) + pretrained_row_copies(model))
    # quantized layers: codes + their scales; rows trained in the weight: the pretrained rows they keep
    return MemoryReport(weights=weights, trainable=trainable_bytes, gradients=trainable_bytes,
                        optimizer=optimizer_bytes(trainable, optimizer), indices=idx,
                        method=method or describe_method(model))


def describe_method(model: torch.nn.Module) -> str:
    units = sorted({m.unit for m in model.modules() if is_sparse_layer(m)})
    if units:
        return "rowsft-" + "/".join(units)
    if any("lora_" in n for n, _ in model.named_parameters()):
        return "lora"
    params = list(model.parameters())
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    if n_trainable == sum(p.numel() for p in params):
        return "full"
    return "partial" if n_trainable else "frozen"


# ---------------------------------------------------------------- activations
_COUNTED_ONLY = object()   # what the graph keeps instead of a tensor in a count-only forward


class SavedTensorCounter:
    """Counts the bytes autograd saves for backward inside the ``with`` block, over unique storages,
    skipping the storages of ``exclude`` (parameters, buffers). ``hold=True`` keeps a reference to
    each counted storage until exit so that no freed address is reused (exact; use it outside
    training); ``hold=False`` keeps only addresses (no effect on the step's memory).

    ``backward=False`` (a forward run only to be counted): the graph gets a placeholder instead of
    each saved tensor. Handing autograd the tensor itself would tie the graph into a reference cycle
    through C++ (an op that saves its own output) that Python's collector cannot see, and a forward
    that is never backpropagated would then keep its activations, and the weights it saved, forever.
    """

    def __init__(self, exclude=(), hold: bool = True, backward: bool = True):
        self.exclude = {storage_key(t) for t in exclude}
        self.hold = hold
        self.backward = backward
        self.seen: dict[tuple, int] = {}
        self._held: list = []
        self._hooks = None

    @property
    def bytes(self) -> int:
        return int(sum(self.seen.values()))

    def note(self, t: torch.Tensor) -> None:
        """Count ``t`` as kept for backward (once per storage): for tensors an op keeps outside autograd's
        saved tensors (bitsandbytes' int8 matmul keeps its input as a plain attribute of its context)."""
        if t.device.type != "meta":
            key = storage_key(t)
            if key not in self.exclude and key not in self.seen:
                storage = t.untyped_storage()
                self.seen[key] = storage.nbytes()
                if self.hold:
                    self._held.append(storage)

    @transparent   # rowsft.layers.rebuild still finds layer-input sources while counting (and counts their tensors)
    def _pack(self, t: torch.Tensor):
        self.note(t)
        return t if self.backward else _COUNTED_ONLY

    @staticmethod
    def _unpack(packed):
        if packed is _COUNTED_ONLY:
            raise RuntimeError("this forward pass was run only to count its saved tensors "
                               "(SavedTensorCounter(backward=False)); it cannot be backpropagated")
        return packed

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._held.clear()


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers()) + quantization_state(model)


def _logits_bytes(output, batch: dict) -> int:
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if not torch.is_tensor(logits):
        return 0
    # backward of the loss makes the gradient of the fp32 log-probabilities and of the logits
    return logits.numel() * (4 + logits.element_size())


@contextlib.contextmanager
def int8_inputs_counted(model: torch.nn.Module, counter: SavedTensorCounter):
    """Count the inputs that bitsandbytes' int8 layers keep for their backward (not through autograd's saved
    tensors, so the counter would not see them): every input that needs a gradient, in training mode."""
    def keep(module, inputs):
        x = inputs[0] if inputs else None
        if torch.is_tensor(x) and x.requires_grad and torch.is_grad_enabled() and module.training:
            counter.note(x)
    handles = [m.register_forward_pre_hook(keep) for m in model.modules()
               if quantization_kind(m) == "int8" and not hasattr(m, "base_layer")]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def activation_bytes(model: torch.nn.Module, batch: dict, lean_logits: bool = True) -> tuple[int, int]:
    """``(activations, transient)`` of one train-mode forward of ``batch``: bytes saved for backward
    (parameters and buffers excluded), and the largest transient of backward (the logits' gradients)."""
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad(), \
                SavedTensorCounter(model_tensors(model), hold=True, backward=False) as counter, \
                int8_inputs_counted(model, counter):
            output = lean_forward(model, batch, lean_logits)
            transient = _logits_bytes(output, batch) if counter.bytes else 0
            saved = counter.bytes
            del output
    finally:
        model.train(was_training)
    return saved, transient


def breakdown(model: torch.nn.Module, batch: dict, optimizer="adamw", lean_logits: bool = True) -> MemoryReport:
    """The memory of one training step of ``model`` on ``batch`` (bytes), part by part.

    ``weights``: every parameter once per storage (tied weights once, trainable included; a quantized
    layer's packed codes plus its absmax / scales, `rowsft.memory.measure.quantization_state`);
    ``trainable`` / ``gradients``: the parameters that require grad; ``optimizer``: their optimizer state
    (see `optimizer_bytes`); ``activations``: bytes autograd saves during one train-mode forward of
    ``batch`` (with its labels, so the loss is included; with ``lean_logits`` the LM head runs only at
    labelled positions, as `rowsft.train` does by default); ``indices``: rowsft index
    buffers; ``transient``: the logits' gradients that exist at the start of backward, plus, on a quantized
    base, the largest layer's dequantized weight (`rowsft.memory.measure.dequantized_weight_bytes`).

    With gradient checkpointing on, only what is saved outside the checkpointed blocks (and by the
    checkpoints themselves) counts; the recomputation of one block during backward does not.
    """
    report = static_report(model, optimizer)
    report.activations, report.transient = activation_bytes(model, batch, lean_logits)
    report.transient += dequantized_weight_bytes(model)    # a quantized layer's weight, dequantized for its matmul
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if torch.is_tensor(ids):
        report.details.update(batch_size=int(ids.shape[0]), seq_len=int(ids.shape[-1]))
    return report


__all__ = ["MemoryReport", "breakdown", "SavedTensorCounter", "static_report", "optimizer_bytes", "index_bytes",
           "activation_bytes", "PARTS"]
