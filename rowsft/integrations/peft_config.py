"""``RowSFTConfig``: rowsft's ``peft.PeftConfig``, the ``LoraConfig`` of row-based sparse fine-tuning.

    import rowsft
    from peft import get_peft_model, PeftModel
    model = get_peft_model(base, rowsft.RowSFTConfig.from_selection(rowsft.select(scores, 8)))   # those rows
    model = get_peft_model(base, rowsft.RowSFTConfig(k=8, metric="magnitude"))     # data-free: chosen at injection
    model.save_pretrained("runs/x")                    # adapter_config.json (peft_type ROWSFT) + adapter_model.safetensors
    model = PeftModel.from_pretrained(fresh_base, "runs/x")

Importing this module registers the method with peft (`rowsft.integrations.peft_tuner.register_with_peft`), so
peft resolves ``peft_type: "ROWSFT"`` from then on. ``import rowsft`` stays cheap and does not import peft:
registration happens on first use of ``rowsft.RowSFTConfig`` (or ``rowsft.save_as_lora``,
``rowsft.integrations.get_rowsft_model``, or ``import rowsft.integrations.peft_config``). A process that only
calls ``PeftModel.from_pretrained`` on a RowSFT folder must touch one of those first.

Per-module ``k`` (``k_pattern``, like LoRA's ``rank_pattern``) and unit (``unit_pattern``) make saved adapters
reload with their shapes; ``indices`` hold the exact positions (also saved as buffers with the weights).
"""
from __future__ import annotations

import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig

from rowsft.integrations.peft_plan import ALL_LINEAR, UNITS, record_plan
from rowsft.integrations.peft_tuner import PEFT_TYPE, register_with_peft
from rowsft.selection.choice import Selection


def _help(default, text: str, **kw):
    return field(default=default, metadata={"help": text}, **kw)


def _factory(factory, text: str, **kw):
    return field(default_factory=factory, metadata={"help": text}, **kw)


