"""Stage 7, exploration: short fine-tunes over a grid of budgets and metrics, to choose a budget before a
real run (:mod:`rowsft.explore.budgets`); `rowsft.viz.budget_explorer` draws the result."""
from __future__ import annotations

from rowsft.explore.budgets import ExploreConfig, explore_budgets, grid

__all__ = ["ExploreConfig", "explore_budgets", "grid"]
