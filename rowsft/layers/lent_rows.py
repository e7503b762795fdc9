"""Rows lent to the weight for each product: how a row update over a float32 (or float64) weight runs by default.

The usual row update computes ``y = x W0ᵀ`` and adds ``x deltaᵀ`` into the columns ``idx`` of ``y``: three thin
products a step (that share, the input gradient's share ``g_rows delta``, and delta's gradient), which on a CPU run
at a fraction of the large frozen products' speed. Lent, the rows ``W0[idx] + delta`` are written into the base
weight just before its frozen product and the pretrained rows put back just after it, bit for bit:

1. ``pretrained = W[idx]`` is set aside, ``(k, d_in)``;
2. ``W[idx] += delta`` (one rounding, as a merge folds an update: `rowsft.layers.update_forms.folded`);
3. the frozen product runs: ``x W'ᵀ`` in forward, ``g W'`` in backward, carrying the rows' shares;
4. ``W[idx] = pretrained``, also when the product raises.

Only ``grad delta = g[..., idx]ᵀ x`` is left as a thin product (`rowsft.layers.group_products.LentRowProducts`).
The rows are lent again in backward, so nothing of them is kept between forward and backward: memory is the usual
update's (``delta``, its gradient and AdamW's state), plus the pretrained rows of the layers in one node (q/k/v: at
most ``K × d_in``) for the length of one product. Rows trained *in the weight* (`rowsft.layers.in_weight`,
``train_in_weight=True``) keep those rows for the whole run instead (a copy as large as the deltas) and leave the
trained rows in the weight between steps.

- Arithmetic: ``x (W0 + delta)ᵀ`` with the sum rounded to the weight's dtype, as full fine-tuning and a merged model
  compute, where the usual update computes ``x W0ᵀ + x deltaᵀ``; the two differ by float rounding. The same bits as
  rows trained in the weight (the same rows, the same products).
- Where: a row update over a plain, frozen, hook-free float32 or float64 base (`rowsft.layers.forward_paths.fusable`),
  its delta in the weight's dtype, without autocast (under autocast the rows go into the kept cast instead:
  `rowsft.layers.in_weight`), not under ``torch.compile`` (the writes are side effects a compiled graph would drop).
  A half-precision weight is never lent to: an update below its rounding step would vanish from the forward, where
  the usual update adds ``x deltaᵀ`` on its own. Off with ``rowsft.apply(..., lend_rows=False)`` (or the peft
  config's ``lend_rows``): the usual update.
- The weight's version is not bumped (written through ``.data``): kept autocast casts stay valid, and a graph that
  saved the weight elsewhere (a tied weight) reads the pretrained rows, which are back before any other op runs.
- Threads: outside a lending product the weight holds its pretrained values. Every lending product, and rowsft's own
  readers of a base weight (kept casts, merges), hold `LENDING_LOCK`, so a forward in another thread (a notebook cell
  while `rowsft.notebook`'s launcher trains) neither sees lent rows nor takes them for pretrained ones. Code outside
  rowsft that reads a base weight from another thread while a row layer over it runs may see its rows, as it would
  see a weight full fine-tuning updates in place.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from rowsft.layers.products import compute_dtype

LENDING_LOCK = threading.RLock()        # held while a base weight holds lent rows, and by rowsft's readers of weights
LENDABLE_DTYPES = (torch.float32, torch.float64)


def lendable(weight_dtype: torch.dtype, delta: torch.Tensor, x: torch.Tensor) -> bool:
    """True when rows ``delta (k, d_in)`` may be lent to a weight of ``weight_dtype`` for a product on ``x``: a
    float32/float64 weight, the delta in its dtype, no autocast to another dtype, not under ``torch.compile``
    (`rowsft.layers.forward_paths.lends_rows` adds what the base layer must be)."""
    return (weight_dtype in LENDABLE_DTYPES and delta.dtype == weight_dtype
            and compute_dtype(x, weight_dtype) == weight_dtype and not torch.compiler.is_compiling())


@contextmanager
def rows_lent(weights: Sequence[torch.Tensor], indices: Sequence[torch.Tensor],
              deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the block, each ``weights[i] (d_out_i, d_in)`` (a view of the base weight, transposed for a Conv1D)
    holds ``W0[idx_i] + delta_i`` at its rows ``idx_i``; after it, its pretrained rows again, bit for bit, also when
    the block raises. Put back in the reverse order, so two updates of one weight restore what each found."""
    with LENDING_LOCK:
        pretrained = []
        try:
            for weight, index, delta in zip(weights, indices, deltas):
                rows = weight.data                                           # (d_out, d_in): the version not bumped
                pretrained.append((rows, index, rows.index_select(0, index)))                # (k, d_in), set aside
                rows.index_add_(0, index, delta.detach())                   # W0[idx] + delta, rounded once
            yield
        finally:
            for rows, index, kept in reversed(pretrained):
                rows.index_copy_(0, index, kept)


__all__ = ["LENDING_LOCK", "LENDABLE_DTYPES", "lendable", "rows_lent"]
