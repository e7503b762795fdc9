"""Error bars (rowsft.evaluation.stats) against hand computations and scipy, and evaluate()'s new keys."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rowsft.data import models as zoo
from rowsft.evaluation import (
    evaluate,
    exact_mcnemar,
    majority_baseline,
    paired_bootstrap,
    paired_over_seeds,
    wilson_interval,
)
from rowsft.evaluation.choices import summarize
from rowsft.evaluation.stats import binomial_two_sided_p, median_interval, student_t_quantile, student_t_two_sided_p


def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10), half z/(1 + z²/10) * sqrt(0.016 + (z/20)²)
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.490162, 0.943318), abs=1e-6)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    narrow, wide = wilson_interval(80, 100, 0.5), wilson_interval(80, 100, 0.99)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1]
    for bad in ((1, 0), (11, 10), (-1, 10)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 2, confidence=95)


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 7), (3, 10), (10, 10), (62, 100), (2000, 3270)]:
        for confidence in (0.9, 0.95, 0.99):
            expected = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
            assert wilson_interval(k, n, confidence) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_exact_mcnemar_by_hand():
    a = [1, 1, 1, 1, 1, 0, 1, 0, 0, 1]
    b = [0, 0, 0, 0, 0, 1, 1, 0, 0, 1]
    # discordant: a only 5, b only 1; p = 2 * P(X <= 1 | n=6, 1/2) = 2 * (1 + 6) / 64
    assert exact_mcnemar(a, b) == {"b_only": 1, "a_only": 5, "p_value": pytest.approx(14 / 64)}
    assert exact_mcnemar(a, a) == {"b_only": 0, "a_only": 0, "p_value": 1.0}
    assert exact_mcnemar([True, False], [False, True])["p_value"] == 1.0
    with pytest.raises(ValueError, match="same questions"):
        exact_mcnemar([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="0/1"):
        exact_mcnemar([1, 2], [1, 0])


def test_exact_mcnemar_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    for n, p_a, p_b in [(30, 0.5, 0.6), (200, 0.6, 0.7), (1000, 0.62, 0.64)]:
        a, b = rng.random(n) < p_a, rng.random(n) < p_b
        result = exact_mcnemar(a, b)
        expected = stats.binomtest(result["b_only"], result["b_only"] + result["a_only"], 0.5).pvalue
        assert result["p_value"] == pytest.approx(expected, rel=1e-9)
        assert result["b_only"] == int((b & ~a).sum()) and result["a_only"] == int((a & ~b).sum())
    for k, n in [(0, 1), (3, 6), (0, 20), (17, 40)]:
        assert binomial_two_sided_p(k, n) == pytest.approx(stats.binomtest(k, n).pvalue, rel=1e-9)


def test_paired_bootstrap_sanity():
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.5
    same = paired_bootstrap(a, a, n_resamples=2000)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
    better = a.copy()
    better[np.flatnonzero(~a)[:60]] = True                       # b fixes 60 questions a gets wrong
    result = paired_bootstrap(a, better, n_resamples=2000, seed=1)
    assert result["difference"] == pytest.approx(0.3)
    assert 0 < result["low"] < 0.3 < result["high"] and result["p_value"] < 0.01
    worse = paired_bootstrap(better, a, n_resamples=2000, seed=1)
    assert worse["difference"] == pytest.approx(-0.3) and worse["high"] < 0
    assert paired_bootstrap(a, better, n_resamples=500, seed=7) == paired_bootstrap(a, better, n_resamples=500, seed=7)
    noisy = rng.random(200) < 0.5                                 # unrelated, equally good: not significant
    assert paired_bootstrap(noisy, noisy[::-1].copy(), n_resamples=2000)["p_value"] > 0.05
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(a, a, n_resamples=0)


def test_majority_baseline_by_hand():
    result = majority_baseline([1, 1, 0, 1, 2])
    assert (result["label"], result["accuracy"]) == (1, 0.6)
    assert result["interval"] == wilson_interval(3, 5)
    assert majority_baseline([1, 0])["label"] == 0                 # a tie goes to the smaller label
    with pytest.raises(ValueError, match="no labels"):
        majority_baseline([])


def test_paired_over_seeds_by_hand_and_against_scipy():
    result = paired_over_seeds([1.0, 2.0, 3.0])                   # mean 2, std 1, t(0.975, 2) = 4.302653
    half = 4.302653 / math.sqrt(3)
    assert (result["mean"], result["std"]) == pytest.approx((2.0, 1.0))
    assert (result["low"], result["high"]) == pytest.approx((2 - half, 2 + half), abs=1e-6)
    assert (result["positive"], result["negative"], result["sign_p_value"]) == (3, 0, 0.25)
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    assert student_t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=1e-6)
    constant = paired_over_seeds([0.02, 0.02, 0.02])
    assert (constant["low"], constant["high"], constant["t_p_value"]) == (0.02, 0.02, 0.0)
    with pytest.raises(ValueError, match="two"):
        paired_over_seeds([0.1])
    stats = pytest.importorskip("scipy.stats")
    diffs = [0.01, 0.03, -0.005, 0.02, 0.012]
    result = paired_over_seeds(diffs, confidence=0.9)
    assert result["t_p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0).pvalue, rel=1e-9)
    low, high = stats.t.interval(0.9, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (result["low"], result["high"]) == pytest.approx((low, high), rel=1e-9)
    for df in (1, 3, 7.5, 40):
        assert student_t_quantile(0.9, df) == pytest.approx(stats.t.ppf(0.9, df), rel=1e-9)
        assert student_t_two_sided_p(2.1, df) == pytest.approx(2 * stats.t.sf(2.1, df), rel=1e-9)


def test_acc_norm_flips_on_byte_length_by_hand():
    # raw sums prefer the short " a" (-4 > -6); per byte the long " abcdef" wins (-6/7 > -4/2)
    questions = [{"index": 0, "label": 1, "predicted": 0, "correct": False, "scores": [-4.0, -6.0],
                  "predicted_norm": 1}]
    assert (summarize(questions)["accuracy"], summarize(questions)["acc_norm"]) == (0.0, 1.0)


def reference_scores(model, tokenizer, row) -> list[float]:
    """Sum of log p(choice | prompt), each choice run alone without padding, float64."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    scores = []
    for choice in row["choices"]:
        answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + answer])).logits[0].double(), -1)
        scores.append(sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(answer)))
    return scores


