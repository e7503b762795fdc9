"""A paired test of a time ratio (issue 23): is a method's time above the floor at most a target fraction of a
reference method's (LoRA's)?

Steps are interleaved, so round ``i`` gives the method's step ``m_i``, the reference's ``r_i`` and the floor's ``f_i``
under one state of the machine. The ratio of the two times above the floor is at most ``t`` in a typical round when
the median of the per-round contrasts

    d_i(t) = (m_i - f_i) - t (r_i - f_i)

is at most 0. A slow spell that stretches a whole round by ``(1 + e)`` stretches ``d_i`` by the same factor and cannot
change its sign, so the contrast cancels what makes the separate intervals of the two times wide
(`methods.ratio_verdict` compares those, which ignores the pairing and is conservative).

- The verdict at the target: ``PASS`` when the distribution-free 95 % interval of the median contrast
  (`rowsft.evaluation.stats.median_interval`) lies below 0, ``MISS`` when it lies above, ``OPEN`` otherwise and
  with too few rounds for that confidence.
- The ratio's interval is the test inverted: every ``t`` (on a grid of step ``resolution``) whose contrast interval
  holds 0, i.e. the ratios this run cannot tell apart from the truth; the estimate is the ``t`` where the median
  contrast crosses 0.
"""
from __future__ import annotations

import numpy as np

from rowsft.evaluation.stats import median_interval


def above_floor(method, reference, floor) -> tuple[np.ndarray, np.ndarray]:
    """``(m_i - f_i, r_i - f_i)`` per round, each ``(n,)``, for step times in seconds of equal length."""
    m, r, f = (np.asarray(v, dtype=float) for v in (method, reference, floor))
    if not (m.shape == r.shape == f.shape) or m.ndim != 1 or m.size < 1:
        raise ValueError(f"need one step time per round for each of method, reference and floor, in equal numbers; "
                         f"got {m.shape}, {r.shape}, {f.shape}")
    return m - f, r - f


def contrasts(method, reference, floor, target: float) -> np.ndarray:
    """``d_i = (m_i - f_i) - target (r_i - f_i)`` per round ``(n,)``."""
    own, reference_above = above_floor(method, reference, floor)
    return own - target * reference_above


def paired_ratio(method, reference, floor, target: float = 0.30, confidence: float = 0.95,
                 resolution: float = 1e-3, largest: float = 5.0) -> dict:
    """The paired verdict on ``(m - f) ≤ target × (r - f)`` and the ratio's interval (see the module docstring).

    Returns ``{"verdict", "target", "confidence", "n", "contrast"`` (the median contrast at the target with its interval, seconds),
    ``"estimate", "low", "high"`` (the ratio: where the median contrast crosses 0, and the hull of the ratios on the
    grid ``0, resolution, …, largest`` that the test does not reject; None where there is none; ``high == largest``
    means at least that)``}``."""
    own, reference_above = above_floor(method, reference, floor)                                        # (n,) each
    at_target = median_interval(own - target * reference_above, confidence)
    verdict = "PASS" if at_target["high"] < 0 else "MISS" if at_target["low"] > 0 else "OPEN"
    if at_target["coverage"] < confidence:     # too few rounds (fewer than 6 at 95 %) to settle anything
        verdict = "OPEN"
    grid = np.arange(0.0, largest + resolution / 2, resolution)                                          # (g,)
    table = np.sort(own[None, :] - grid[:, None] * reference_above[None, :], axis=1)                    # (g, n)
    n = table.shape[1]
    order = median_interval(np.arange(n, dtype=float), confidence)   # the order statistics it takes: 0-based ranks
    low_rank, high_rank = int(order["low"]), int(order["high"])
    medians = np.median(table, axis=1)                                                                   # (g,)
    kept = grid[(table[:, low_rank] <= 0) & (table[:, high_rank] >= 0)]
    crossing = grid[medians <= 0]
    return {"verdict": verdict, "target": target, "confidence": confidence, "n": n, "contrast": at_target,
            "estimate": float(crossing[0]) if crossing.size else None,
            "low": float(kept.min()) if kept.size else None, "high": float(kept.max()) if kept.size else None}


def describe(result: dict) -> str:
    """One line: the verdict, the ratio with its paired interval, and the contrast at the target."""
    c = result["contrast"]

    def ratio(v):
        return "—" if v is None else f"{v:.3f}"
    cover = "" if c["coverage"] >= result["confidence"] else f" (these intervals cover {c['coverage']:.1%} only: too few rounds)"
    return (f"{result['verdict']}  paired over {result['n']} rounds{cover}: ratio {ratio(result['estimate'])} "
            f"[{ratio(result['low'])}, {ratio(result['high'])}]; median of (own − {result['target']:.2f} × LoRA's) "
            f"above the floor per round {c['median']:+.3f} s [{c['low']:+.3f}, {c['high']:+.3f}] (PASS when it lies below 0)")


__all__ = ["above_floor", "contrasts", "paired_ratio", "describe"]
