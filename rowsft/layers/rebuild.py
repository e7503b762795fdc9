"""Rebuildable layer inputs: keep what the frozen model keeps anyway, not a second copy of the input.

A row (or element) update needs its layer's input ``x`` again in backward, for ``grad delta =
gᵀ x``. In a transformer most such inputs are cheap functions of tensors that the frozen model's
own autograd graph keeps anyway:

- the input of ``q/k/v`` and ``gate/up`` is a norm's output, ``norm(h)``; the norm keeps ``h``
  for its own backward when ``h`` needs grad (LayerNorm; transformers' RMSNorms keep their input
  upcast to float32, which is ``h`` itself only for a float32 ``h``: only then is a norm a source);
- the input of ``down_proj`` (``c_proj`` of GPT-2's MLP) is ``act(gate) * up`` (or GPT-2's
  ``a * b`` written-out GELU); the product's backward node keeps both factors;
- the input of BERT's ``output.dense`` is ``gelu(h)``; the GELU node keeps ``h``.

So a sparse layer may keep a *source* instead of ``x``: the tensors ``x`` was computed from and a
function that computes it again, bit for bit, in backward (the same kernels on the same inputs,
under the same autocast state). The source's tensors are kept by the frozen graph already, so the
layer's input costs nothing between forward and backward; backward pays one elementwise pass.

:func:`source_of` finds a source for a layer input; :func:`track_norm_outputs` installs the forward
hooks that make norm outputs findable. Nothing is rebuilt under ``torch.compile`` or inside
another saved-tensor-hooks region (gradient checkpointing already recomputes those inputs; reading
a node's saved tensors there would unpack through the other hooks), nor when grad is off.
Autograd's version counters still guard the kept tensors: one modified in place makes backward
raise, as it would for the frozen model itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

_TAG = "_rowsft_source"


def global_forward_hooks() -> bool:
    """Whether global module forward (pre-)hooks are registered (``nn.modules.module.register_module_forward_hook``)."""
    return bool(getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


class Shared:
    """One rebuilt input for the layers that read it (q/k/v, gate/up): built by the first of them to run
    backward, handed to the others, dropped after the last (``users`` counts the layers still to come).

    Backward reads the input only in the update's compute dtype, so it is handed over cast to that
    dtype, once for all the layers (under autocast: one bf16 copy, not a cast per layer). A layer that
    asks for another dtype gets a fresh rebuild, never a cast of a cast."""

    def __init__(self):
        self.users, self.value = 0, None

    def take(self, rebuild, tensors, dtype: torch.dtype) -> torch.Tensor:
        value = self.value
        if value is None or value.dtype != dtype:
            value = rebuild(*tensors).to(dtype)
        self.users -= 1
        self.value = value if self.users > 0 else None
        return value


@dataclass(frozen=True)
class Source:
    """``rebuild(*tensors)`` equals the layer input, bit for bit; ``what`` names the rule (for reports);
    ``shared``: the rebuilt value's hand-over between the layers that read the same input; ``scaled``:
    ``(weight (d,), scale (..., 1))`` when the input is ``weight * (tensors[0] * scale)`` (a scaled RMSNorm's
    output), so that a row update's gradient can take the two scalings on its thin factors instead of
    rebuilding the input (`rowsft.layers.autograd.RowUpdate`)."""
    tensors: tuple[torch.Tensor, ...]
    rebuild: Callable[..., torch.Tensor]
    what: str
    shared: Shared = field(default_factory=Shared)
    scaled: tuple[torch.Tensor, torch.Tensor] | None = None


def transparent(pack):
    """Mark a ``saved_tensors_hooks`` pack function that hands tensors through (or only counts them, as
    `rowsft.memory.SavedTensorCounter` does): sources are still found inside its region."""
    pack._rowsft_transparent = True
    return pack


def _other_hooks_active() -> bool:
    """True inside a ``saved_tensors_hooks`` region (e.g. non-reentrant checkpointing) not marked `transparent`."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:  # pragma: no cover - older torch: assume the worst
        return True
    try:
        hooks = top(True)
    except TypeError:  # pragma: no cover - signature without the tracing flag
        hooks = top()
    return hooks is not None and not getattr(hooks[0], "_rowsft_transparent", False)


def enabled() -> bool:
    """Whether sources may be found and kept now."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling() and not _other_hooks_active())


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _norm_rebuild(module: nn.Module, device_type: str, autocast: tuple[bool, torch.dtype]):
    if isinstance(module, _ScaledNorm):       # two multiplications, which autocast never casts
        def scaled(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return module.forward(h)
        return scaled

    def rebuild(h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type, dtype=autocast[1], enabled=autocast[0]):
            return module.forward(h)      # not module(h): no hooks run again in backward
    return rebuild


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or any ``*RMSNorm`` / ``*LayerNorm`` class (Llama, Mistral, Qwen, T5 ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def _tag_norm_output(module: nn.Module, inputs: tuple, output) -> None:
    if not (torch.is_tensor(output) and inputs and torch.is_tensor(inputs[0]) and enabled()):
        return
    h = inputs[0]
    if not h.requires_grad or not (isinstance(module, nn.LayerNorm) or h.dtype == torch.float32):
        return   # the norm keeps h only when h needs grad (and an RMSNorm keeps h itself only in float32)
    if module._forward_pre_hooks or len(module._forward_hooks) > 1 or global_forward_hooks() or len(inputs) != 1 \
            or h.shape != output.shape or h.element_size() > output.element_size():
        return   # other hooks (they might change the output), extra arguments, a wider input: keep x itself
    device_type = h.device.type
    source = _scaled_source(module, h, output, device_type)
    if source is None:
        source = Source((h,), _norm_rebuild(module, device_type, _autocast_state(device_type)), "norm")
    setattr(output, _TAG, source)


class _ScaledNorm:
    """An RMSNorm's output from what its last product keeps: ``weight * (h * scale)``, ``scale (..., 1)``; stands in
    for the norm module in `_norm_rebuild`."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        self.weight, self.scale = weight, scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.mul(self.weight, torch.mul(h, self.scale))     # (d,) * ((..., d) * (..., 1))


