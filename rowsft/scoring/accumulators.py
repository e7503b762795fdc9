"""Streaming per-layer accumulators of the importance metrics, fed by hooks during calibration passes.

Every metric is an element-level quantity ``e_ij`` of a layer's ``(d_out, d_in)`` weight; a *view*
reduces it: ``row`` → ``Σ_j e_ij`` (d_out,), ``column`` → ``Σ_i e_ij`` (d_in,), ``element`` → ``e``.
Exceptions: ``magnitude`` (row/column norms) and ``activation`` (neuron activation norms).

Gradient metrics never ask the weights for gradients. A forward hook on each target layer passes its
output through a *tap* (an identity autograd function) that saves the layer input ``X (B, T, d_in)``
and, during ``loss.backward()``, receives ``G_out (B, T, d_out)``; the layer's weight gradient
``G_out^T X`` is formed there, transiently, one layer at a time, reduced at once, and dropped.
Gradient flow comes from making the input embeddings' output require grad; every parameter keeps
``requires_grad=False``, so no ``.grad`` is ever allocated. Because ``X`` is an autograd saved tensor,
block recomputation (`rowsft.scoring.recompute`, on by default) drops it with the rest of a block's
activations after the forward pass and rebuilds it when backward reaches the block.

Definitions (``b`` = calibration batch, ``L_b`` = the model's loss on it, ``G^b = ∂L_b/∂W``):

- ``taylor``:   ``e = Σ_b |W ⊙ G^b|`` — first-order Taylor, accumulated *per batch*. This is the
  chosen definition (not ``|W ⊙ Σ_b G^b|``): it is exact in one streaming pass with no gradient
  outliving its batch, whereas the total-gradient form needs a dense running gradient per layer
  (all layers' gradients at once) or one pass over the batches per chunk of layers. With one batch
  the two coincide; in general the per-batch form bounds the other from above (triangle
  inequality). The total-gradient form is available as ``snip`` (dense accumulators).
- ``hessian`` (OBD): ``e = W² ⊙ E_n[g_n²]``, ``g_n = G_out[n]^T X[n]`` the per-example gradient:
  example ``n``'s share of its batch loss (``L_b = Σ_n share_n``; for equal-length examples
  ``∇ℓ_n / B``), "example" being index ``n`` of the layer input's first dimension. The mean runs
  over all examples of all batches (diagonal empirical Fisher). Per-example gradients exist only
  inside the hook, for a chunk of examples of one layer (``max_example_elements`` entries).
- ``fisher``:   ``e = E_n[g_n²]``.
- ``gradient`` ``|G|``, ``snip`` ``|W ⊙ G|``, ``taylor-fo`` ``(W ⊙ G)²``, ``force`` ``|W ⊙ G|``, with
  ``G = Σ_b G^b`` the gradient of the total calibration loss: these keep one dense ``(d_out, d_in)``
  accumulator per layer. ``force`` is FORCE's saliency evaluated once at the dense weights (the
  single-shot variant; the paper's iterative re-evaluation at the pruned weights is not done), hence
  equal to ``snip``.
- ``wanda``:    ``e = |W_ij| · ‖X_j‖`` with ``‖X_j‖`` the L2 norm of input feature ``j`` over all
  non-padding tokens (``attention_mask == 1``) of the calibration batches.
- ``activation``: row ``i`` → ``‖Y_i‖`` (norm of the output neuron over tokens), column ``j`` → ``‖X_j‖``.

Quantized layers (bitsandbytes nf4/fp4/int8): the tap sees the quantized layer's input and output
gradient as for any layer, so ``G^b`` needs no weight gradient; ``W`` is the layer's dequantized weight
(`rowsft.targets.weight_out_in`), made when the metric needs it, one layer at a time, and dropped at
once, so no dense copy of the model ever exists.

Sums are accumulated in float32 (float64 for float64 models). Under an initialised torch.distributed
process group the raw sums (and example counts) are all-reduced before the last step, so every rank
ends with the scores of all ranks' batches.

Measured (36M-parameter tiny Llama, 145 MiB of weights, one batch of 2 × 64 tokens, CPU, extra
peak RSS with glibc's mmap threshold pinned): plain ``loss.backward()`` with all weights trainable
+160 MiB; streaming ``taylor`` +66 MiB; ``hessian`` +90 MiB; ``snip`` (dense accumulators) +172 MiB.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn

from rowsft.distributed import is_distributed
from rowsft.lean_loss import lean_forward
from rowsft.scoring.recompute import recompute_blocks, transformer_blocks
from rowsft.targets import linear_shape, weight_dtype, weight_out_in

# element saliency from the weight W and the total gradient G (both (d_out, d_in)); overwrites G
TOTAL_GRADIENT_SALIENCY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradient": lambda w, g: g.abs_(),
    "snip": lambda w, g: g.mul_(w).abs_(),
    "taylor-fo": lambda w, g: g.mul_(w).square_(),
    "force": lambda w, g: g.mul_(w).abs_(),
}


def reduce_view(e: torch.Tensor, view: str) -> torch.Tensor:
    """Row sums ``(d_out,)``, column sums ``(d_in,)`` or the element tensor itself."""
    if view == "row":
        return e.sum(1)
    if view == "column":
        return e.sum(0)
    return e


def accumulation_dtype(weight: torch.Tensor | torch.dtype) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (bf16/fp16 weights accumulate in float32); takes a weight
    or its dtype (`rowsft.targets.weight_dtype`, which a quantized layer answers without dequantizing)."""
    dtype = weight if isinstance(weight, torch.dtype) else weight.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _device(module: nn.Module) -> torch.device:
    return getattr(module, "base_layer", module).weight.device


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum the accumulators over the ranks of an initialised process group (no-op otherwise)."""
    if is_distributed():
        for t in tensors:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(N, d)`` rows of ``x (B, T, d)`` at non-padding positions (all positions when no mask fits)."""
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.to(x.device).bool()]
    return x.reshape(-1, x.shape[-1])


