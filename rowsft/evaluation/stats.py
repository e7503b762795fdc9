"""Error bars for accuracies: is a fine-tune better than the model it started from, or just lucky?

Pure functions (the standard library and numpy; no scipy at runtime) over per-question
correctness, i.e. ``evaluate(...)["per_question"]`` or plain sequences of booleans:

- :func:`wilson_interval`: a confidence interval for one accuracy (``correct`` of ``n``); unlike the
  normal approximation it stays inside [0, 1] and behaves at 0 % and 100 %.
- :func:`exact_mcnemar`: two models on the SAME questions; an exact two-sided binomial test on the
  discordant questions (right for one model only). The paired test is much sharper than comparing
  two overlapping intervals, since both models find the same questions easy.
- :func:`paired_bootstrap`: the same comparison by resampling questions; gives an interval for the
  accuracy difference as well as a p-value.
- :func:`majority_baseline`: the accuracy of always answering the most frequent label (BoolQ's
  validation split is 62 % "yes": a model at 62 % may have learnt nothing).
- :func:`paired_over_seeds`: differences (fine-tuned minus base, or method A minus method B) over
  training seeds: mean, Student-t interval, t-test and exact sign-test p-values.
- :func:`median_interval`: the median of paired differences (a method's step time minus the frozen floor's, round
  by round, in the benchmarks) with a distribution-free interval from order statistics: no assumption about the
  spread, which on a shared machine has long tails.

Differences are always ``b - a``: pass the baseline as ``a`` and the fine-tune as ``b``.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

__all__ = ["wilson_interval", "exact_mcnemar", "paired_bootstrap", "majority_baseline", "paired_over_seeds",
           "binomial_two_sided_p", "student_t_quantile", "student_t_two_sided_p", "correctness", "median_interval"]

_BOOTSTRAP_CHUNK = 1000  # resamples drawn at once: bounds memory at chunk * questions indices


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return confidence


def _normal_quantile(confidence: float) -> float:
    """``z`` such that ``[-z, z]`` holds ``confidence`` of a standard normal."""
    return NormalDist().inv_cdf(0.5 + 0.5 * _check_confidence(confidence))


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """``(low, high)``: the Wilson score interval for the proportion ``correct / n``."""
    correct, n = int(correct), int(n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be between 0 and n={n}, got {correct}")
    z = _normal_quantile(confidence)
    p = correct / n
    shrink = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1.0 - p) / n + (z / (2 * n)) ** 2)
    low = 0.0 if correct == 0 else max(0.0, centre - half)      # exact ends: no -1e-17 from rounding
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (1.0 for ``n == 0``)."""
    k, n = int(k), int(n)
    if not 0 <= k <= n:
        raise ValueError(f"k must be between 0 and n={n}, got {k}")
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))   # exact integers, then one division
    return min(1.0, 2 * tail / 2 ** n)


def correctness(result) -> np.ndarray:
    """Per-question correctness as a boolean array, from an ``evaluate()`` result or a sequence of 0/1/bool."""
    if isinstance(result, Mapping):
        if "per_question" not in result:
            raise ValueError("expected an evaluate() result with 'per_question', or a sequence of booleans")
        return np.array([bool(q["correct"]) for q in result["per_question"]], dtype=bool)
    values = np.asarray(result)
    if values.ndim != 1:
        raise ValueError(f"per-question correctness must be one-dimensional, got shape {values.shape}")
    if values.size and not np.isin(values, (0, 1)).all():
        raise ValueError("per-question correctness must be booleans or 0/1")
    return values.astype(bool)


def _paired(a_correct, b_correct) -> tuple[np.ndarray, np.ndarray]:
    """Both correctness arrays, checked to cover the same questions."""
    if isinstance(a_correct, Mapping) and isinstance(b_correct, Mapping):
        ia = [q["index"] for q in a_correct.get("per_question", [])]
        ib = [q["index"] for q in b_correct.get("per_question", [])]
        if ia != ib:
            raise ValueError("the two evaluate() results are not on the same questions; pair them on one split")
    a, b = correctness(a_correct), correctness(b_correct)
    if a.shape != b.shape:
        raise ValueError(f"paired tests need the same questions: {a.size} vs {b.size} answers")
    if a.size == 0:
        raise ValueError("no questions to compare")
    return a, b


def exact_mcnemar(a_correct, b_correct) -> dict:
    """``{"b_only", "a_only", "p_value"}``: exact McNemar test of two models on the same questions.

    ``b_only``: questions only ``b`` gets right; ``a_only``: only ``a``. Under the null hypothesis
    (equal accuracy) each discordant question is a fair coin flip; ``p_value`` is the exact
    two-sided binomial p-value of ``b_only`` in ``b_only + a_only`` flips (1.0 with none).
    """
    a, b = _paired(a_correct, b_correct)
    b_only, a_only = int((b & ~a).sum()), int((a & ~b).sum())
    return {"b_only": b_only, "a_only": a_only, "p_value": binomial_two_sided_p(b_only, b_only + a_only)}


