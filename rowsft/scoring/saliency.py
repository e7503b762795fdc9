"""Whole-model element saliences that need autograd on the weights themselves: GraSP and SynFlow.

Unlike the streaming metrics (rowsft.scoring.accumulators), these need more than one layer's gradient at a time,
so they hold one dense ``(d_out, d_in)`` tensor per target layer (the size of the element scores).

- ``grasp`` (Wang, Zhang & Grosse 2020): ``e = −W ⊙ (H G)``, ``G = Σ_b ∇L_b`` the total calibration
  gradient and ``H G`` the Hessian-vector product of the total loss, by double backward
  (``Σ_b ∇(∇L_b · G)``). The sign is the paper's: GraSP *prunes* the largest values (their removal
  preserves gradient flow best), so large means "least needed by the pretrained model". Signed scores
  are normalised by the mean (or max, sum) of their absolute values. The target weights are
  switched to ``requires_grad=True`` for the duration (restored after), and attention runs on
  PyTorch's math kernel, the one with a double backward.
- ``synflow`` (Tanaka et al. 2020), adapted to transformers: data-free. Every parameter is replaced by
  its absolute value (via ``torch.func.functional_call``, the model itself is untouched), an all-ones
  input is fed as ``inputs_embeds (1, T, hidden)`` with an all-ones attention mask, ``R`` is the sum
  of the output logits, and ``e = |W| ⊙ ∂R/∂|W|``. Normalisation layers, softmax and the MLP
  non-linearities stay as they are (the paper's networks have none; here they keep ``R`` finite).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from rowsft.scoring.accumulators import _all_reduce_sum, accumulation_dtype, calibration_loss, reduce_view
from rowsft.targets import is_transposed


def _stored_weight(module: nn.Module) -> nn.Parameter:
    return getattr(module, "base_layer", module).weight


def _out_in(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the stored weight, seen as (d_out, d_in)."""
    return t.t() if is_transposed(getattr(module, "base_layer", module)) else t


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover - older torch
        return contextlib.nullcontext()


def _grads(output: torch.Tensor, weights: list[torch.Tensor], create_graph: bool = False) -> list[torch.Tensor]:
    grads = torch.autograd.grad(output, weights, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]


def _views(targets, views, elements: list[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for (name, module), e in zip(targets.items(), elements):
        e = _out_in(module, e).to(accumulation_dtype(e))  # (d_out, d_in)
        out[name] = {view: reduce_view(e, view) for view in views[name]}
    return out


def grasp(model: nn.Module, targets: dict[str, nn.Module], views: dict[str, set[str]], batches: list[dict],
          progress: Callable | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """GraSP saliency ``−W ⊙ (H G)`` per target layer (see the module docstring)."""
    weights = [_stored_weight(m) for m in targets.values()]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), _math_attention():
            total = [torch.zeros_like(w) for w in weights]
            for batch in batches:
                for t, g in zip(total, _grads(calibration_loss(model, batch), weights)):
                    t += g
            _all_reduce_sum(total)
            hvp = [torch.zeros_like(w) for w in weights]
            for i, batch in enumerate(batches):
                grads = _grads(calibration_loss(model, batch), weights, create_graph=True)
                dot = sum((g * t).sum() for g, t in zip(grads, total))
                for h, hg in zip(hvp, _grads(dot, weights)):
                    h += hg
                if progress is not None:
                    progress("grasp", i + 1, len(batches))
            _all_reduce_sum(hvp)
        return _views(targets, views, [-(w.detach() * h) for w, h in zip(weights, hvp)])
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)


def synflow(model: nn.Module, targets: dict[str, nn.Module], views: dict[str, set[str]],
            seq_len: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    """SynFlow saliency ``|W| ⊙ ∂R/∂|W|`` per target layer (see the module docstring)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or not hasattr(embeddings, "weight"):
        raise ValueError(f"synflow feeds an all-ones input through inputs_embeds; {type(model).__name__} has no "
                         "input embeddings to size it")
    names = {id(p): n for n, p in model.named_parameters()}
    absolute = {n: p.detach().abs() for n, p in model.named_parameters()}
    leaves = []
    for module in targets.values():
        leaf = absolute[names[id(_stored_weight(module))]].requires_grad_(True)
        leaves.append(leaf)
    hidden = embeddings.weight.shape[1]
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    ones = torch.ones(1, seq_len, hidden, dtype=dtype, device=device)          # (1, T, hidden)
    mask = torch.ones(1, seq_len, dtype=torch.long, device=device)             # (1, T)
    with torch.enable_grad():
        out = torch.func.functional_call(model, absolute, args=(), kwargs={"inputs_embeds": ones,
                                                                           "attention_mask": mask})
        logits = out["logits"] if hasattr(out, "__getitem__") and not torch.is_tensor(out) else out
        flow = logits.sum()  # R
        grads = _grads(flow, leaves)
    return _views(targets, views, [(leaf.detach() * g).abs() for leaf, g in zip(leaves, grads)])