def test_evaluate_reports_acc_norm_majority_and_consistent_per_question(byte_tokenizer, mc_rows):
    model = zoo.tiny_model("llama", vocab_size=len(byte_tokenizer), seed=2)
    rows = mc_rows + [{"prompt": "Say:", "choices": [" a", " abcdefghijklmnop"], "label": 1},
                      {"prompt": "Pick one:", "choices": [" y", " n"], "label": 1}]
    result = evaluate(model, byte_tokenizer, rows, batch_size=4, max_length=512, progress=False)
    questions = result["per_question"]
    assert [q["index"] for q in questions] == list(range(len(rows)))
    assert [q["label"] for q in questions] == [r["label"] for r in rows]
    assert result["accuracy"] == sum(q["correct"] for q in questions) / len(rows)
    flips = 0
    for q, row in zip(questions, rows):
        scores = reference_scores(model, byte_tokenizer, row)
        per_byte = [s / len(c.encode("utf-8")) for s, c in zip(scores, row["choices"])]
        assert q["scores"] == pytest.approx(scores, abs=1e-4)
        assert q["predicted"] == int(np.argmax(scores)) and q["correct"] == (q["predicted"] == row["label"])
        assert q["predicted_norm"] == int(np.argmax(per_byte))
        flips += q["predicted"] != q["predicted_norm"]
    assert flips > 0, "choose rows where byte-length normalisation changes an answer"
    assert result["acc_norm"] == sum(q["predicted_norm"] == q["label"] for q in questions) / len(rows)
    assert result["interval"] == wilson_interval(sum(q["correct"] for q in questions), len(rows))
    assert result["majority"] == majority_baseline([r["label"] for r in rows])
    assert result["majority"]["label"] == 1 and result["majority"]["accuracy"] == 5 / 7


def test_two_evaluations_pair_up(byte_tokenizer, mc_rows):
    first = evaluate(zoo.tiny_model("llama", vocab_size=len(byte_tokenizer), seed=2), byte_tokenizer, mc_rows,
                     progress=False)
    second = evaluate(zoo.tiny_model("llama", vocab_size=len(byte_tokenizer), seed=5), byte_tokenizer, mc_rows,
                      progress=False)
    result = exact_mcnemar(first, second)
    a = [q["correct"] for q in first["per_question"]]
    b = [q["correct"] for q in second["per_question"]]
    assert result == exact_mcnemar(a, b)
    assert second["accuracy"] - first["accuracy"] == pytest.approx(paired_bootstrap(first, second)["difference"])
    with pytest.raises(ValueError, match="same questions"):
        exact_mcnemar(first, evaluate(zoo.tiny_model("llama", vocab_size=len(byte_tokenizer)), byte_tokenizer,
                                      mc_rows, max_examples=3, progress=False))


def test_classifier_per_question_and_no_acc_norm(byte_cls_tokenizer):
    model = zoo.tiny_model("bert", vocab_size=len(byte_cls_tokenizer), seed=1)
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(["good", "bad", "fine film", "meh", "great!"])]
    result = evaluate(model, byte_cls_tokenizer, rows, batch_size=2, progress=False)
    assert result["acc_norm"] is None and len(result["per_question"]) == 5
    assert result["accuracy"] == sum(q["correct"] for q in result["per_question"]) / 5
    assert result["majority"] == {"label": 0, "accuracy": 0.6, "interval": wilson_interval(3, 5)}


@pytest.mark.parametrize("n, ranks", [(12, (3, 10)), (30, (10, 21)), (20, (6, 15))])
def test_median_interval_takes_the_textbook_order_statistics(n, ranks):
    """The distribution-free 95 % interval for a median is [x_(j), x_(n+1-j)] (Conover's table: n = 12 → 3rd and
    10th, n = 20 → 6th and 15th, n = 30 → 10th and 21st); its coverage from scipy's binomial."""
    from scipy.stats import binom
    values = np.random.default_rng(n).permutation(np.arange(1.0, n + 1.0))     # x_(i) = i, shuffled
    got = median_interval(values)
    assert (got["low"], got["high"]) == ranks and got["median"] == (n + 1) / 2
    assert got["coverage"] == pytest.approx(1 - 2 * binom.cdf(ranks[0] - 1, n, 0.5), rel=1e-12)
    assert got["coverage"] >= 0.95 and 1 - 2 * binom.cdf(ranks[0], n, 0.5) < 0.95       # the narrowest such


def test_median_interval_with_too_few_values_says_what_it_covers():
    got = median_interval([3.0, 1.0, 2.0])
    assert (got["low"], got["high"], got["coverage"]) == (1.0, 3.0, 0.75)
    with pytest.raises(ValueError, match="at least one"):
        median_interval([])
    with pytest.raises(ValueError, match="finite"):
        median_interval([1.0, float("nan")])
