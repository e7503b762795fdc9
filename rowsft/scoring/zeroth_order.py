"""Zeroth-order Taylor scores (``zo-taylor``): weight gradients estimated from forward passes only.

SPSA: for perturbation ``k`` draw ``z_k`` (Rademacher ±1 or standard Gaussian) for every target weight,
measure ``c_k = (L(θ + εz_k) − L(θ − εz_k)) / 2ε`` with ``L`` the summed loss of all calibration batches,
and estimate ``Ĝ = (1/K) Σ_k c_k z_k`` (unbiased up to O(ε²) since ``E[z zᵀ] = I``). The score is
Taylor's ``|W ⊙ Ĝ|`` reduced to rows / columns (the total-gradient form, as ``snip``).

Memory: no backward pass, no gradient, no copy of the weights.

- The perturbation is applied to each target layer's *output* in a forward hook, ``y += ±ε · z x``,
  which is exactly the layer ``(W ± εz) x``; the weights are never written, so the model comes back
  bit for bit without storing anything.
- ``z_{k,l}`` is regenerated from a seed derived from ``(seed, k, l)`` whenever it is needed (in each
  forward call, and once more per layer when ``Ĝ`` is rebuilt), never stored. Only the ``K`` scalars
  ``c_k`` are kept during the passes; ``Ĝ`` is rebuilt one layer at a time afterwards (transient).

Cost: ``2 · K · num_batches`` forward passes plus ``K`` draws per layer. Use a float32 (or float64)
model: with bf16 the loss difference drowns in rounding.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rowsft.scoring.accumulators import _all_reduce_sum, accumulation_dtype, calibration_loss, reduce_view
from rowsft.targets import linear_shape, weight_dtype, weight_out_in

DISTRIBUTIONS = ("rademacher", "gaussian")


def perturbation_seed(seed: int, k: int, layer: int) -> int:
    """A distinct generator seed for perturbation ``k`` of target layer ``layer``."""
    return ((int(seed) * 1_000_003 + k) * 65_537 + layer) % (2 ** 63)


def perturbation(shape: tuple[int, int], seed: int, distribution: str, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """The direction ``z`` (d_out, d_in) for one seed: the same tensor every time it is asked for."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if distribution == "rademacher":
        z = torch.randint(0, 2, shape, generator=gen, device=device).to(dtype)
        return z.mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)
    raise ValueError(f"perturbation={distribution!r} is not known; choose one of {DISTRIBUTIONS}")


@contextlib.contextmanager
def _perturbed(targets: dict[str, nn.Module], state: dict, distribution: str, seed: int):
    """Forward hooks adding ``state["sign"] · ε · z_{k,l} x`` to each target's output."""
    handles = []

    def make_hook(layer, module):
        shape = linear_shape(module)
        dtype = accumulation_dtype(weight_dtype(module))

        def hook(mod, inputs, output):
            if not state["sign"]:
                return output
            z = perturbation(shape, perturbation_seed(seed, state["k"], layer), distribution, dtype, output.device)
            x = inputs[0]
            return output + (state["sign"] * state["eps"]) * F.linear(x, z.to(x.dtype))  # (…, d_out)
        return hook

    try:
        for layer, module in enumerate(targets.values()):
            handles.append(module.register_forward_hook(make_hook(layer, module)))
        yield
    finally:
        for h in handles:
            h.remove()


def zo_taylor(model: nn.Module, targets: dict[str, nn.Module], views: dict[str, set[str]], batches: list[dict],
              num_perturbations: int = 64, eps: float = 1e-3, distribution: str = "rademacher", seed: int = 0,
              progress: Callable | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer views of ``|W ⊙ Ĝ|`` with the SPSA gradient estimate ``Ĝ`` (see the module docstring)."""
    if num_perturbations < 1 or not eps > 0:
        raise ValueError(f"zo-taylor needs num_perturbations >= 1 and eps > 0; got {num_perturbations}, {eps}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"perturbation={distribution!r} is not known; choose one of {DISTRIBUTIONS}")
    first = getattr(next(iter(targets.values())), "base_layer", next(iter(targets.values())))
    dtype = accumulation_dtype(weight_dtype(first))
    coefficients = torch.zeros(num_perturbations, dtype=dtype, device=first.weight.device)  # c_k, (K,)
    state = {"sign": 0, "k": 0, "eps": float(eps)}
    with torch.no_grad(), _perturbed(targets, state, distribution, seed):
        for k in range(num_perturbations):
            state["k"] = k
            losses = []
            for sign in (1, -1):
                state["sign"] = sign
                losses.append(sum(calibration_loss(model, b).to(dtype) for b in batches))
            state["sign"] = 0
            coefficients[k] = (losses[0] - losses[1]) / (2 * eps)
            if progress is not None:
                progress("zo-taylor", k + 1, num_perturbations)
    _all_reduce_sum([coefficients])  # the same z on every rank: summing c_k sums the ranks' losses
    coeffs = coefficients.tolist()

    out: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for layer, (name, module) in enumerate(targets.items()):
            w = weight_out_in(module)  # a quantized layer's dequantized weight: one layer at a time
            z_dtype = accumulation_dtype(weight_dtype(module))  # as drawn in the forward hook
            g_hat = torch.zeros(linear_shape(module), dtype=dtype, device=w.device)  # (d_out, d_in)
            for k in range(num_perturbations):
                z = perturbation(tuple(g_hat.shape), perturbation_seed(seed, k, layer), distribution, z_dtype, w.device)
                g_hat.add_(z.to(dtype), alpha=coeffs[k])
            g_hat /= num_perturbations
            e = (w.to(dtype) * g_hat).abs()
            out[name] = {view: reduce_view(e, view) for view in views[name]}
    return out
