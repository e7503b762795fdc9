"""PEFT conventions for rowsft: ``RowSFTConfig``, ``get_rowsft_model`` and the ``RowSFTModel`` wrapper.

People who know PEFT expect ``get_peft_model(model, config)``, ``model.print_trainable_parameters()``,
``model.save_pretrained(dir)``, ``PeftModel.from_pretrained(base, dir)`` and ``model.merge_and_unload()``.
rowsft offers the same calls under its own names::

    from rowsft.integrations import RowSFTConfig, RowSFTModel, get_rowsft_model
    model = get_rowsft_model(base, RowSFTConfig(metric="taylor", budget=64), calibration=batches)
    model.print_trainable_parameters()        # trainable params: 1,234 || all params: ... || trainable%: 0.1234
    model.save_pretrained("runs/x")           # adapter_config.json + adapter_model.safetensors
    model = RowSFTModel.from_pretrained(fresh_base, "runs/x", is_trainable=True)
    plain = model.merge_and_unload()

Why rowsft is not registered as a PEFT method (``peft.get_peft_model(model, RowSFTConfig(...))``), judged
on peft 0.21:

1. ``peft.utils.register_peft_method`` only accepts names that already exist in the closed enum
   ``peft.PeftType`` ("Unknown PEFT type ..., please add an entry to peft.utils.peft_types.PeftType");
   adding one means patching a private ``enum.Enum`` internals at import time, which breaks with any
   peft release that touches that enum.
2. A PEFT tuner (``BaseTuner`` + ``BaseTunerLayer``) keeps several named adapters per layer
   (``ParameterDict``s keyed by adapter name, ``set_adapter``/``delete_adapter``/``disable_adapters``,
   ``_create_and_replace`` per target from the config alone). rowsft's layers hold one update each and
   its choice of rows is data-dependent (scores on calibration batches), which ``get_peft_model``'s
   config-only construction cannot express without storing every layer's index list in the config.
   That is a second implementation of the layers, not a small step.
3. A PEFT checkpoint of it would only load where rowsft is installed anyway.

So the thin wrapper below gives the familiar calls, writes the familiar folder layout
(``adapter_config.json`` with ``base_model_name_or_path``, ``format_version`` and
``peft_type: "ROWSFT"``; ``adapter_model.safetensors``); ``peft.PeftModel.from_pretrained`` refuses
that folder (``KeyError: 'ROWSFT'``) rather than misreading it.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from rowsft.layers import adapters, tuner
from rowsft.layers.adapter_checks import read_adapter_config
from rowsft.scoring.scorer import score
from rowsft.selection.strategies import select

DATA_FREE_METRICS = ("magnitude", "magnitude-l1", "magnitude-l2", "random", "synflow")


def _help(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class RowSFTConfig:
    """How `get_rowsft_model` chooses and applies rows (the PEFT ``LoraConfig`` of rowsft)."""
    metric: str = _help("taylor", "importance metric (taylor, magnitude, random, hessian, ...)")
    unit: str = _help("row", "row, column, element or group")
    budget: Any = _help(64, "rows per layer (64), a ratio (0.02), or a rowsft.selection budget object "
                            "(TotalParams, lora_parity)")
    strategy: str = _help("per-layer", "per-layer or global")
    targets: Any = _help("all-linear", "all-linear, attention, mlp, a list of module types, or a regex")
    num_batches: int = _help(8, "calibration batches used for scoring")
    train_heads: Any = _help(False, "also train classification heads (True or a list of names)")
    delta_dtype: str | None = _help(None, "dtype of the updates, e.g. 'float32' over a bf16 model")
    base_model_name_or_path: str | None = _help(None, "recorded in adapter_config.json (default: the model's config)")
    selection: Any = _help(None, "a ready rowsft Selection; skips scoring")

    @property
    def peft_type(self) -> str:
        return "ROWSFT"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["budget"] = self.budget if isinstance(self.budget, (int, float, str)) else repr(self.budget)
        d["selection"] = None if self.selection is None else self.selection.summary()
        d["peft_type"] = self.peft_type
        return d


def get_rowsft_model(model: nn.Module, config: RowSFTConfig | None = None,
                     calibration: Iterable[dict] | None = None) -> "RowSFTModel":
    """Score (on ``calibration`` batches), select and apply in one call, as ``peft.get_peft_model`` does.

    ``config.selection`` skips scoring. Metrics other than ``magnitude`` / ``random`` need
    ``calibration`` batches (dicts the model takes as ``model(**batch)`` with labels).
    """
    config = config or RowSFTConfig()
    if isinstance(model, RowSFTModel):
        raise TypeError("the model is already a RowSFTModel; call merge_and_unload() or unload() first")
    selection = config.selection
    if selection is None:
        if calibration is None and config.metric not in DATA_FREE_METRICS:
            raise ValueError(f"metric {config.metric!r} needs calibration batches: "
                             f"get_rowsft_model(model, config, calibration=rowsft.batches(...)); "
                             f"or use a data-free metric {DATA_FREE_METRICS}")
        scores = score(model, calibration, metric=config.metric, unit=config.unit, targets=config.targets,
                       num_batches=config.num_batches)
        selection = select(scores, config.budget, strategy=config.strategy)
    delta_dtype = getattr(torch, config.delta_dtype) if isinstance(config.delta_dtype, str) else config.delta_dtype
    tuner.apply(model, selection, train_heads=config.train_heads, delta_dtype=delta_dtype)
    return RowSFTModel(model, config)


class RowSFTModel(nn.Module):
    """A model carrying rowsft sparse layers, with PEFT's ``PeftModel`` calls.

    Attributes the wrapper lacks are looked up on the wrapped model (``config``, ``generate``, ...),
    and calling it calls the wrapped model.
    """

    def __init__(self, model: nn.Module, config: RowSFTConfig | None = None):
        super().__init__()
        if not tuner.sparse_layers(model):
            raise ValueError("RowSFTModel wraps a model after rowsft.apply(model, selection); this one has no "
                             "rowsft sparse layers (use get_rowsft_model(model, RowSFTConfig(...)) instead)")
        self.base_model = model
        self.rowsft_config = config or RowSFTConfig()

    # ---------------------------------------------------------------- delegation
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (still carrying the sparse layers)."""
        return self.base_model

    @property
    def selection(self):
        """The `Selection` applied to the model."""
        return tuner.current_selection(self.base_model)

    # ---------------------------------------------------------------- PEFT's calls
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, as PEFT's method of that name."""
        return tuner.trainable_parameters(self.base_model)

    def print_trainable_parameters(self) -> None:
        """``trainable params: N || all params: M || trainable%: P`` (PEFT's format)."""
        tuner.print_trainable_parameters(self.base_model)

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into ``save_directory``.

        As PEFT's ``save_pretrained``, the two files go beside whatever the folder already holds
        (``checkpoint-500/``, ``README.md``, ...): nothing else is replaced or deleted, and a killed save
        leaves the earlier adapter files. A file at ``save_directory`` is refused. Accepts and ignores
        PEFT's keyword arguments (``safe_serialization``, ...), except ``is_main_process=False`` which
        skips writing (as on non-zero ranks)."""
        if not kwargs.get("is_main_process", True):
            return
        adapters.save_adapter(self.base_model, save_directory, overwrite=True,
                              **({"base_model_name": self.rowsft_config.base_model_name_or_path}
                                 if self.rowsft_config.base_model_name_or_path else {}))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, is_trainable: bool = False, **kwargs) -> "RowSFTModel":
        """Load the adapter folder ``model_id`` into the plain ``model``.

        As in PEFT, the adapter is frozen (inference) unless ``is_trainable=True``."""
        config = read_adapter_config(model_id)
        adapters.load_adapter(model, model_id)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return cls(model, RowSFTConfig(base_model_name_or_path=config.get("base_model_name_or_path")))

    def merge_adapter(self) -> None:
        tuner.merge(self.base_model)

    def unmerge_adapter(self) -> None:
        tuner.unmerge(self.base_model)

    def merge_and_unload(self) -> nn.Module:
        """Fold the updates into the weights and return the plain model (with original module types)."""
        return tuner.merge_and_unload(self.base_model)

    def unload(self) -> nn.Module:
        """Drop the updates and return the plain model."""
        return tuner.unload(self.base_model)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model without the updates inside the ``with`` block (merge-free: the updates
        are only skipped, the base weights are not touched)."""
        layers = [layer for layer in tuner.sparse_layers(self.base_model).values() if not layer.merged]
        if len(layers) != len(tuner.sparse_layers(self.base_model)):
            raise RuntimeError("disable_adapter needs unmerged updates; call unmerge_adapter() first")
        skipped = [_SkipUpdate(layer) for layer in layers]
        try:
            yield
        finally:
            for s in skipped:
                s.restore()

    def __repr__(self) -> str:
        return f"RowSFTModel({tuner.current_selection(self.base_model).summary()})\n{self.base_model!r}"


class _SkipUpdate:
    """Makes one sparse layer forward its base layer alone until ``restore()`` (a forward hook)."""

    def __init__(self, layer: nn.Module):
        base = layer.base_layer
        self.handle = layer.register_forward_hook(lambda module, args, output: base(*args))

    def restore(self) -> None:
        self.handle.remove()


__all__ = ["RowSFTConfig", "RowSFTModel", "get_rowsft_model", "DATA_FREE_METRICS"]
