"""`score`: importance of every row, column, coupled neuron group or weight of a model's target layers.

    scores = rowsft.score(model, batches, metric="taylor", unit="row", num_batches=8)

Units: ``row`` (output neuron of one layer), ``column`` (input neuron), ``group`` (a coupled neuron
across layers from :func:`rowsft.targets.neuron_groups`: an MLP neuron is its gate/up rows plus its
down column; an attention group is one key/value head with the query heads that share it, i.e. its
q/k/v rows plus the matching o columns), ``element`` (single weights, SPEFT).

A group neuron's score combines its members' scores (``combine="sum"`` by default, or ``"mean"``,
``"max"``); a member's share is the sum of its rows/columns of that neuron (a head spans ``head_dim``
rows), computed from the raw member scores before the per-group normalisation.

Metrics (definitions in rowsft.scoring.accumulators, rowsft.scoring.zeroth_order, rowsft.scoring.saliency): ``magnitude``
(row/column L1 or L2 norm: ``p=1|2`` or ``magnitude-l1`` / ``magnitude-l2``; element ``|W|``),
``taylor``, ``hessian`` (OBD), ``zo-taylor`` (SPSA, forward passes only), ``wanda``, ``activation``,
``random`` (seeded), and SPEFT's element saliences ``gradient``, ``snip``, ``fisher``, ``taylor-fo``,
``force``, ``grasp``, ``synflow``. Row and column scores of element-level metrics sum the element
scores over the other dimension (magnitude: the norm).

Scores are normalised per layer (``normalize``) before any comparison across layers; non-finite
scores raise a ValueError naming the layer; so do, before any pass, loss metrics given a calibration
batch whose labels are all -100 (no loss to differentiate: every row would score 0). Under an initialised ``torch.distributed`` process group
the raw accumulators are summed over ranks (each rank scoring its own batches), so every rank holds
the same scores and selects the same rows. The model comes back as it was (training flags,
``requires_grad`` flags, no hooks), even when scoring fails.

On a bitsandbytes-quantized base (``load_model(..., quantization="nf4" | "fp4" | "int8")``) every metric
but ``grasp`` and ``synflow`` (which differentiate with respect to the weights themselves, and refuse)
reads the layers' dequantized weights one layer at a time (`rowsft.targets.weight_out_in`), never a dense
copy of the model; gradient metrics need only the layers' inputs and output gradients. The scores are
those of the float model holding the dequantized weights. bitsandbytes' int8 layers choose their kernel
by training mode (in eval mode they quantize their inputs to int8 as well): scoring keeps them in
training mode (they have no dropout), so that the scores describe the function that training changes.
"""
from __future__ import annotations

import contextlib
import itertools
import zlib
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm  # plain tqdm: the core never pulls in ipywidgets

from rowsft.checks import check_count
from rowsft.scoring import accumulators as _metrics
from rowsft.scoring.saliency import grasp, synflow
from rowsft.scoring.scores import NORMALIZATIONS, Scores, check_finite, normalization_scale
from rowsft.scoring.zeroth_order import zo_taylor
from rowsft.targets import (
    NeuronGroup,
    find_targets,
    is_quantized,
    linear_shape,
    neuron_groups,
    quantization_kind,
    weight_out_in,
)

__all__ = ["score", "ScoreConfig", "Scores", "METRICS", "allowed_metrics"]

# metric -> needs calibration batches
METRICS = {"magnitude": False, "random": False, "synflow": False,
           "taylor": True, "hessian": True, "zo-taylor": True, "wanda": True, "activation": True,
           "gradient": True, "snip": True, "fisher": True, "taylor-fo": True, "force": True, "grasp": True}
ALIASES = {"magnitude-l1": ("magnitude", 1), "magnitude-l2": ("magnitude", 2), "obd": ("hessian", None),
           "zo": ("zo-taylor", None)}
UNIT_METRICS = {"row": tuple(METRICS), "column": tuple(METRICS), "group": tuple(METRICS),
                "element": tuple(m for m in METRICS if m != "activation")}
COMBINES = ("sum", "mean", "max")
# metrics whose calibration loss needs labelled tokens (the others only run forward passes)
LOSS_METRICS = ("taylor", "hessian", "zo-taylor", "gradient", "snip", "fisher", "taylor-fo", "force", "grasp")
# ScoreConfig count fields -> lowest allowed value
COUNT_OPTIONS = {"num_perturbations": 1, "synflow_seq_len": 1, "max_example_elements": 1}


