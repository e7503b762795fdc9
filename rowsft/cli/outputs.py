"""Where a job's results go: the output folder checked before any work, and written without losing files.

A rowsft adapter goes through :func:`rowsft.layers.adapters.save_adapter`; a peft adapter (LoRA,
DoRA) or a whole model (full fine-tuning, ``rowsft merge``) is written here the same way: staged
beside the folder, then only its own files moved in, the config last; the user's other files stay.
A non-empty folder that holds no such save is refused unless ``overwrite`` is given, and a file is
always refused, both before the model is even loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from rowsft.io_utils import atomic_files_into, check_output_folder, resolved
from rowsft.layers import adapters
from rowsft.layers.adapter_checks import PEFT_TYPE

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


# weight files of a transformers model folder: a new save replaces them as a whole (no stale shard is kept)
_WEIGHTS_FILE = r"(?:model|pytorch_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)|(?:model\.safetensors|pytorch_model\.bin)\.index\.json"


def check_model_folder(out, overwrite: bool) -> bool:
    """Refuse a file, and without ``overwrite`` a non-empty folder that is no model folder (no
    config.json); returns whether ``out`` already is a model folder."""
    target = check_output_folder(out, "model folder", lambda folder, _: (folder / "config.json").is_file(),
                                 "no model (config.json)", "the model files", overwrite)
    return (target / "config.json").is_file()


def save_model_folder(model, tokenizer, out, overwrite: bool = False) -> None:
    """Write the model (and tokenizer) into ``out``, replacing only a model folder's own files, config.json
    last; old weight shards a previous model save left there (and this one did not write) are removed."""
    was_model = check_model_folder(out, overwrite)
    weights = re.compile(_WEIGHTS_FILE)
    stale = (lambda name: weights.fullmatch(name) is not None) if was_model else None
    with atomic_files_into(out, last=["config.json"], stale=stale) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def check_peft_folder(out, overwrite: bool) -> Path:
    """Refuse a file, and without ``overwrite`` a non-empty folder holding no peft adapter (a rowsft
    adapter is not replaced by a peft one either)."""
    kind = peft_type_of(resolved(out))
    return check_output_folder(out, "adapter folder", lambda folder, _: kind not in (None, PEFT_TYPE),
                               "a rowsft adapter" if kind == PEFT_TYPE else "no peft adapter", "the adapter files",
                               overwrite)


def peft_type_of(folder: Path) -> str | None:
    """The ``peft_type`` of ``folder/adapter_config.json`` (None: no readable adapter config there)."""
    try:
        config = json.loads((folder / PEFT_FILES[0]).read_text())
    except (OSError, ValueError):
        return None
    return config.get("peft_type") if isinstance(config, dict) else None


def save_peft_folder(model, out, overwrite: bool = False) -> None:
    """A peft model's adapter written into ``out``: only the adapter files (a README.md already there is kept)."""
    target = check_peft_folder(out, overwrite)
    keep_readme = (target / "README.md").exists()
    with atomic_files_into(target, last=[PEFT_FILES[0]]) as tmp:
        model.save_pretrained(tmp)
        if keep_readme and (tmp / "README.md").exists():
            (tmp / "README.md").unlink()


def check_job_output(method: str, out, overwrite: bool) -> None:
    """The job's ``out`` checked before anything is loaded (see :func:`save_job_output`)."""
    if out is None:
        return
    if method in ("rowsft", "column", "element"):
        adapters.check_save_target(out, overwrite)
    elif method == "full":
        check_model_folder(out, overwrite)
    else:
        check_peft_folder(out, overwrite)


def save_job_output(method: str, model, tokenizer, out, overwrite: bool) -> None:
    """Save what a job of ``method`` trained: a rowsft adapter, a peft adapter or the whole model."""
    if method in ("rowsft", "column", "element"):
        adapters.save_adapter(model, out, overwrite=overwrite)
    elif method == "full":
        save_model_folder(model, tokenizer, out, overwrite=overwrite)
    else:
        save_peft_folder(model, out, overwrite=overwrite)
