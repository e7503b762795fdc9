"""Stage 1, scoring: how important every row, column, coupled neuron group or single weight is.

- :mod:`rowsft.scoring.scorer`: ``score()`` and ``ScoreConfig``, the metrics and their units;
- :mod:`rowsft.scoring.scores`: the ``Scores`` value (save, load, normalise, compare);
- :mod:`rowsft.scoring.accumulators`: streaming per-layer accumulators fed by hooks;
- :mod:`rowsft.scoring.saliency`, :mod:`rowsft.scoring.zeroth_order`: GraSP/SynFlow and zo-taylor;
- :mod:`rowsft.scoring.recompute`: per-block recomputation during calibration backward.
"""
from __future__ import annotations

from rowsft.scoring.agreement import spearman, topk_indices, topk_overlap
from rowsft.scoring.scorer import ALIASES, METRICS, UNIT_METRICS, ScoreConfig, allowed_metrics, group_scores, score
from rowsft.scoring.scores import NORMALIZATIONS, Scores

__all__ = ["ALIASES", "METRICS", "NORMALIZATIONS", "UNIT_METRICS", "ScoreConfig", "Scores", "allowed_metrics",
           "group_scores", "score", "spearman", "topk_indices", "topk_overlap"]
