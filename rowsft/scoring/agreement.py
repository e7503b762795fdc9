"""Do two importance metrics agree? Spearman rank correlation and top-k overlap of two score vectors.

One definition for the library (`Scores.rank_correlation`, `Scores.topk_overlap`) and the figures
(`rowsft.viz.metric_overlap`, `rowsft.viz.overlap_matrix`). Inputs are flat tensors or anything
``torch.as_tensor`` takes (numpy arrays, lists); computations run in float64.
"""
from __future__ import annotations

import torch


def _flat64(values) -> torch.Tensor:
    return torch.as_tensor(values).reshape(-1).double()


def average_ranks(values) -> torch.Tensor:
    """Ranks 0..n-1 of ``values`` (float64); tied values share the mean of their ranks."""
    x = _flat64(values)                                        # (n,)
    sorted_x, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()                    # one past the last rank of each tie block
    mean_rank = ends - (counts.double() + 1) / 2               # mean of ranks end-count .. end-1
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long vectors (average ranks for ties); NaN when one is constant."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.numel() != rb.numel():
        raise ValueError(f"spearman needs two vectors of one length, got {ra.numel()} and {rb.numel()}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def top_count(k, size: int) -> int:
    """How many units "top k" means in a layer of ``size``: a count (capped at ``size``) or a ratio in (0, 1]
    (at least one)."""
    if isinstance(k, float) and 0 < k <= 1:
        return max(1, int(round(k * size)))
    if not isinstance(k, bool) and isinstance(k, int) and k >= 1:
        return min(int(k), size)
    raise ValueError(f"k must be a positive count or a ratio in (0, 1]; got {k!r}")


def topk_indices(values, k: int) -> torch.Tensor:
    """Flat indices of the ``k`` largest values, ties broken by the lower index; returned sorted ascending."""
    order = torch.sort(torch.as_tensor(values).reshape(-1), descending=True, stable=True).indices
    return torch.sort(order[:k]).values


def topk_overlap(a, b, k) -> float:
    """The fraction of ``a``'s top-``k`` units that are also in ``b``'s top-``k`` (``k``: count or ratio)."""
    size = _flat64(a).numel()
    if _flat64(b).numel() != size:
        raise ValueError(f"topk_overlap needs two vectors of one length, got {size} and {_flat64(b).numel()}")
    kk = top_count(k, size)
    shared = set(topk_indices(a, kk).tolist()) & set(topk_indices(b, kk).tolist())
    return len(shared) / kk
