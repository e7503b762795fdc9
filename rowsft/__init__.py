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

from ._lazy import lazy_exports

__version__ = "0.1.0"

_VERBS = {
    # zoo
    "load_model": "zoo", "load_dataset": "zoo", "batches": "zoo", "tiny_model": "zoo",
    # scoring / selection
    "score": "scoring", "Scores": "scoring",
    "select": "selection", "lora_parity": "selection", "TotalParams": "selection", "ScoreConfig": "scoring", "Selection": "selection_types",
    # engine
    "apply": "tuner", "merge": "tuner", "unmerge": "tuner", "unload": "tuner", "merge_and_unload": "tuner",
    "save_adapter": "tuner", "load_adapter": "tuner", "trainable_parameters": "tuner",
    "print_trainable_parameters": "tuner", "sparse_layers": "tuner", "current_selection": "tuner",
    "train": "training", "evaluate": "evaluation", "History": "training", "TrainConfig": "training",
    "DynamicMask": "dynamic", "Callback": "training", "TrainState": "training", "MemoryReport": "memory", "full_finetune": "baselines",
}
_SUBMODULES = ("targets", "scoring", "selection", "layers", "tuner", "training", "memory", "baselines", "zoo",
               "distributed", "integrations", "pipeline", "evaluation", "viz", "notebook", "dynamic", "lean_loss")

__all__ = sorted(_VERBS) + list(_SUBMODULES)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _VERBS, _SUBMODULES)