def allowed_metrics(unit: str) -> tuple[str, ...]:
    """The metric names ``score`` accepts for ``unit``."""
    if unit not in UNIT_METRICS:
        raise ValueError(f"unit must be one of {tuple(UNIT_METRICS)}, got {unit!r}")
    return UNIT_METRICS[unit]


@dataclass
class ScoreConfig:
    """How to score (every field can also be passed to :func:`score` as a keyword)."""
    metric: str = "taylor"            # see METRICS; aliases magnitude-l1, magnitude-l2, obd, zo
    unit: str = "row"                 # row | column | group | element
    targets: object = "all-linear"    # as rowsft.targets.find_targets: "all-linear", "attention", "mlp", names, regex
    layers: Iterable[int] | None = None  # keep only these block indices
    num_batches: int | None = 8       # calibration batches taken from `batches` (None: all)
    normalize: str = "mean"           # per-layer divisor before global comparison: mean | max | sum | none
    p: int | None = None              # magnitude norm order, 1 or 2 (default 2)
    combine: str = "sum"              # group unit: how members' scores make a neuron's score: sum | mean | max
    seed: int = 0                     # random scores and zo-taylor perturbations
    num_perturbations: int = 64       # zo-taylor: SPSA perturbations (each = 2 passes over the batches)
    eps: float = 1e-3                 # zo-taylor: perturbation size
    perturbation: str = "rademacher"  # zo-taylor: rademacher | gaussian
    synflow_seq_len: int = 16         # synflow: length of the all-ones input
    max_example_elements: int = 2 ** 24  # hessian/fisher: per-example gradient entries held at once
    recompute: bool = True            # gradient metrics: recompute each block's activations in backward
                                      # (one more forward pass; keeps only block inputs alive, not all activations)
    dtype: torch.dtype = torch.float32   # of the returned score tensors (float64 for exactness checks)
    progress: Callable[[str, int, int], None] | bool | None = None  # progress(stage, done, total); True: a
                                      # tqdm bar; False/None: silent


def score(model: nn.Module, batches: Iterable[dict] | None = None, metric: str = "taylor", unit: str = "row",
          targets="all-linear", num_batches: int | None = 8, normalize: str = "mean",
          config: ScoreConfig | None = None, **overrides) -> Scores:
    """Score the target layers of ``model`` on up to ``num_batches`` calibration batches → :class:`Scores`.

    ``batches``: any iterable of batch dicts (``model(**batch)`` must give ``.loss`` for gradient
    metrics); unused by ``magnitude``, ``random`` and ``synflow``. Further options: the fields of
    :class:`ScoreConfig` (``p``, ``combine``, ``seed``, ``num_perturbations``, ``eps``, ...).
    """
    unknown = set(overrides) - {f.name for f in fields(ScoreConfig)}
    if unknown:
        raise TypeError(f"score() got unknown options {sorted(unknown)}; "
                        f"known: {[f.name for f in fields(ScoreConfig)]}")
    base = config or ScoreConfig()
    if config is None:
        base = replace(base, metric=metric, unit=unit, targets=targets, num_batches=num_batches, normalize=normalize)
    cfg = replace(base, **overrides)
    cfg = replace(cfg, progress=progress_callback(cfg.progress))
    name, p = canonical_metric(cfg.metric, cfg.unit, cfg.p)
    check_counts(cfg)
    if cfg.normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={cfg.normalize!r} is not known; choose one of {NORMALIZATIONS}")
    if cfg.combine not in COMBINES:
        raise ValueError(f"combine={cfg.combine!r} is not known; choose one of {COMBINES}")

    modules = find_targets(model, cfg.targets, cfg.layers)
    groups: dict[str, NeuronGroup] = {}
    if cfg.unit == "group":
        groups = {g.name: g for g in neuron_groups(model) if all(m.module in modules for m in g.members)}
        if not groups:
            raise ValueError(f"no coupled neuron group lies entirely within targets={cfg.targets!r} "
                             f"(layers={cfg.layers!r}); use targets='all-linear', 'mlp' or 'attention', or unit 'row'")
        views: dict[str, set[str]] = {}
        for g in groups.values():
            for m in g.members:
                views.setdefault(m.module, set()).add(m.unit)
        modules = {n: modules[n] for n in modules if n in views}
    else:
        views = {n: {cfg.unit} for n in modules}

    check_quantized_targets(name, modules)
    calibration = _calibration_batches(batches, cfg.num_batches, model) if METRICS[name] else []
    if name in LOSS_METRICS:
        check_labelled(calibration, name)
    with scoring_mode(model):
        per_module = _per_module_scores(name, p, model, modules, views, calibration, cfg)
    for module_name, slot in per_module.items():
        for view, values in slot.items():
            check_finite(module_name if cfg.unit != "group" else f"{module_name} ({view}s)", values)

    if cfg.unit == "group":
        raw = {g: (_random_scores((group.size,), cfg.seed, g) if name == "random"
                   else group_scores(group, per_module, cfg.combine)) for g, group in groups.items()}
    else:
        raw = {n: per_module[n][cfg.unit] for n in modules}
    values, scales = {}, {}
    for layer, r in raw.items():
        r = r.detach().to("cpu")  # float32, or float64 for float64 models
        check_finite(layer, r)
        scales[layer] = normalization_scale(r, cfg.normalize)
        values[layer] = (r / scales[layer]).to(cfg.dtype)
    shapes = {n: linear_shape(m) for n, m in modules.items()}
    meta = {"num_batches": len(calibration), "seed": cfg.seed,
            "targets": cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)}
    if name == "magnitude":
        meta["p"] = p
    if name == "zo-taylor":
        meta.update(num_perturbations=cfg.num_perturbations, eps=cfg.eps, perturbation=cfg.perturbation)
    if cfg.unit == "group":
        meta["combine"] = cfg.combine
    return Scores(values, name, cfg.unit, cfg.normalize, shapes, groups, scales, meta, dtype=cfg.dtype)


