"""The plan a RowSFT adapter follows: which linear modules it wraps and which units of each it trains.

`plan_adapter(model, config)` is what ``get_peft_model`` / ``add_adapter`` run (from the tuner's
``_prepare_model``) before any module changes, so a bad config is refused with the model untouched:

1. targets: peft's own matching (``check_target_module_exists``: ``target_modules``, ``exclude_modules``,
   ``layers_to_transform`` / ``layers_pattern``, ``modules_to_save``) over the model's modules, outside
   existing tuner layers; ``"all-linear"`` means rowsft's all-linear (`rowsft.targets.find_targets`: every
   ``nn.Linear`` / ``Conv1D`` but output heads such as ``lm_head`` and ``classifier``);
2. per target: the unit (``unit_pattern``, else ``unit``) and the positions: ``indices[name]`` when the
   config carries them (`RowSFTConfig.from_selection`), else the top ``k`` (``k_pattern``) of a data-free
   metric (``magnitude``, ``random``, ...) computed with `rowsft.score` / `rowsft.select`, recorded back
   into the config (``indices``, ``k_pattern``, ``unit_pattern``) so that a saved adapter reloads the same.

Pattern keys (``k_pattern``, ``unit_pattern``) match a module by its full name, else as LoRA's
``rank_pattern`` does (a regular expression matching the end of the name at a dot boundary).
"""
from __future__ import annotations

import copy
import re
from collections import Counter

from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn

from rowsft.scoring.agreement import topk_indices
from rowsft.scoring.scorer import score
from rowsft.selection.budgets import TotalParams, lora_parity
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.selection.strategies import select
from rowsft.targets import find_targets, is_linear_like, linear_shape

ALL_LINEAR = "all-linear"
UNITS = ("row", "column", "element", "group")
DATA_FREE_METRICS = ("magnitude", "magnitude-l1", "magnitude-l2", "random", "synflow")


def pattern_matches(key: str, name: str) -> bool:
    """Whether the pattern ``key`` names the module ``name``: the full name, or LoRA's ``rank_pattern`` rule."""
    return key == name or re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(pattern: dict | None, name: str, default):
    """``pattern``'s value for the module ``name`` (its full name first, then the first matching key)."""
    if not pattern:
        return default
    if name in pattern:
        return pattern[name]
    return next((value for key, value in pattern.items() if pattern_matches(key, name)), default)


def targeted_modules(model: nn.Module, config) -> dict[str, nn.Module]:
    """The modules ``get_peft_model(model, config)`` wraps, by name, in model order (nothing is changed)."""
    probe = copy.copy(config)
    targets = config.target_modules
    if targets is None or (isinstance(targets, str) and targets.lower() == ALL_LINEAR):
        probe.target_modules = set(find_targets(model, ALL_LINEAR))
    inside = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    return {key: module for key, module in model.named_modules()
            if key and not any(key.startswith(p) for p in inside) and check_target_module_exists(probe, key)}


def most_common_k(ks: list[int]) -> int:
    counts = Counter(ks)
    return min(counts, key=lambda k: (-counts[k], k))


def _check_patterns(config, names: list[str]) -> None:
    for field in ("k_pattern", "unit_pattern"):
        unused = [key for key in (getattr(config, field) or {}) if not any(pattern_matches(key, n) for n in names)]
        if unused:
            raise ValueError(f"{field} keys {unused} name no targeted module; the targets are {names[:6]}"
                             f"{' ...' if len(names) > 6 else ''} (full names, or patterns matching their ends)")


def _budget(value):
    """A JSON budget (int, ratio, 'lora:8', or a `describe_budget` record) as `rowsft.select` takes it."""
    if isinstance(value, dict) and "total_params" in value:
        return TotalParams(int(value["total_params"]))
    if isinstance(value, dict) and "lora_parity" in value:
        return lora_parity(int(value["lora_parity"]))
    return value


def _fixed_plan(config, names: list[str], shapes: dict, units: dict) -> dict[str, LayerChoice]:
    """The plan of a config carrying ``indices`` (checked against the targets and ``k`` / ``k_pattern``)."""
    extra = sorted(set(config.indices) - set(names))
    if extra:
        raise ValueError(f"indices name modules that target_modules does not match (or that are not linear): "
                         f"{extra[:4]}; build the config with RowSFTConfig.from_selection(selection)")
    missing = [n for n in names if n not in config.indices]
    if missing:
        raise ValueError(f"target_modules matches {missing[:4]} but indices gives them no positions; list exactly "
                         f"the selected modules in target_modules (RowSFTConfig.from_selection does)")
    plan = {}
    for name in names:
        if units[name] == "group":
            raise ValueError(f"{name}: unit 'group' needs each module's unit (row or column) in unit_pattern; "
                             f"build the config with RowSFTConfig.from_selection(selection)")
        choice = LayerChoice(units[name], config.indices[name], shapes[name])
        choice.validate(name)
        k = pattern_value(config.k_pattern, name, config.k)
        if k != choice.k:
            raise ValueError(f"{name}: indices hold {choice.k} {units[name]}s but k / k_pattern say {k}; "
                             f"make them agree (RowSFTConfig.from_selection records k_pattern)")
        plan[name] = choice
    return plan