def weight_gradient(x: torch.Tensor, g_out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight gradient ``G_out^T X`` (d_out, d_in) from ``X (…, d_in)`` and ``G_out (…, d_out)``."""
    return g_out.reshape(-1, g_out.shape[-1]).to(dtype).T @ x.reshape(-1, x.shape[-1]).to(dtype)


def per_example_square_sum(g_out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                           max_elements: int = 2 ** 24) -> torch.Tensor:
    """``Σ_n g_n²`` (d_out, d_in) with ``g_n = G_out[n]^T X[n]``; examples are processed in chunks so that
    at most ``max_elements`` per-example gradient entries exist at once."""
    b, d_out, d_in = x.shape[0], g_out.shape[-1], x.shape[-1]
    x3 = x.reshape(b, -1, d_in).to(dtype)          # (B, T, d_in)
    g3 = g_out.reshape(b, -1, d_out).to(dtype)     # (B, T, d_out)
    chunk = max(1, max_elements // max(1, d_out * d_in))
    total = torch.zeros(d_out, d_in, dtype=dtype, device=x.device)
    for s in range(0, b, chunk):
        g = torch.bmm(g3[s:s + chunk].transpose(1, 2), x3[s:s + chunk])  # (chunk, d_out, d_in)
        total += (g * g).sum(0)
    return total


class Accumulator:
    """Running sums of one metric over the calibration batches, for every target layer and view.

    ``views[name]`` lists what each layer must deliver (``row``, ``column``, ``element``); the group
    unit asks each member module for its own unit. Subclasses fill ``on_forward`` / ``on_backward``.
    """
    needs_backward = False

    def __init__(self, metric: str, targets: dict[str, nn.Module], views: dict[str, set[str]],
                 max_example_elements: int = 2 ** 24):
        self.metric, self.targets, self.views = metric, targets, views
        self.max_example_elements = max_example_elements
        self.sums: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, e: torch.Tensor) -> None:
        """Add an element-level contribution (d_out, d_in), reduced to the views ``name`` needs."""
        slot = self.sums.setdefault(name, {})
        for view in self.views[name]:
            part = reduce_view(e, view)
            if view in slot:
                slot[view].add_(part)
            else:
                slot[view] = part

    def on_forward(self, name: str, module: nn.Module, x: torch.Tensor, y: torch.Tensor, mask) -> None:
        pass

    def on_backward(self, name: str, module: nn.Module, x: torch.Tensor, g_out: torch.Tensor) -> None:
        pass

    def state(self) -> list[torch.Tensor]:
        """The raw accumulators (summed over ranks under torch.distributed)."""
        return [t for slot in self.sums.values() for t in slot.values()]

    def finish(self) -> dict[str, dict[str, torch.Tensor]]:
        missing = [n for n in self.targets if n not in self.sums]
        if missing:  # a layer the loss does not depend on (or that the forward pass skips): importance 0
            warnings.warn(f"{self.metric}: no {'gradient' if self.needs_backward else 'activation'} reached "
                          f"{len(missing)} target layers ({missing[:3]}...) during the calibration passes; "
                          "they score 0", stacklevel=3)
            for n in missing:
                module = self.targets[n]
                zeros = torch.zeros(linear_shape(module), dtype=accumulation_dtype(weight_dtype(module)),
                                    device=_device(module))                             # (d_out, d_in)
                self.sums[n] = {view: reduce_view(zeros, view) for view in self.views[n]}
        return self.sums


class TaylorAccumulator(Accumulator):
    """``Σ_b |W ⊙ G^b|`` reduced to the views, one layer's transient gradient at a time."""
    needs_backward = True

    def on_backward(self, name, module, x, g_out):
        w = weight_out_in(module)
        self.add(name, weight_gradient(x, g_out, accumulation_dtype(w)).mul_(w).abs_())  # in place: one transient


class SquaredGradientAccumulator(Accumulator):
    """OBD ``W² ⊙ E_n[g_n²]`` (``hessian``) or the diagonal empirical Fisher ``E_n[g_n²]`` (``fisher``)."""
    needs_backward = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.examples: dict[str, torch.Tensor] = {}

    def on_backward(self, name, module, x, g_out):
        dtype = accumulation_dtype(weight_dtype(module))
        e = per_example_square_sum(g_out, x, dtype, self.max_example_elements)  # (d_out, d_in)
        if self.metric == "hessian":
            w = weight_out_in(module)                                            # dequantized: transient
            e.mul_(w).mul_(w)
            del w
        self.add(name, e)
        count = self.examples.setdefault(name, torch.zeros((), dtype=dtype, device=x.device))
        count += x.shape[0]

    def state(self):
        return super().state() + list(self.examples.values())

    def finish(self):
        sums = super().finish()
        return {n: {v: t / self.examples[n] if n in self.examples else t for v, t in slot.items()}
                for n, slot in sums.items()}


class TotalGradientAccumulator(Accumulator):
    """Dense ``G = Σ_b G^b`` per layer, turned into ``gradient`` / ``snip`` / ``taylor-fo`` / ``force``."""
    needs_backward = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grads: dict[str, torch.Tensor] = {}

    def on_backward(self, name, module, x, g_out):
        grad = weight_gradient(x, g_out, accumulation_dtype(weight_dtype(module)))  # (d_out, d_in)
        if name in self.grads:
            self.grads[name] += grad
        else:
            self.grads[name] = grad

    def state(self):
        return list(self.grads.values())

    def finish(self):
        saliency = TOTAL_GRADIENT_SALIENCY[self.metric]
        while self.grads:  # one dense gradient freed per layer
            name, grad = self.grads.popitem()
            self.add(name, saliency(weight_out_in(self.targets[name]), grad))
        return super().finish()


class ActivationAccumulator(Accumulator):
    """Sums of squared inputs (and outputs) over non-padding tokens: ``wanda`` and ``activation``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_sq: dict[str, torch.Tensor] = {}
        self.output_sq: dict[str, torch.Tensor] = {}

    def on_forward(self, name, module, x, y, mask):
        dtype = accumulation_dtype(weight_dtype(module))
        xs = tokens(x, mask).to(dtype)  # (N, d_in)
        self.input_sq[name] = self.input_sq.get(name, 0) + (xs * xs).sum(0)
        if self.metric == "activation" and "row" in self.views[name]:
            ys = tokens(y, mask).to(dtype)  # (N, d_out)
            self.output_sq[name] = self.output_sq.get(name, 0) + (ys * ys).sum(0)

    def state(self):
        return list(self.input_sq.values()) + list(self.output_sq.values())

    def finish(self):
        for name, sq in self.input_sq.items():
            x_norm = sq.sqrt()  # (d_in,)
            if self.metric == "activation":
                slot = self.sums.setdefault(name, {})
                if "row" in self.views[name]:
                    slot["row"] = self.output_sq[name].sqrt()
                if "column" in self.views[name]:
                    slot["column"] = x_norm
            else:
                w = weight_out_in(self.targets[name]).to(sq.dtype).abs()
                self.add(name, w * x_norm)  # (d_out, d_in)
        return super().finish()


ACCUMULATORS = {"taylor": TaylorAccumulator, "hessian": SquaredGradientAccumulator,
                "fisher": SquaredGradientAccumulator, "wanda": ActivationAccumulator,
                "activation": ActivationAccumulator,
                **{m: TotalGradientAccumulator for m in TOTAL_GRADIENT_SALIENCY}}


class _GradientTap(torch.autograd.Function):
    """Identity on a layer's output ``y``; saves the layer input ``x`` and hands ``(x, ∂L/∂y)`` to
    ``deliver`` in backward. ``x`` is a saved tensor, so activation checkpointing can drop and rebuild it."""

    @staticmethod
    def forward(ctx, y, x, deliver):
        ctx.deliver = deliver
        ctx.save_for_backward(x)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g_out):
        (x,) = ctx.saved_tensors
        ctx.deliver(x, g_out)
        return g_out, None, None


@contextlib.contextmanager
def layer_taps(model: nn.Module, targets: dict[str, nn.Module], acc: Accumulator, mask_box: dict):
    """Install the hooks that feed ``acc``; all of them are removed on exit, even on error.

    ``mask_box["mask"]`` holds the current batch's attention mask (for token selection).
    """
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            if not acc.needs_backward:
                acc.on_forward(name, module, x, output.detach(), mask_box.get("mask"))
            elif output.requires_grad:
                return _GradientTap.apply(output, x, lambda x_, g: acc.on_backward(name, module, x_, g))
        return hook

    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        if acc.needs_backward:
            handles.append(_gradient_source(model))
        yield
    finally:
        for h in handles:
            h.remove()


def _gradient_source(model: nn.Module):
    """A forward hook making the input embeddings' output require grad (weights stay frozen)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None:
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(); gradient metrics need it to let "
                         "gradients flow without unfreezing the weights. Use a forward-only metric "
                         "('wanda', 'activation', 'magnitude', 'zo-taylor') instead")

    def hook(module, inputs, output):
        if torch.is_tensor(output) and not output.requires_grad and output.is_floating_point():
            return output.detach().requires_grad_(True)
        return output
    return embeddings.register_forward_hook(hook)