def canonical_metric(metric: str, unit: str, p: int | None) -> tuple[str, int | None]:
    """``(metric name, magnitude norm order)`` with aliases resolved; a ValueError listing the metrics of ``unit``."""
    allowed = allowed_metrics(unit)
    name, alias_p = ALIASES.get(metric, (metric, None))
    if name not in allowed:
        raise ValueError(f"metric {metric!r} is not available for unit {unit!r}; allowed: {list(allowed)} "
                         f"(aliases: {list(ALIASES)})")
    if name == "magnitude":
        if alias_p is not None and p is not None and p != alias_p:
            raise ValueError(f"metric {metric!r} means p={alias_p} but p={p} was given")
        p = alias_p or p or 2
        if p not in (1, 2):
            raise ValueError(f"magnitude needs p=1 or p=2, got p={p!r}")
    return name, p


WEIGHT_AUTOGRAD_METRICS = ("grasp", "synflow")   # differentiate with respect to the stored weights


def check_quantized_targets(metric: str, modules: dict[str, nn.Module]) -> None:
    """A ValueError when ``metric`` needs the weights as autograd leaves and a target layer is quantized."""
    quantized = [n for n, m in modules.items() if is_quantized(m)]
    if metric in WEIGHT_AUTOGRAD_METRICS and quantized:
        kind = quantization_kind(modules[quantized[0]])
        raise ValueError(f"metric {metric!r} differentiates with respect to the weights themselves, which a quantized "
                         f"layer does not hold as a float tensor ({quantized[0]} is {kind}); use 'taylor', 'hessian', "
                         f"'fisher', 'gradient', 'snip', 'wanda', 'magnitude' or 'zo-taylor'")


def check_counts(cfg: ScoreConfig) -> None:
    """A ValueError naming the option when a count of ``cfg`` is not a whole number in range."""
    for option, low in COUNT_OPTIONS.items():
        check_count(option, getattr(cfg, option), low)
    if cfg.num_batches is not None:
        check_count("num_batches", cfg.num_batches, 1, "(or None for all)")


def progress_callback(progress) -> Callable[[str, int, int], None] | None:
    """``ScoreConfig.progress`` as a function ``fn(stage, done, total)`` or None: False/None give None,
    True a tqdm bar per stage, a callable is kept."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return TqdmProgress()
    if callable(progress):
        return progress
    raise TypeError(f"progress must be True (a progress bar), False/None (silent) or a function "
                    f"fn(stage, done, total); got {progress!r}")


class TqdmProgress:
    """``progress(stage, done, total)`` drawing one tqdm bar per stage (closed when done reaches total)."""

    def __init__(self):
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=f"score {stage}", leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]


def labelled_tokens(batch: dict) -> int | None:
    """How many labels of ``batch`` are not -100 (None when the batch carries no ``labels`` tensor)."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not torch.is_tensor(labels):
        return None
    return int(labels.ne(-100).sum())


def check_labelled(batches: Iterable[dict], metric: str) -> None:
    """A ValueError when a calibration batch has labels but none of them counts (all -100): its loss
    is NaN (or 0), so a gradient metric would score every row alike and selection would take rows 0..k-1."""
    for i, batch in enumerate(batches):
        if labelled_tokens(batch) == 0:
            raise ValueError(f"calibration batch {i} has no labelled token (every label is -100), so metric "
                             f"{metric!r} has no loss to differentiate and would score every row 0. Give batches "
                             "whose answers are labelled (check that max_length does not truncate the answers), "
                             "or use a forward-only metric ('magnitude', 'wanda', 'activation')")


