"""Stage 5, evaluation: accuracy of a model on a task split (choice log-likelihoods for causal LMs,
argmax for classifiers), with error bars and paired comparisons (:mod:`rowsft.evaluation.stats`)."""
from __future__ import annotations

from rowsft.evaluation.choices import evaluate, is_sequence_classifier
from rowsft.evaluation.stats import (
                                     exact_mcnemar,
                                     majority_baseline,
                                     paired_bootstrap,
                                     paired_over_seeds,
                                     wilson_interval,
)

__all__ = ["evaluate", "is_sequence_classifier", "wilson_interval", "exact_mcnemar", "paired_bootstrap",
           "majority_baseline", "paired_over_seeds"]
