"""rowsft: row-based sparse fine-tuning (and SPEFT element masks) for transformer models.

The verbs, in the order a fine-tune uses them::

    model, tokenizer = rowsft.load_model("smollm2-135m")
    data = rowsft.load_dataset("boolq")
    batches = rowsft.batches(data["train"], tokenizer, batch_size=8, max_length=256)
    scores = rowsft.score(model, batches, metric="taylor", unit="row")
    selection = rowsft.select(scores, budget=64)
    rowsft.apply(model, selection)
    history = rowsft.train(model, batches, steps=200, lr=1e-4)
    rowsft.merge(model)

Submodules are imported lazily so that ``import rowsft`` stays fast.
"""
from __future__ import annotations

import logging

from rowsft._lazy import lazy_exports

__version__ = "0.1.0"


class _HubKernelNote(logging.Filter):
    """Drops bitsandbytes' import-time note that an optional CPU kernel could not be fetched from the model hub
    (it then uses its own CPU code): offline, every import would print it, whoever imports bitsandbytes first
    (rowsft.load_model, or peft)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelNote())

# public name -> the module that defines it (imported on first use)
_VERBS = {
    # data
    "load_model": "data.models", "tiny_model": "data.models", "load_dataset": "data.tasks",
    "batches": "data.batching",
    # scoring
    "score": "scoring.scorer", "ScoreConfig": "scoring.scorer", "Scores": "scoring.scores",
    # selection
    "select": "selection.strategies", "lora_parity": "selection.budgets", "TotalParams": "selection.budgets",
    "Selection": "selection.choice",
    # layers
    "apply": "layers.tuner", "merge": "layers.tuner", "unmerge": "layers.tuner", "unload": "layers.tuner",
    "merge_and_unload": "layers.tuner", "dequantize_and_merge": "layers.tuner", "trainable_parameters": "layers.tuner",
    "print_trainable_parameters": "layers.tuner", "sparse_layers": "layers.tuner",
    "current_selection": "layers.tuner", "save_adapter": "layers.adapters", "load_adapter": "layers.adapters",
    # training
    "train": "training.loop", "TrainState": "training.loop", "TrainConfig": "training.config",
    "History": "training.history", "Callback": "training.callbacks", "DynamicMask": "training.dynamic",
    "lr_range_test": "training.lr_range", "default_learning_rate": "training.learning_rates",
    # peft (importing either registers rowsft with peft: rowsft.integrations.peft_config)
    "RowSFTConfig": "integrations.peft_config", "save_as_lora": "integrations.lora_export",
    # memory, evaluation, baselines
    "MemoryReport": "memory.report", "evaluate": "evaluation.choices", "full_finetune": "baselines",
    # exploration
    "explore_budgets": "explore.budgets", "ExploreConfig": "explore.budgets",
}
_SUBMODULES = ("targets", "data", "scoring", "selection", "layers", "training", "memory", "evaluation", "baselines",
               "lean_loss", "distributed", "integrations", "cli", "explore", "viz", "notebook")

__all__ = sorted(_VERBS) + list(_SUBMODULES)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _VERBS, _SUBMODULES)