def check_k(config, shapes: dict, unit: str) -> None:
    """Refuse a ``k`` (or ``k_pattern`` entry) larger than the layer has units of ``unit``."""
    if unit == "group":
        return
    for name, shape in shapes.items():
        k = pattern_value(config.k_pattern, name, config.k)
        limit = LayerChoice(unit, [], shape).limit
        if k > limit:
            raise ValueError(f"{name}: k={k} {unit}s but the layer of shape {shape} (d_out, d_in) has only "
                             f"{limit}; lower k or set k_pattern for it")


def choose_units(scores, config, shapes: dict, strategy: str = "per-layer") -> Selection:
    """The units ``config`` asks for, from ``scores`` (`rowsft.Scores` of the modules in ``shapes``): the top
    ``k`` (``k_pattern``) of each layer; `rowsft.select` with ``budget`` (or ``k``) for groups, a ``budget``
    or another ``strategy``."""
    if scores.unit == "group" or config.budget is not None or strategy != "per-layer":
        return select(scores, _budget(config.k if config.budget is None else config.budget), strategy=strategy)
    check_k(config, shapes, scores.unit)
    layers = {name: LayerChoice(scores.unit, topk_indices(scores[name], pattern_value(config.k_pattern, name, config.k)),
                                shape) for name, shape in shapes.items()}
    return Selection(layers, {"metric": scores.metric, "unit": scores.unit, "budget": config.k,
                              "strategy": "per-layer"})


def scoring_unit(config, names: list[str]) -> str:
    """The one unit a selection for ``config`` scores (``unit``; a ``unit_pattern`` may not mix in others)."""
    kinds = sorted({pattern_value(config.unit_pattern, n, config.unit) for n in names})
    if len(kinds) > 1:
        raise ValueError(f"unit_pattern mixes units {kinds}; a selection scores one unit, so give the positions "
                         f"(RowSFTConfig.from_selection) or one unit")
    return kinds[0]


def _data_free_plan(model: nn.Module, config, shapes: dict) -> dict[str, LayerChoice]:
    """The top units by a data-free metric (scored on the weights alone, no calibration batches)."""
    if config.metric not in DATA_FREE_METRICS:
        raise ValueError(f"metric {config.metric!r} needs calibration batches, which get_peft_model cannot take: "
                         f"use rowsft.integrations.get_rowsft_model(model, config, calibration=batches), or "
                         f"RowSFTConfig.from_selection(rowsft.select(rowsft.score(model, batches, ...), k)); "
                         f"or a data-free metric {DATA_FREE_METRICS}")
    unit = scoring_unit(config, list(shapes))
    check_k(config, shapes, unit)
    scores = score(model, None, metric=config.metric, unit=unit, targets=list(shapes), num_batches=None,
                   seed=config.seed)
    return dict(choose_units(scores, config, shapes).layers)


def plan_adapter(model: nn.Module, config) -> dict[str, LayerChoice]:
    """What each targeted module of ``model`` trains under ``config``: ``{module name: LayerChoice}``.

    Everything is checked before anything changes (clear ValueError / TypeError). A data-free selection is
    written back into ``config`` (``indices``, ``k_pattern``, ``unit_pattern``), as peft's EVA records its ranks."""
    targets = targeted_modules(model, config)
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} (layers_to_transform="
                         f"{config.layers_to_transform!r}) matches no module of {type(model).__name__}")
    wrong = [n for n, m in targets.items() if not is_linear_like(m)]
    if wrong:
        raise TypeError(f"target_modules matches {wrong[:4]}, which are not linear layers (nn.Linear or transformers "
                        f"Conv1D); RowSFT trains rows, columns or elements of linear layers only")
    names = list(targets)
    shapes = {n: linear_shape(m) for n, m in targets.items()}
    _check_patterns(config, names)
    if config.indices is not None:
        units = {n: pattern_value(config.unit_pattern, n, config.unit) for n in names}
        return _fixed_plan(config, names, shapes, units)
    plan = _data_free_plan(model, config, shapes)
    record_plan(config, Selection(plan))
    return plan


def record_plan(config, selection: Selection) -> None:
    """Write a selection's modules, positions, units and ``k`` into ``config`` (in place)."""
    layers = selection.layers
    ks = {n: c.k for n, c in layers.items()}
    config.k = most_common_k(list(ks.values()))
    config.k_pattern = {n: k for n, k in ks.items() if k != config.k}
    kinds = {c.unit for c in layers.values()}
    if config.unit == "group" or len(kinds) > 1:
        config.unit = "group" if config.unit == "group" else Counter(c.unit for c in layers.values()).most_common(1)[0][0]
        config.unit_pattern = {n: c.unit for n, c in layers.items() if c.unit != config.unit}
    else:
        config.unit, config.unit_pattern = kinds.pop(), {}
    config.indices = {n: c.indices.tolist() for n, c in layers.items()}
    config.target_modules = set(layers)


__all__ = ["plan_adapter", "targeted_modules", "record_plan", "choose_units", "check_k", "scoring_unit", "pattern_value", "pattern_matches", "DATA_FREE_METRICS",
           "UNITS", "ALL_LINEAR", "most_common_k"]
