"""`select`: from importance scores and a budget to a :class:`~rowsft.selection.choice.Selection`.

    selection = rowsft.select(scores, budget=64)                       # 64 best rows of every layer
    selection = rowsft.select(scores, 0.02, strategy="global")         # 2 % of all rows, one threshold
    selection = rowsft.select(scores, rowsft.lora_parity(8))           # LoRA-r8 parameter count per layer
    selection = rowsft.select({"row": rows, "column": cols}, lora_parity(8), unit_policy="lean")

Strategies:

- ``per-layer``: the exact top-``k`` of every layer (ties broken by the lower index, deterministic).
- ``global``: one threshold over the normalised scores of all layers: every layer first gets its
  ``min_per_layer`` best units, then the best remaining units of all layers are taken in score order
  while the trainable-parameter budget lasts (a layer stops at ``max_per_layer``). The total never
  exceeds the budget (an int or ratio budget counts the parameters it would give per layer).

Group scores select coupled neurons and expand to the rows / columns of every member module (one
``LayerChoice`` per member, in its own unit). Element scores select single weights (global top-k, or
per-layer density with a ratio budget).

Lean units (``unit_policy="lean"``, issue 10): given row and column scores of the same layers, each
family of module types that reads one input tensor (q/k/v, gate/up, query/key/value; any other type
alone) is trained by rows or by columns, whichever keeps fewer activations for the backward pass at
the same trainable parameters ``P`` per layer. A row delta needs the layer's whole input, ``d_in``
values per token, saved once for the whole family; a column delta needs only its own ``k = P / d_out``
input columns. Columns win when ``Σ_family P / d_out < d_in`` (summed over layers); ties keep rows.
Row and element layers keep no copy of an input that `rowsft.layers.rebuild` can rebuild from what the frozen
model keeps (on by default): a norm's output feeding q/k/v or gate/up, the MLP product feeding down.
With ``rebuilt_inputs=True`` (default) the rule counts that: a q/k/v row family pays its input once
(the first block, whose input norm reads the frozen embeddings and keeps nothing), gate/up and down
rows pay nothing; the attention output projection pays ``d_in`` per block as before. Pass
``rebuilt_inputs=False`` where nothing is rebuilt: a half-precision model with RMSNorm (its norms keep
a float32 copy, not their input), gradient checkpointing, or layers built with ``rebuild_input=False``.
The choice goes to ``selection.meta["unit_choice"]`` (per module type), the compared per-token
counts to ``meta["unit_choice_saved_per_token"]``.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

from rowsft.checks import check_count
from rowsft.scoring.agreement import topk_indices
from rowsft.scoring.scores import Scores
from rowsft.selection.budgets import (
    LoraParity,
    Pool,
    TotalParams,
    describe_budget,
    global_counts,
    lora_parity,
    parse_budget,
    per_layer_count,
    total_params,
)
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import check_layer_indices, layer_index, module_type, role

__all__ = ["select", "Selection", "LayerChoice", "TotalParams", "LoraParity", "lora_parity", "STRATEGIES",
           "SHARED_INPUT_FAMILIES"]

STRATEGIES = ("per-layer", "global")
# module types that read the same input tensor inside one block (a row delta saves it once for all)
SHARED_INPUT_FAMILIES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                         ("w1", "w3"))


def select(scores: Scores | Mapping[str, Scores], budget, strategy: str = "per-layer", multiple_of: int = 1,
           min_per_layer: int = 1, max_per_layer: int | None = None, module_types: Iterable[str] | None = None,
           layers: Iterable[int] | None = None, unit_policy: str | None = None,
           rebuilt_inputs: bool = True) -> Selection:
    """Choose the units to train under ``budget`` (see the module docstring and rowsft.selection.budgets).

    ``module_types``: keep only these module types (group unit: group kinds ``mlp`` / ``attention``
    or member module types); ``layers``: keep only these block indices. ``unit_policy="lean"``: rows or
    columns per module type, whichever keeps fewer activations; ``rebuilt_inputs``: whether that rule
    counts row inputs that `rowsft.layers.rebuild` rebuilds as free (module docstring).
    """
    budget = parse_budget(budget)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not known; choose one of {STRATEGIES}")
    check_count("multiple_of", multiple_of, 1)
    check_count("min_per_layer", min_per_layer, 0)
    if max_per_layer is not None and (not isinstance(max_per_layer, int) or max_per_layer < max(1, min_per_layer)):
        raise ValueError(f"max_per_layer must be an integer >= max(1, min_per_layer={min_per_layer}), "
                         f"got {max_per_layer!r}")
    if strategy == "per-layer" and min_per_layer < 1:
        min_per_layer = 1

    unit_choice, saved = None, None
    if unit_policy == "lean":
        base, pools, unit_choice, saved = _lean_pools(scores, budget, strategy, module_types, layers, rebuilt_inputs)
    elif unit_policy is not None:
        raise ValueError(f"unit_policy={unit_policy!r} is not known; use None or 'lean' (with row and column scores)")
    else:
        if not isinstance(scores, Scores):
            raise TypeError("select() takes a Scores (or, with unit_policy='lean', {'row': Scores, 'column': Scores})")
        base = scores
        pools = _filter(_pools(scores), module_types, layers, scores)

    if strategy == "per-layer":
        total_weights = sum(p.size * p.cost for p in pools)
        ratio = budget.n / total_weights if isinstance(budget, TotalParams) else None
        counts = [per_layer_count(p, budget, multiple_of, min_per_layer, max_per_layer, ratio,
                                  int_as_rows=unit_policy == "lean") for p in pools]
        if isinstance(budget, TotalParams) and sum(k * p.cost for k, p in zip(counts, pools)) > budget.n:
            raise ValueError(f"TotalParams({budget.n}) is too small for {len(pools)} layers with min_per_layer="
                             f"{min_per_layer} and multiple_of={multiple_of}; raise the budget or use "
                             "strategy='global'")
        threshold = None
    else:
        counts, threshold = global_counts(pools, total_params(pools, budget, unit_policy == "lean"), multiple_of,
                                          min_per_layer, max_per_layer)

    chosen: dict[str, LayerChoice] = {}
    for pool, k in zip(pools, counts):
        if k > 0:
            chosen.update(pool.expand(topk_indices(pool.scores, k)))
    meta = {"metric": base.metric, "unit": "lean" if unit_policy == "lean" else base.unit,
            "budget": describe_budget(budget), "strategy": strategy, "normalize": base.normalize,
            "multiple_of": multiple_of, "min_per_layer": min_per_layer, "max_per_layer": max_per_layer}
    if threshold is not None:
        meta["threshold"] = threshold if math.isfinite(threshold) else None
    if unit_choice is not None:
        meta["unit_choice"], meta["unit_choice_saved_per_token"] = unit_choice, saved
    return Selection(chosen, meta).validate()


# ---------------------------------------------------------------- pools
def _pools(scores: Scores) -> list[Pool]:
    pools = []
    for name in scores:
        values = scores[name].double()
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            raise ValueError(f"scores of {name} contain {int(bad.sum())} non-finite values (NaN or ±inf) of "
                             f"{values.numel()}; rescore with rowsft.score (it rejects non-finite scores), replace "
                             "them with finite numbers, or drop the layer")
        if scores.unit == "group":
            pools.append(_group_pool(scores, name, values.reshape(-1)))
            continue
        if name not in scores.shapes:
            raise ValueError(f"the scores do not record the shape of {name}; build them with rowsft.score")
        shape = scores.shapes[name]
        d_out, d_in = shape
        cost = {"row": d_in, "column": d_out, "element": 1}[scores.unit]
        pools.append(Pool(name, scores.unit, values.reshape(-1), cost, d_in + d_out, d_in,
                          lambda idx, n=name, u=scores.unit, s=shape: {n: LayerChoice(u, idx, s)}))
    return pools


def _group_pool(scores: Scores, name: str, values: torch.Tensor) -> Pool:
    group = scores.groups[name]
    cost, lora = 0, 0
    for member in group.members:
        d_out, d_in = scores.shapes[member.module]
        cost += len(member.offsets) * member.block * (d_in if member.unit == "row" else d_out)
    for module in dict.fromkeys(m.module for m in group.members):
        lora += sum(scores.shapes[module])

    def expand(neurons: torch.Tensor) -> dict[str, LayerChoice]:
        return {m.module: LayerChoice(m.unit, m.indices(neurons), scores.shapes[m.module]) for m in group.members}
    return Pool(name, "group", values, cost, lora, cost, expand)


def _filter(pools: list[Pool], module_types, layers, scores: Scores) -> list[Pool]:
    def types_of(pool):
        if pool.unit == "group":
            g = scores.groups[pool.name]
            return {g.kind} | {module_type(m.module) for m in g.members}
        return {module_type(pool.name)}
    if module_types is not None:
        wanted = {module_types} if isinstance(module_types, str) else set(module_types)
        known = set().union(*(types_of(p) for p in pools)) if pools else set()
        unknown = sorted(map(str, wanted - known))
        if unknown:
            raise ValueError(f"module_types {unknown} match no scored layer; module types here: {sorted(known)}. "
                             "Drop or correct the unknown names")
        pools = [p for p in pools if types_of(p) & wanted]
    if layers is not None:
        known = sorted({layer_index(p.name + ".") for p in pools} - {None})
        keep = check_layer_indices(layers, known)
        pools = [p for p in pools if layer_index(p.name + ".") in keep]
        if not pools:
            raise ValueError(f"layers={sorted(keep)} matches no scored layer; block indices here: {known}")
    if not pools:
        raise ValueError("no layer to select from: the scores are empty; score at least one layer")
    return pools


# ---------------------------------------------------------------- lean units (issue 10)
def _family(mtype: str) -> tuple[str, ...]:
    for fam in SHARED_INPUT_FAMILIES:
        if mtype in fam:
            return fam
    return (mtype,)


def _row_input_blocks(mtype: str, rebuilt_inputs: bool) -> str:
    """How often a row family of ``mtype`` pays its input: ``"each"`` block, ``"once"``, or ``"never"``."""
    if not rebuilt_inputs:
        return "each"
    return {"qkv": "once", "up": "never", "down": "never"}.get(role(mtype), "each")


def _lean_pools(scores, budget, strategy, module_types, layers, rebuilt_inputs=True):
    if not isinstance(scores, Mapping) or set(scores) != {"row", "column"}:
        raise ValueError("unit_policy='lean' needs scores={'row': row Scores, 'column': column Scores} of the "
                         "same layers (rowsft.score(..., unit='row') and unit='column')")
    rows, cols = scores["row"], scores["column"]
    if rows.unit != "row" or cols.unit != "column" or set(rows) != set(cols):
        raise ValueError("unit_policy='lean': scores['row'] must be row scores and scores['column'] column scores "
                         f"of the same layers (got units {rows.unit!r}/{cols.unit!r}, "
                         f"{len(set(rows) ^ set(cols))} layers in only one of them)")
    row_pools = _filter(_pools(rows), module_types, layers, rows)
    col_pools = {p.name: p for p in _pools(cols)}
    total_weights = sum(p.size * p.cost for p in row_pools)
    share = total_params(row_pools, budget, True) / total_weights if strategy == "global" else None
    saved: dict[tuple, dict[str, float]] = {}
    for p in row_pools:
        d_out, d_in = rows.shapes[p.name]
        params = share * d_out * d_in if share is not None else per_layer_count(p, budget, 1, 1, None, (
            budget.n / total_weights if isinstance(budget, TotalParams) else None)) * d_in
        fam = _family(module_type(p.name))
        slot = saved.setdefault(fam, {"row": 0.0, "column": 0.0, "_blocks": set()})
        block = (p.name.rsplit(".", 1)[0], d_in)
        pays = _row_input_blocks(module_type(p.name), rebuilt_inputs)
        if block not in slot["_blocks"] and not (pays == "never" or (pays == "once" and slot["_blocks"])):
            slot["row"] += d_in                    # the family's shared input, once per block (or once at all)
        slot["_blocks"].add(block)
        slot["column"] += params / d_out
    unit_choice, saved_out = {}, {}
    for fam, slot in saved.items():
        unit = "column" if slot["column"] < slot["row"] else "row"
        present = sorted({module_type(p.name) for p in row_pools} & set(fam))
        for mtype in present:
            unit_choice[mtype] = unit
        saved_out["/".join(present)] = {"row": slot["row"], "column": slot["column"]}
    pools = [p if unit_choice[module_type(p.name)] == "row" else col_pools[p.name] for p in row_pools]
    return rows, pools, unit_choice, saved_out
