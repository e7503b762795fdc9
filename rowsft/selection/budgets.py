"""Budgets: how many rows, columns, neurons or weights each layer may train.

A budget is one of

- ``int n``: ``n`` units per layer (rows for the row unit, columns, neurons of a group, weights);
- ``float r`` in (0, 1]: that ratio of each layer's units;
- ``TotalParams(n)``: ``n`` trainable parameters in total;
- ``lora_parity(rank)``: as many trainable parameters per layer as a peft LoRA adapter of that rank on
  the same modules, ``r · (d_in + d_out)``: ``k = round(r (d_in + d_out) / d_in)`` rows,
  ``round(r (d_in + d_out) / d_out)`` columns, ``r (d_in + d_out)`` elements; for a neuron group the
  members' LoRA parameters over the parameters one neuron trains.

:class:`Pool` is what competes for a budget: one layer, or one neuron group, with its (normalised)
scores, how many units it has and what one unit costs in trainable parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch


def _check_positive_int(value, message: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{message}, got {value!r}")


@dataclass(frozen=True)
class TotalParams:
    """A budget of ``n`` trainable parameters over all selected layers."""
    n: int

    def __post_init__(self):
        _check_positive_int(self.n, "TotalParams needs a positive whole number of parameters")


@dataclass(frozen=True)
class LoraParity:
    """The trainable-parameter count of a peft LoRA adapter of rank ``rank`` on the same modules."""
    rank: int

    def __post_init__(self):
        _check_positive_int(self.rank, "lora_parity needs a positive integer rank")


def lora_parity(rank: int) -> LoraParity:
    """Budget: per layer, as many trainable parameters as LoRA of this rank (``r · (d_in + d_out)``)."""
    return LoraParity(rank)


Budget = Union[int, float, TotalParams, LoraParity]
ALLOWED = ("an int n (units per layer)", "a float ratio in (0, 1]", "rowsft.selection.TotalParams(n)",
           "rowsft.selection.lora_parity(rank)")


def check_budget(budget) -> None:
    """Raise a ValueError listing the allowed budgets when ``budget`` is none of them."""
    if isinstance(budget, (TotalParams, LoraParity)):
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget {budget!r} is not understood; use {', '.join(ALLOWED)}")
    if isinstance(budget, float) and (math.isnan(budget) or not 0 < budget <= 1):
        raise ValueError(f"budget ratio {budget!r} must lie in (0, 1]; for a count of units per layer pass an int")
    if isinstance(budget, int) and budget <= 0:
        raise ValueError(f"budget {budget} must be positive; use {', '.join(ALLOWED)}")


def parse_budget(budget) -> Budget:
    """The one reading of a budget, checked: an int, a float ratio, `TotalParams`, `lora_parity`, or text
    as a command line or YAML file writes it (``"64"`` rows per layer, ``"0.02"`` a ratio, ``"lora:8"``,
    ``"params:100000"``). Anything else is a ValueError that lists what is allowed."""
    if isinstance(budget, str):
        text = budget.strip().lower()
        try:
            if text.startswith("lora:"):
                budget = lora_parity(int(text[5:]))
            elif text.startswith("params:"):
                budget = TotalParams(int(float(text[7:])))
            else:
                value = float(text)
                budget = int(value) if value.is_integer() and value >= 1 else value
        except ValueError:
            raise ValueError(f"budget {budget!r} not understood: use rows per layer ('64'), a ratio ('0.02'), "
                             "'lora:8' or 'params:100000'") from None
    check_budget(budget)
    return budget


def describe_budget(budget) -> object:
    """A JSON-ready record of the budget (for ``Selection.meta``)."""
    if isinstance(budget, TotalParams):
        return {"total_params": budget.n}
    if isinstance(budget, LoraParity):
        return {"lora_parity": budget.rank}
    return budget


@dataclass
class Pool:
    """One layer (or neuron group) competing for the budget.

    ``scores`` are flat ``(size,)``; ``cost`` is the trainable parameters of one unit; ``lora`` is
    ``Σ (d_in + d_out)`` of its modules (LoRA parameters per rank); ``row_cost`` is ``d_in`` (the cost
    of one row, used to turn an int row budget into parameters for a column pool under the lean
    policy); ``expand`` turns chosen unit indices into ``{module: LayerChoice}``.
    """
    name: str
    unit: str
    scores: torch.Tensor
    cost: int
    lora: int
    row_cost: int
    expand: Callable[[torch.Tensor], dict]

    @property
    def size(self) -> int:
        return int(self.scores.numel())

    @property
    def noun(self) -> str:
        return {"row": "rows", "column": "columns", "element": "weights", "group": "neurons"}[self.unit]


def round_to_multiple(k: float, multiple_of: int) -> int:
    """Nearest multiple of ``multiple_of`` (halves round up), at least ``multiple_of``."""
    return max(multiple_of, int(math.floor(k / multiple_of + 0.5)) * multiple_of)


def per_layer_count(pool: Pool, budget, multiple_of: int, min_per_layer: int, max_per_layer: int | None,
                    ratio_of_params: float | None = None, int_as_rows: bool = False) -> int:
    """Units of ``pool`` under a per-layer budget (``ratio_of_params`` for TotalParams)."""
    if isinstance(budget, LoraParity):
        wanted = budget.rank * pool.lora / pool.cost
        what = f"lora_parity(rank={budget.rank}) (= {wanted:.4g} {pool.noun})"
    elif isinstance(budget, TotalParams):
        wanted = math.floor(ratio_of_params * pool.size)
        what = f"TotalParams({budget.n})"
    elif isinstance(budget, float):
        wanted = budget * pool.size
        what = f"ratio {budget}"
    elif int_as_rows and pool.cost != pool.row_cost:
        wanted = budget * pool.row_cost / pool.cost
        what = f"{budget} rows' parameters (= {wanted:.4g} {pool.noun})"
    else:
        wanted = budget
        what = f"{budget} {pool.noun}"
    if wanted > pool.size:
        raise ValueError(f"budget {what} exceeds {pool.name} ({pool.size} {pool.noun}); "
                         f"use at most {pool.size} or a ratio")
    if isinstance(budget, TotalParams):
        k = int(wanted) // multiple_of * multiple_of  # round down: the total must hold
    else:
        k = round_to_multiple(wanted, multiple_of) if multiple_of > 1 else max(1, int(math.floor(wanted + 0.5)))
    k = max(k, min_per_layer)
    if max_per_layer is not None:
        k = min(k, max_per_layer)
    return min(k, pool.size)


def global_counts(pools: list[Pool], total: float, multiple_of: int, min_per_layer: int,
                  max_per_layer: int | None) -> tuple[list[int], float]:
    """Units per pool under one threshold over all pools' scores, within the per-pool floor and ceiling.

    Every pool first gets its ``min_per_layer`` best units (the floor); the remaining budget goes to
    the best remaining units across all pools, taken in score order (ties: earlier pool, lower
    index) as long as their cost fits; a pool at its ceiling takes no more. Counts are then rounded
    down to ``multiple_of`` (never below the floor). Returns the counts and the threshold score.
    """
    floors, ceilings = [], []
    for p in pools:
        floor = min(p.size, -(-min_per_layer // multiple_of) * multiple_of if min_per_layer else 0)
        ceiling = p.size if max_per_layer is None else min(p.size, max_per_layer)
        ceiling = max(floor, ceiling // multiple_of * multiple_of)
        floors.append(floor)
        ceilings.append(ceiling)
    floor_cost = sum(f * p.cost for f, p in zip(floors, pools))
    if floor_cost > total:
        raise ValueError(f"min_per_layer={min_per_layer} over {len(pools)} layers already costs {floor_cost:,} "
                         f"trainable parameters, more than the budget's {int(total):,}; lower min_per_layer "
                         "(0 allows empty layers) or raise the budget")
    if len({p.cost for p in pools}) == 1 and all(c == p.size for c, p in zip(ceilings, pools)):
        return _equal_cost_counts(pools, floors, total - floor_cost, multiple_of)
    values, costs, owners = [], [], []
    for i, (p, floor, ceiling) in enumerate(zip(pools, floors, ceilings)):
        ranked = torch.sort(p.scores.double(), descending=True, stable=True).values[floor:ceiling]
        values.append(ranked)
        costs.append(torch.full_like(ranked, float(p.cost)))
        owners.append(torch.full(ranked.shape, i, dtype=torch.long))
    values, costs, owners = torch.cat(values), torch.cat(costs), torch.cat(owners)
    order = torch.sort(values, descending=True, stable=True).indices  # ties: earlier pool, better rank first
    spent = torch.cumsum(costs[order], 0)
    taken = order[spent <= total - floor_cost]          # a prefix of the order: one threshold
    threshold = float(values[taken[-1]]) if taken.numel() else float("inf")
    extra = torch.bincount(owners[taken], minlength=len(pools)).tolist()
    counts = [max(f, (f + e) // multiple_of * multiple_of) for f, e in zip(floors, extra)]
    return counts, threshold


def _equal_cost_counts(pools: list[Pool], floors: list[int], budget_left: float,
                       multiple_of: int) -> tuple[list[int], float]:
    """`global_counts` when every unit costs the same and no ceiling binds (e.g. SPEFT elements):
    the same answer from a k-th value instead of a full sort of every score (O(n), not O(n log n)).

    Ties at the threshold go to earlier pools first, as the sorted path does."""
    cost = pools[0].cost
    rest = []                                   # each pool's scores without its floor units
    for p, floor in zip(pools, floors):
        s = p.scores.double().reshape(-1)
        if floor:
            s = torch.sort(s, descending=True, stable=True).values[floor:] if floor > 64 else \
                _drop_top(s, floor)
        rest.append(s)
    n_take = min(int(budget_left // cost), sum(r.numel() for r in rest))
    if n_take <= 0:
        extra, threshold = [0] * len(pools), float("inf")
    else:
        flat = torch.cat(rest)
        threshold = float(torch.kthvalue(flat, flat.numel() - n_take + 1).values)   # n_take-th largest
        above = [int((r > threshold).sum()) for r in rest]
        ties_left = n_take - sum(above)
        extra = []
        for r, a in zip(rest, above):
            tie = min(ties_left, int((r == threshold).sum()))
            ties_left -= tie
            extra.append(a + tie)
    counts = [max(f, (f + e) // multiple_of * multiple_of) for f, e in zip(floors, extra)]
    return counts, threshold


def _drop_top(values: torch.Tensor, n: int) -> torch.Tensor:
    """``values`` without its ``n`` largest entries (n small)."""
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[torch.topk(values, n).indices] = False
    return values[keep]


def total_params(pools: list[Pool], budget, int_as_rows: bool) -> float:
    """The global budget in trainable parameters."""
    if isinstance(budget, TotalParams):
        return float(budget.n)
    if isinstance(budget, LoraParity):
        return float(budget.rank * sum(p.lora for p in pools))
    if isinstance(budget, float):
        return float(sum(round(budget * p.size) * p.cost for p in pools))
    if budget > max(p.size for p in pools) and not int_as_rows:
        raise ValueError(f"budget {budget} per layer exceeds every layer's size (largest: "
                         f"{max(p.size for p in pools)}); use a smaller count or a ratio")
    return float(sum(budget * (p.row_cost if int_as_rows else p.cost) for p in pools))