def calibration_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's loss on one batch (logits only where labels need them, `rowsft.lean_loss`), with a
    clear error when the batch has no labels."""
    out = lean_forward(model, batch)
    loss = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: calibration batches for gradient metrics need 'labels' "
                         "(rowsft.batches adds them); forward-only metrics: 'magnitude', 'wanda', 'activation', "
                         "'random', 'synflow'")
    return loss


def accumulate(model: nn.Module, targets: dict[str, nn.Module], views: dict[str, set[str]], metric: str,
               batches: list[dict], max_example_elements: int = 2 ** 24,
               progress: Callable | None = None, recompute: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Run the calibration batches through ``model`` with the hooks of ``metric``; per-layer views.

    ``recompute``: for gradient metrics, recompute each transformer block's activations in backward
    (`rowsft.scoring.recompute`) instead of keeping all blocks' activations from the forward pass."""
    acc = ACCUMULATORS[metric](metric, targets, views, max_example_elements)
    mask_box: dict = {}
    blocks = transformer_blocks(model) if recompute and acc.needs_backward else []
    with layer_taps(model, targets, acc, mask_box), recompute_blocks(blocks):
        for i, batch in enumerate(batches):
            mask_box["mask"] = batch.get("attention_mask")
            if acc.needs_backward:
                with torch.enable_grad():
                    calibration_loss(model, batch).backward()
            else:
                with torch.no_grad():
                    model(**batch)
            if progress is not None:
                progress(metric, i + 1, len(batches))
    _all_reduce_sum(acc.state())
    return acc.finish()