def _scaled_source(module: nn.Module, h: torch.Tensor, output: torch.Tensor, device_type: str) -> Source | None:
    """An RMSNorm computed as ``weight * (h * scale)`` (Llama, Mistral, Qwen ...; ``scale = rsqrt(mean(h²) + eps)``,
    ``(..., 1)``): the product's node keeps ``h`` and ``scale``, so backward rebuilds the output with those two
    multiplications instead of running the whole norm again (0.5 ms → 0.12 ms for SmolLM2 at 1024 tokens).

    Checked on the graph at every call (the nodes, the weight and ``h`` themselves), and once per norm, autocast
    state and dtype on the values: the rule is used only where it gave the norm's output bit for bit."""
    weight, node = getattr(module, "weight", None), output.grad_fn
    if not isinstance(weight, torch.Tensor) or node is None or node.name() != "MulBackward0" \
            or len(node.next_functions) != 2 or node.next_functions[1][0] is None:
        return None
    inner = node.next_functions[1][0]
    if inner.name() != "MulBackward0":
        return None
    w, kept, scale = _saved(node, "_saved_self"), _saved(inner, "_saved_self"), _saved(inner, "_saved_other")
    if not all(torch.is_tensor(t) for t in (w, kept, scale)) or w.data_ptr() != weight.data_ptr() \
            or w.shape != weight.shape or kept.data_ptr() != h.data_ptr() or kept.shape != h.shape \
            or kept.stride() != h.stride() or kept.dtype != h.dtype or scale.shape != h.shape[:-1] + (1,):
        return None
    scaled = _ScaledNorm(weight, scale)        # scale: (..., 1), kept by the norm's own node anyway
    autocast = _autocast_state(device_type)
    checked = module.__dict__.setdefault("_rowsft_scaled_rebuild", {})
    key = (h.dtype, output.dtype, device_type, autocast)
    if key not in checked:                     # once: the rule must give the norm's own bits
        with torch.no_grad():
            checked[key] = bool(torch.equal(scaled.forward(h), output))
    if not checked[key]:
        return None
    return Source((h,), _norm_rebuild(scaled, device_type, autocast), "norm", scaled=(weight, scale))


def track_norm_outputs(model: nn.Module) -> list:
    """Forward hooks on every norm of ``model`` that tag its output with a :class:`Source`; returns the handles."""
    return [m.register_forward_hook(_tag_norm_output) for m in model.modules() if is_norm(m)]


def _no_grad(fn):
    """``fn`` run under ``no_grad``: the rebuild of a product or an activation from its kept tensors."""
    def rebuild(*tensors: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(*tensors)
    return rebuild


def _activation(node) -> Callable | None:
    name = node.name()
    if name == "SiluBackward0":
        return F.silu
    if name == "GeluBackward0":
        approximate = node._saved_approximate
        return lambda h: F.gelu(h, approximate=approximate)
    return None


class _CountOnly:
    """A saved tensor read inside a count-only forward (`SavedTensorCounter(backward=False)`), which
    cannot be unpacked: it was saved (and counted) by its node, so the source keeps nothing more."""


def _saved(node, attr):
    try:
        return getattr(node, attr)
    except RuntimeError:          # a count-only placeholder that refuses to unpack
        return _CountOnly


def _cannot_rebuild(*tensors):    # pragma: no cover - a count-only forward is never backpropagated
    raise RuntimeError("this forward pass was run only to count its saved tensors; it cannot be backpropagated")


def _graph_source(kept, rebuild, what, check) -> Source | None:
    if any(t is None for t in kept):
        return None                   # a factor that does not require grad is not saved by its node
    if any(t is _CountOnly for t in kept):
        return Source((), _cannot_rebuild, what)
    return Source(tuple(kept), rebuild, what) if check(*kept) else None


def _from_graph(x: torch.Tensor) -> Source | None:
    """A product whose node keeps both factors, or a SiLU/GELU whose node keeps its input."""
    node = x.grad_fn
    if node is None:
        return None
    if node.name() == "MulBackward0":
        return _graph_source((_saved(node, "_saved_self"), _saved(node, "_saved_other")), _no_grad(torch.mul), "product",
                             lambda a, b: torch.broadcast_shapes(a.shape, b.shape) == x.shape
                             and torch.result_type(a, b) == x.dtype)
    fn = _activation(node)
    if fn is not None:
        return _graph_source((_saved(node, "_saved_self"),), _no_grad(fn), "activation",
                             lambda h: h.shape == x.shape and h.dtype == x.dtype)
    return None


def source_of(x: torch.Tensor) -> Source | None:
    """How to rebuild the layer input ``x`` in backward from tensors the frozen graph keeps, or None."""
    if not enabled():
        return None
    tagged = getattr(x, _TAG, None)
    if tagged is not None:
        return tagged
    return _from_graph(x)


__all__ = ["Source", "Shared", "source_of", "track_norm_outputs", "is_norm", "enabled", "transparent"]
