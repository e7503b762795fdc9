"""Stage 5, evaluation: accuracy of a model on a task split (choice log-likelihoods for causal LMs,
argmax for classifiers)."""
from __future__ import annotations

from rowsft.evaluation.choices import evaluate, is_sequence_classifier

__all__ = ["evaluate", "is_sequence_classifier"]