def paired_bootstrap(a_correct, b_correct, n_resamples: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """``{"difference", "low", "high", "p_value"}``: accuracy(b) - accuracy(a) by resampling questions.

    Each resample draws the questions with replacement (the same draw for both models).
    ``low``/``high``: the percentile interval of the resampled differences. ``p_value``: two-sided,
    of the resampled differences shifted to the null, ``(1 + #{|d* - d| >= |d|}) / (1 + n_resamples)``
    (1.0 for identical answers; never exactly 0).
    """
    a, b = _paired(a_correct, b_correct)
    confidence = _check_confidence(confidence)
    n_resamples = int(n_resamples)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    per_question = b.astype(np.int8) - a.astype(np.int8)                   # (n,) in {-1, 0, 1}
    difference = float(per_question.mean())
    rng = np.random.default_rng(seed)
    resampled = np.empty(n_resamples)                                        # (n_resamples,)
    for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
        stop = min(n_resamples, start + _BOOTSTRAP_CHUNK)
        draws = rng.integers(0, per_question.size, size=(stop - start, per_question.size))   # (chunk, n)
        resampled[start:stop] = per_question[draws].mean(axis=1)
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    extreme = int((np.abs(resampled - difference) >= abs(difference) - 1e-12).sum())
    return {"difference": difference, "low": float(low), "high": float(high),
            "p_value": min(1.0, (1 + extreme) / (1 + n_resamples))}


def majority_baseline(labels: Sequence[int], confidence: float = 0.95) -> dict:
    """``{"label", "accuracy", "interval"}`` of always answering the most frequent label.

    Ties go to the smallest label. Measured on the given labels (typically the evaluated questions
    themselves), so it is the best any constant answer could score there.
    """
    values = [int(label) for label in labels]
    if not values:
        raise ValueError("no labels: the majority baseline needs at least one question")
    counts: dict[int, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    label = min(counts, key=lambda v: (-counts[v], v))
    return {"label": label, "accuracy": counts[label] / len(values),
            "interval": wilson_interval(counts[label], len(values), confidence)}


# ----------------------------------------------------------------------------------------------
# Student t, for comparisons over a handful of seeds


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 0.0
    return _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def student_t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t with ``df`` degrees of freedom (by bisection)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be strictly between 0 and 1, got {probability}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    target = 2.0 * (1.0 - probability)          # the two-sided tail beyond the quantile
    low, high = 0.0, 1.0
    while student_t_two_sided_p(high, df) > target:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_two_sided_p(middle, df) > target:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def paired_over_seeds(differences: Sequence[float], confidence: float = 0.95) -> dict:
    """Differences over seeds (e.g. fine-tuned minus base accuracy, one per training seed).

    Returns ``{"n", "mean", "std", "low", "high", "t_p_value", "positive", "negative", "sign_p_value"}``:
    the mean difference, its Student-t interval (``std``: the sample standard deviation), the
    two-sided one-sample t-test p-value against 0, and an exact two-sided sign test (zeros dropped),
    which assumes nothing about the spread of the differences.
    """
    values = np.asarray(differences, dtype=float)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"need at least two differences (seeds) for an interval, got {values.size}")
    if not np.isfinite(values).all():
        raise ValueError("differences must be finite numbers")
    confidence = _check_confidence(confidence)
    n, mean, std = values.size, float(values.mean()), float(values.std(ddof=1))
    half = student_t_quantile(0.5 + 0.5 * confidence, n - 1) * std / math.sqrt(n)
    if std > 0:
        t_p = student_t_two_sided_p(mean / (std / math.sqrt(n)), n - 1)
    else:
        t_p = 1.0 if mean == 0 else 0.0
    positive, negative = int((values > 0).sum()), int((values < 0).sum())
    return {"n": n, "mean": mean, "std": std, "low": mean - half, "high": mean + half, "t_p_value": t_p,
            "positive": positive, "negative": negative,
            "sign_p_value": binomial_two_sided_p(positive, positive + negative)}


def median_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """The median of ``values`` and a distribution-free interval for it: ``[x_(j), x_(n+1-j)]`` of the sorted
    values, with the largest ``j`` whose coverage ``1 - 2 P(Bin(n, 1/2) < j)`` is at least ``confidence``
    (order statistics; any continuous distribution). Returns ``{"n", "median", "low", "high", "coverage"}``; with too
    few values for that confidence (fewer than 6 at 95 %), ``low``/``high`` are the smallest and largest value and
    ``coverage`` says what they cover (``1 - 2 / 2**n``)."""
    data = np.sort(np.asarray(values, dtype=float))
    if data.ndim != 1 or data.size < 1:
        raise ValueError(f"need at least one value, got {data.size}")
    if not np.isfinite(data).all():
        raise ValueError("values must be finite numbers")
    confidence = _check_confidence(confidence)
    n = data.size

    def coverage(j: int) -> float:              # P(x_(j) <= median <= x_(n+1-j)) = 1 - 2 P(Bin(n, 1/2) <= j - 1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= confidence:
        j += 1
    return {"n": n, "median": float(np.median(data)), "low": float(data[j - 1]), "high": float(data[n - j]),
            "coverage": coverage(j)}