def _positive(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@dataclass
class RowSFTConfig(PeftConfig):
    """Configuration of a RowSFT adapter: train ``k`` rows (columns, single weights, neuron groups) per linear layer.

    Zero-initialised updates on the chosen units of every targeted ``nn.Linear`` / ``Conv1D``: rows
    ``delta (k, d_in)``, columns ``delta (d_out, k)``, elements ``values (k,)``; step 0 equals the base model.
    Build it with :meth:`from_selection` to place the units `rowsft.select` chose; without ``indices`` the top
    ``k`` of a data-free ``metric`` are chosen when the adapter is created (and recorded into the config).
    """

    target_modules: Optional[Union[list[str], str]] = _help(
        ALL_LINEAR, "Module names (or suffixes, or a regex) to adapt, as in LoraConfig; 'all-linear' (default) is "
                    "every nn.Linear / Conv1D except output heads (lm_head, classifier, score, pooler ...)")
    exclude_modules: Optional[Union[list[str], str]] = _help(None, "Module names (or a regex) not to adapt")
    unit: str = _help("row", "What a layer trains: 'row' (output neurons), 'column' (input neurons), 'element' "
                             "(single weights) or 'group' (coupled neurons: MLP neurons, attention heads)")
    k: int = _help(8, "Units per layer (rows, columns or elements; neurons/heads for 'group')")
    k_pattern: dict = _factory(dict, "Per-module k, {name or pattern: k}, like LoraConfig.rank_pattern; needed to "
                                     "reload adapters whose layers have different k")
    unit_pattern: dict = _factory(dict, "Per-module unit, {name or pattern: 'row' | 'column' | 'element'} (group "
                                        "and mixed selections record each module's unit here)")
    indices: Optional[dict] = _help(None, "Exact positions per module, {module name: [sorted indices]} (rows, columns, "
                                          "or flat r * d_in + c for elements); from_selection fills it", repr=False)
    metric: Optional[str] = _help("magnitude", "Importance metric: recorded for provenance; without indices, the "
                                               "data-free metric that chooses the units (magnitude, random, ...)")
    budget: Any = _help(None, "Budget the selection was made with (provenance); without indices, a rowsft.select "
                              "budget used instead of k (a count, a ratio, 'lora:8', 'params:100000')")
    seed: int = _help(0, "Seed of the 'random' metric")
    layers_to_transform: Optional[Union[list[int], int]] = _help(None, "Only adapt these layer (block) indices")
    layers_pattern: Optional[Union[list[str], str]] = _help(None, "Name of the layer list, used with "
                                                                  "layers_to_transform (e.g. 'layers', 'h')")
    modules_to_save: Optional[list[str]] = _help(None, "Modules trained whole and saved with the adapter (e.g. "
                                                       "'classifier', 'score')")
    delta_dtype: Optional[str] = _help(None, "dtype of the updates, e.g. 'float32' (default: the layer's; peft's "
                                             "autocast_adapter_dtype=True still upcasts float16/bfloat16 to float32)")
    rebuild_inputs: bool = _help(True, "Row and element updates rebuild their input in backward from what the frozen "
                                       "model keeps (norm outputs, MLP products) instead of keeping it, as rowsft.apply")
    keep_cast_weights: bool = _help(True, "Under autocast over weights in another dtype (bf16 over float32), cast "
                                          "each adapted base weight once and keep the copy across steps instead of "
                                          "casting it twice a step, as rowsft.apply (same bits; one bf16 copy per "
                                          "weight in memory)")
    train_in_cast: bool = _help(True, "Under autocast with kept casts, write each row update's rows W0[idx] + delta "
                                      "into the kept copy (the base weight untouched), so the frozen product computes "
                                      "the update, as rowsft.apply (about a third of the usual row update's extra "
                                      "time; the arithmetic of mixed-precision full fine-tuning); False: the usual "
                                      "row update")
    lend_rows: bool = _help(True, "Without autocast, over float32/float64 weights, lend each row update's rows "
                                  "W0[idx] + delta to the base weight for each frozen product and put the pretrained "
                                  "rows back right after it, so the frozen product computes the update, as "
                                  "rowsft.apply (the memory of the usual row update, the arithmetic of full "
                                  "fine-tuning); False: the usual row update")
    selection_meta: Optional[dict] = _help(None, "How the selection was made (rowsft.Selection.meta)", repr=False)

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if not _positive(self.k):
            raise ValueError(f"k must be a whole number >= 1 (units per layer), got {self.k!r}")
        self.k_pattern, self.unit_pattern = dict(self.k_pattern or {}), dict(self.unit_pattern or {})
        bad = {key: k for key, k in self.k_pattern.items() if not _positive(k)}
        if bad:
            raise ValueError(f"k_pattern values must be whole numbers >= 1, got {bad}")
        bad = {key: u for key, u in self.unit_pattern.items() if u not in UNITS[:3]}
        if bad:
            raise ValueError(f"unit_pattern values must be 'row', 'column' or 'element', got {bad}")
        if self.indices is not None:
            self.indices = {name: torch.as_tensor(idx).reshape(-1).tolist() for name, idx in self.indices.items()}
        if self.delta_dtype is not None and not isinstance(getattr(torch, str(self.delta_dtype), None), torch.dtype):
            raise ValueError(f"delta_dtype must name a torch dtype such as 'float32', got {self.delta_dtype!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Refuse, with the fix, an ``adapter_config.json`` that `rowsft.save_adapter` wrote (rowsft's own format)."""
        if "format_version" in kwargs and "layers" in kwargs:
            raise ValueError(f"this adapter_config.json was written by rowsft.save_adapter (rowsft's own format, "
                             f"format_version {kwargs['format_version']}), not by PeftModel.save_pretrained; load it "
                             f"with rowsft.load_adapter(model, path) or rowsft.integrations.RowSFTModel.from_pretrained")
        return super().check_kwargs(**kwargs)

    @classmethod
    def from_selection(cls, selection: Selection, **kwargs) -> "RowSFTConfig":
        """The config that places exactly ``selection``'s rows / columns / elements (its modules, positions, units
        and per-module k); ``metric`` and ``budget`` come from ``selection.meta``. ``kwargs``: other fields
        (``task_type``, ``modules_to_save``, ``delta_dtype``, ...)."""
        if not isinstance(selection, Selection):
            raise TypeError(f"from_selection takes a rowsft.Selection (from rowsft.select), got {type(selection).__name__}")
        fixed = {"target_modules", "indices", "k", "k_pattern", "unit_pattern"} & set(kwargs)
        if fixed:
            raise TypeError(f"from_selection sets {sorted(fixed)} from the selection; leave them out")
        selection.validate()
        meta = json.loads(json.dumps(selection.meta, default=str))          # JSON-ready provenance
        unit = "group" if meta.get("unit") == "group" else next(iter(selection.layers.values())).unit
        config = cls(unit=kwargs.pop("unit", unit), metric=kwargs.pop("metric", meta.get("metric")),
                     budget=kwargs.pop("budget", meta.get("budget")), selection_meta=meta, **kwargs)
        record_plan(config, selection)
        return config


register_with_peft(RowSFTConfig)

__all__ = ["RowSFTConfig"]
