"""The tensor products sparse updates are made of: the compute dtype, the frozen product, thin products, column
adds, element blocks and the row gradient.

Every helper keeps the base layer's kernels (hence bits) where it computes the frozen part, and writes in place
where that saves an output-sized buffer; shapes are in each docstring. `rowsft.layers.autograd` (one update per
layer) and `rowsft.layers.grouped` (one update per group of layers reading one input) are built from these.
"""
from __future__ import annotations

import torch

_AUTOCASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def compute_dtype(x: torch.Tensor, fallback: torch.dtype) -> torch.dtype:
    """The autocast dtype if autocast is on for ``x``'s device (and ``x`` is a float type it
    casts), else ``fallback``."""
    device = x.device.type
    if x.dtype in _AUTOCASTABLE and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return fallback


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is already that dtype (most calls in float32: 210 layers × ~15 casts a step)."""
    return t if t.dtype == dtype else t.to(dtype)


def flat(t: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` → ``(N, d)``."""
    return t.reshape(-1, t.shape[-1])


def add_product(target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``target += a @ b`` in place (``a (..., m)`` or flat ``(N, m)``, ``b (m, n)``, ``target (..., n)``), fused when it can."""
    if target.dtype == a.dtype == b.dtype and target.is_contiguous():
        flat(target).addmm_(flat(a), b)
    else:
        target.add_(cast(flat(a) @ cast(b, a.dtype), target.dtype).view(target.shape))
    return target


def frozen_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype,
                      shape: torch.Size) -> torch.Tensor:
    """The frozen base's share of the input gradient, ``g W`` (``grad_out (..., d_out)``, ``weight (d_out, d_in)``),
    multiplied in ``dtype`` (the base product's) and returned as ``shape`` ``(..., d_in)`` in ``out_dtype``."""
    return cast(torch.mm(flat(cast(grad_out, dtype)), cast(weight, dtype)), out_dtype).view(shape)


def thin_product(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``x deltaᵀ`` for a thin ``delta (k, d_in)`` and ``x (..., d_in)`` → ``(..., k)``, a transposed view.

    Computed as ``delta xᵀ`` ``(k, N)``: on CPU the BLAS runs that shape 1.5-4× faster than ``x deltaᵀ``
    ``(N, k)`` when ``k`` is not a multiple of 16 (SmolLM2 at LoRA-8 parity: k = 11 for k/v/down_proj, 29 for
    gate/up), and never slower. Same products summed over the same ``d_in``; only the order may differ."""
    return torch.mm(delta, flat(x).T).T.view(*x.shape[:-1], delta.shape[0])   # (k, N) → (..., k)


def gathered_columns(tensors, indices, dtype: torch.dtype) -> torch.Tensor:
    """``[t_1[..., idx_1], t_2[..., idx_2], ...]`` as one ``(N, K)`` tensor in ``dtype`` (``t_i (..., d_i)``, ``K = Σ k_i``):
    the rows of a row update's output gradient. In half precision on CPU the columns are gathered as rows of ``t_iᵀ``
    (2-3× faster there; slower in float32) and the result is a transposed view of a ``(K, N)`` tensor."""
    if tensors[0].dtype in (torch.float16, torch.bfloat16) and tensors[0].device.type == "cpu":
        parts = [flat(t).T.index_select(0, i) for t, i in zip(tensors, indices)]          # each (k_i, N)
        return cast(parts[0] if len(parts) == 1 else torch.cat(parts), dtype).T
    parts = [flat(t).index_select(1, i) for t, i in zip(tensors, indices)]                # each (N, k_i)
    return cast(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), dtype)


def add_into_columns(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``target[..., index] += values`` in place (``index`` unique, ``values (..., k)``); returns ``target``.

    Same bits as ``index_add_``, which on CPU in half precision converts the whole of ``target`` to
    float and back (about 4× the time of gathering the ``k`` columns, adding, and writing them back)."""
    if target.dtype in (torch.float16, torch.bfloat16) and target.device.type == "cpu":
        target[..., index] = target[..., index] + values
        return target
    return target.index_add_(-1, index, values)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool = False,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` with the same kernels (hence bits) as ``nn.Linear`` / HF ``Conv1D``, written into a
    fresh (non-view) ``(..., d_out)`` tensor so that later in-place ops on it stay cheap and legal. ``dtype``: the
    product's dtype when the caller has it (`compute_dtype` of ``x`` and the weight), else found here."""
    dt = dtype or compute_dtype(x, weight.dtype)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=dt, device=x.device)   # (..., d_out)
    x, w = cast(x, dt), cast(weight, dt)
    if conv1d or x.dim() <= 2 or x.is_contiguous():   # one (add)mm over the flattened tokens
        if bias is None:
            torch.mm(flat(x), w.T, out=flat(out))
        else:
            torch.addmm(cast(bias, dt), flat(x), w.T, out=flat(out))
    else:                                             # strided input: torch.linear's matmul, then the bias
        torch.matmul(x, w.T, out=out)
        if bias is not None:
            out.add_(cast(bias, dt))
    return out


def element_rows(index: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For sorted flat indices ``r * d_in + c``: the touched rows (sorted unique), each index's
    position among them, and each index's column."""
    index = index.long()
    rows = torch.div(index, d_in, rounding_mode="floor")                    # (k,)
    cols = index - rows * d_in                                              # (k,)
    touched, position = torch.unique_consecutive(rows, return_inverse=True)  # (n_rows,), (k,)
    return touched, position, cols


def element_columns(index: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat indices ``r * d_in + c``: the touched columns (sorted unique) and each index's position among them."""
    cols = torch.remainder(index.long(), d_in)                              # (k,)
    touched, position = torch.unique(cols, sorted=True, return_inverse=True)  # (n_cols,), (k,)
    return touched, position


def element_block(values: torch.Tensor, position: torch.Tensor, cols: torch.Tensor, n_rows: int,
                  d_in: int, dtype: torch.dtype) -> torch.Tensor:
    """The element update restricted to its touched rows, dense ``(n_rows, d_in)``."""
    block = torch.zeros(n_rows, d_in, dtype=dtype, device=values.device)
    block[position, cols] = values.to(dtype)
    return block


def effective_weight(weight: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                      dtype: torch.dtype) -> torch.Tensor:
    """``W + D`` as a fresh ``(d_out, d_in)`` tensor (``D``: ``values`` at flat ``index``), in ``W``'s
    memory layout (a Conv1D weight stays transposed), so the matmul takes the base layer's kernel."""
    effective = weight.to(dtype=dtype, copy=True)            # clone keeps the strides
    index = index.long()
    rows = torch.div(index, weight.shape[1], rounding_mode="floor")
    effective.index_put_((rows, index - rows * weight.shape[1]), values.to(dtype), accumulate=True)
    return effective


def row_gradient(grad_rows: torch.Tensor, x, dt: torch.dtype) -> torch.Tensor:
    """``grad_rowsᵀ x`` ``(k, d_in)`` for ``grad_rows (N, k)`` and the kept input ``x (..., d_in)``, in ``dt``; for a
    `ScaledInput` ``x = w ⊙ (h · s)``: ``((grad_rows · s)ᵀ h) ⊙ w`` in the factors' dtype (``x`` never rebuilt)."""
    if isinstance(x, ScaledInput):
        scaled_rows = cast(grad_rows, x.h.dtype) * flat(x.scale)                        # (N, k) · (N, 1)
        if x.h_cast is not None:                                   # the product in dt (autocast), on h cast once
            return torch.mm(cast(scaled_rows.T, dt), x.h_cast) * x.weight              # (k, d_in) ⊙ (d_in,)
        return torch.mm(scaled_rows.T, flat(x.h)).mul_(x.weight)                       # (k, d_in) ⊙ (d_in,)
    return torch.mm(grad_rows.T, cast(flat(x), dt))


class ScaledInput:
    """A layer input ``x = weight * (h * scale)`` given by its factors (``h (..., d)``, ``scale (..., 1)``,
    ``weight (d,)``), for a row update's gradient that never rebuilds ``x`` (`RowUpdate`). ``h_cast``: ``h`` flat
    ``(N, d)`` in the compute dtype of an autocast product, when `row_gradient` should multiply in that dtype."""

    __slots__ = ("h", "scale", "weight", "h_cast")

    def __init__(self, h: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, h_cast: torch.Tensor | None = None):
        self.h, self.scale, self.weight, self.h_cast = h, scale, weight, h_cast
