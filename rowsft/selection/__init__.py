"""Stage 2, selection: from scores and a budget to which rows, columns or weights of which layers train.

- :mod:`rowsft.selection.budgets`: budgets (one parser for ``64``, ``0.02``, ``"lora:8"``, ``"params:N"``);
- :mod:`rowsft.selection.strategies`: ``select()`` (per-layer, global, random; the lean unit rule);
- :mod:`rowsft.selection.choice`: the ``Selection`` and ``LayerChoice`` values.
"""
from __future__ import annotations

from rowsft.selection.budgets import LoraParity, TotalParams, lora_parity
from rowsft.selection.choice import UNITS, LayerChoice, Selection
from rowsft.selection.strategies import STRATEGIES, select

__all__ = ["LayerChoice", "LoraParity", "STRATEGIES", "Selection", "TotalParams", "UNITS", "lora_parity", "select"]