def _calibration_batches(batches, num_batches, model) -> list[dict]:
    if batches is None:
        raise ValueError("this metric needs calibration batches: pass batches=rowsft.batches(...) or a list of dicts")
    device = next(model.parameters()).device
    taken = list(itertools.islice(iter(batches), num_batches))
    if not taken:
        raise ValueError("the calibration batches are empty; give at least one batch (check the dataset split)")
    for b in taken:
        if not isinstance(b, dict):
            raise TypeError(f"a calibration batch must be a dict of tensors (model(**batch)); got {type(b).__name__}")
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in taken]


@contextlib.contextmanager
def scoring_mode(model: nn.Module):
    """Eval mode, ``requires_grad=False`` everywhere and no KV cache for the duration; all restored on exit,
    even on error."""
    training = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    try:
        if use_cache is not None:
            config.use_cache = False
        model.eval()
        for m in model.modules():
            if quantization_kind(m) == "int8" and not hasattr(m, "base_layer"):
                m.training = True          # bitsandbytes' int8 layer: the training kernel (module docstring)
        for p in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, flag in training.items():
            m.training = flag
        for p, flag in grads.items():
            p.requires_grad_(flag)
        if use_cache is not None:
            config.use_cache = use_cache


def _per_module_scores(name, p, model, modules, views, batches, cfg) -> dict[str, dict[str, torch.Tensor]]:
    if name == "magnitude":
        return {n: _magnitude(m, views[n], p) for n, m in modules.items()}
    if name == "random":
        return {n: {v: _random_scores(_view_shape(m, v), cfg.seed, f"{n}:{v}") for v in views[n]}
                for n, m in modules.items()}
    if name == "zo-taylor":
        return zo_taylor(model, modules, views, batches, cfg.num_perturbations, cfg.eps, cfg.perturbation,
                         cfg.seed, cfg.progress)
    if name == "grasp":
        return grasp(model, modules, views, batches, cfg.progress)
    if name == "synflow":
        return synflow(model, modules, views, cfg.synflow_seq_len)
    return _metrics.accumulate(model, modules, views, name, batches, cfg.max_example_elements, cfg.progress,
                               recompute=cfg.recompute)


def _view_shape(module: nn.Module, view: str) -> tuple[int, ...]:
    d_out, d_in = linear_shape(module)
    return {"row": (d_out,), "column": (d_in,), "element": (d_out, d_in)}[view]


def _magnitude(module: nn.Module, views: set[str], p: int) -> dict[str, torch.Tensor]:
    w = weight_out_in(module).detach()
    w = w.to(_metrics.accumulation_dtype(w))  # (d_out, d_in)
    out = {}
    for view in views:
        if view == "element":
            out[view] = w.abs()
        else:
            out[view] = torch.linalg.vector_norm(w, ord=p, dim=1 if view == "row" else 0)
    return out


def _random_scores(shape: tuple[int, ...], seed: int, key: str) -> torch.Tensor:
    """Uniform [0, 1) scores, reproducible from ``seed`` and the layer name."""
    gen = torch.Generator().manual_seed((int(seed) * 2_654_435_761 + zlib.crc32(key.encode())) % (2 ** 63))
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def neuron_table(member, size: int) -> torch.Tensor:
    """``(size, len(offsets) * block)`` indices: row ``j`` lists the rows/columns of ``member`` of neuron ``j``."""
    offsets = torch.tensor(member.offsets, dtype=torch.long).reshape(-1, 1, 1)
    neurons = torch.arange(size).reshape(1, -1, 1) * member.block
    within = torch.arange(member.block).reshape(1, 1, -1)
    return (offsets + neurons + within).permute(1, 0, 2).reshape(size, -1)


def group_scores(group: NeuronGroup, per_module: dict[str, dict[str, torch.Tensor]],
                 combine: str = "sum") -> torch.Tensor:
    """``(group.size,)``: each member's share of neuron ``j`` (sum over its rows/columns), combined."""
    shares = []
    for member in group.members:
        values = per_module[member.module][member.unit]  # (d_out,) or (d_in,)
        shares.append(values[neuron_table(member, group.size).to(values.device)].sum(1))
    stacked = torch.stack(shares)  # (members, size)
    if combine == "sum":
        return stacked.sum(0)
    if combine == "mean":
        return stacked.mean(0)
    return stacked.max(0).values
