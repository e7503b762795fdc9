"""Stage 7, exploration: short fine-tunes over a grid of budgets and metrics, to choose a budget before a
real run (:mod:`rowsft.explore.budgets`), and what they show in numbers: accuracy rows and paired
comparisons per seed and over seeds (:mod:`rowsft.explore.summary`); `rowsft.viz.budget_explorer`
draws the result."""
from __future__ import annotations

from rowsft.explore import summary
from rowsft.explore.budgets import ExploreConfig, explore_budgets, grid
from rowsft.explore.summary import compare, point_rows, summary_text

__all__ = ["ExploreConfig", "compare", "explore_budgets", "grid", "point_rows", "summary", "summary_text"]
