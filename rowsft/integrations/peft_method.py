"""``get_rowsft_model``: score on calibration batches, select, then ``peft.get_peft_model``, in one call.

rowsft is a peft method: ``peft.get_peft_model(model, rowsft.RowSFTConfig(...))`` returns a ``peft.PeftModel``
(see `rowsft.integrations.peft_config`). Which rows to train depends on data for most metrics (Taylor,
Hessian, Wanda-like ...), which ``get_peft_model`` cannot take, so this helper does the data-dependent part
first, as LoRA-GA's and CorDA's preprocessing does in peft::

    from rowsft.integrations import get_rowsft_model
    model = get_rowsft_model(base, rowsft.RowSFTConfig(metric="taylor", k=64), calibration=batches)
    model.print_trainable_parameters()        # a real peft.PeftModel: save_pretrained, from_pretrained, Trainer ...

That is ``rowsft.score`` on the targeted modules (``target_modules``, ``layers_to_transform``, ... as
peft matches them), ``rowsft.select`` (or each layer's top ``k`` / ``k_pattern``), then
``peft.get_peft_model(model, RowSFTConfig.from_selection(selection, <the config's other fields>))``.
Data-free metrics (``magnitude``, ``random``) need no calibration.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Iterable

from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from rowsft.integrations.peft_config import RowSFTConfig
from rowsft.integrations.peft_plan import (
    DATA_FREE_METRICS,
    check_k,
    choose_units,
    scoring_unit,
    targeted_modules,
)
from rowsft.layers import tuner
from rowsft.scoring.scorer import score
from rowsft.targets import is_linear_like, linear_shape

SET_BY_SELECTION = ("target_modules", "indices", "k", "k_pattern", "unit_pattern", "unit", "metric", "budget",
                    "selection_meta", "peft_type", "peft_version")


def get_rowsft_model(model: nn.Module, config: RowSFTConfig | None = None, calibration: Iterable[dict] | None = None,
                     num_batches: int | None = 8, strategy: str = "per-layer", adapter_name: str = "default",
                     **score_options):
    """Score (``config.metric`` on up to ``num_batches`` of ``calibration``), select (``k`` / ``k_pattern`` per
    layer, or ``config.budget`` with ``strategy``), and return ``peft.get_peft_model(model, config for that
    selection, adapter_name)``. A config that already carries ``indices`` skips scoring. ``score_options``: further
    `rowsft.score` options (``p``, ``combine``, ...)."""
    config = config or RowSFTConfig()
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise TypeError("the model already carries peft adapters; add another with model.add_adapter(name, "
                        "RowSFTConfig.from_selection(selection)), or unload it first")
    if tuner.sparse_layers(getattr(model, "base_model", model)) or tuner.sparse_layers(model):
        raise TypeError("the model carries rowsft.apply's sparse layers; call rowsft.unload(model) first")
    if config.indices is not None:
        return get_peft_model(model, config, adapter_name)
    if calibration is None and config.metric not in DATA_FREE_METRICS:
        raise ValueError(f"metric {config.metric!r} needs calibration batches: get_rowsft_model(model, config, "
                         f"calibration=rowsft.batches(...)); or use a data-free metric {DATA_FREE_METRICS}")
    targets = targeted_modules(model, config)
    shapes = {n: linear_shape(m) for n, m in targets.items() if is_linear_like(m)}
    if not shapes:
        raise ValueError(f"target_modules={config.target_modules!r} matches no linear layer of {type(model).__name__}")
    unit = scoring_unit(config, list(shapes))
    check_k(config, shapes, unit)
    scores = score(model, calibration, metric=config.metric, unit=unit, targets=list(shapes),
                   num_batches=num_batches, seed=config.seed, **score_options)
    selection = choose_units(scores, config, shapes, strategy)
    others = {f.name: getattr(config, f.name) for f in fields(config) if f.init and f.name not in SET_BY_SELECTION}
    budget = config.budget if config.budget is not None else selection.meta.get("budget", config.k)
    chosen = RowSFTConfig.from_selection(selection, metric=config.metric, budget=budget, **others)
    return get_peft_model(model, chosen, adapter_name)


__all__ = ["get_rowsft_model", "DATA_FREE_METRICS"]
