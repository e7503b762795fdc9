"""rowsft in the Hugging Face ecosystem: ``transformers.Trainer`` and PEFT-style calls.

- :class:`RowSFTTrainerCallback` (``rowsft.integrations.hf_trainer``): rowsft callbacks listen to a
  ``Trainer`` run; Trainer checkpoints carry the adapter.
- :class:`RowSFTConfig`, :func:`get_rowsft_model`, :class:`RowSFTModel` (``rowsft.integrations.peft_method``):
  ``print_trainable_parameters``, ``save_pretrained`` / ``from_pretrained``, ``merge_and_unload``.

Multi-process training (DDP, ``accelerate launch``) lives in :mod:`rowsft.distributed`.
Names are imported lazily, so ``import rowsft.integrations`` does not import transformers' Trainer.
"""
from __future__ import annotations

from rowsft._lazy import lazy_exports

_NAMES = {
    "RowSFTTrainerCallback": "hf_trainer", "save_adapter_into": "hf_trainer",
    "trainer_checkpoint_adapter": "hf_trainer",
    "RowSFTConfig": "peft_method", "RowSFTModel": "peft_method", "get_rowsft_model": "peft_method",
}

__all__ = sorted(_NAMES)

__getattr__, __dir__ = lazy_exports(__name__, globals(), _NAMES)
