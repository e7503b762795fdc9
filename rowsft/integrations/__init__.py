"""rowsft in the Hugging Face ecosystem: peft, ``transformers.Trainer`` and TRL.

- :class:`RowSFTConfig` (``rowsft.integrations.peft_config``): rowsft as a peft method,
  ``peft.get_peft_model(model, RowSFTConfig.from_selection(selection))`` → a ``peft.PeftModel`` (several
  adapters, ``save_pretrained`` / ``PeftModel.from_pretrained``, ``merge_and_unload``, Trainer and TRL's
  ``SFTTrainer(peft_config=...)``); the tuner and its layer live in ``peft_tuner``, ``peft_layer``, ``peft_plan``.
- :func:`get_rowsft_model` (``peft_method``): score on calibration batches, select, then ``get_peft_model``.
- :func:`save_as_lora` (``lora_export``): rows, columns and groups written as an exact peft LoRA adapter.
- :class:`RowSFTModel` (``rowsft_model``): peft's calls on a model built with ``rowsft.apply`` and rowsft's own
  adapter folders (``rowsft.save_adapter``); no peft needed.
- :class:`RowSFTTrainerCallback` (``hf_trainer``): rowsft callbacks listen to a ``Trainer`` run of a
  ``rowsft.apply`` model; Trainer checkpoints carry the adapter.

Multi-process training (DDP, ``accelerate launch``) lives in :mod:`rowsft.distributed`.
Names are imported lazily, so ``import rowsft.integrations`` imports neither peft nor transformers' Trainer;
the first use of a peft name registers RowSFT with peft (see ``peft_config``).
"""
from __future__ import annotations

from rowsft._lazy import lazy_exports

_NAMES = {
    "RowSFTTrainerCallback": "hf_trainer", "save_adapter_into": "hf_trainer",
    "trainer_checkpoint_adapter": "hf_trainer",
    "RowSFTConfig": "peft_config", "get_rowsft_model": "peft_method", "RowSFTModel": "rowsft_model",
    "RowSFTTuner": "peft_tuner", "RowSFTLayer": "peft_layer", "save_as_lora": "lora_export",
}

__all__ = sorted(_NAMES)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _NAMES)
