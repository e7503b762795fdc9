"""FAST mode for the tutorial notebooks: one environment variable picks tiny or real settings.

``ROWSFT_FAST=1`` (or ``true``/``yes``/``on``) makes every notebook use the random tiny Llama and a
handful of steps, so that the whole set runs in seconds under nbval/CI; unset, notebooks use the
bundled SmolLM2-135M-Instruct with settings that show real learning.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

FAST_ENV = "ROWSFT_FAST"
TRUE_WORDS = ("1", "true", "yes", "on")


def fast_mode() -> bool:
    """True when ``ROWSFT_FAST`` is "1", "true", "yes" or "on" (any case)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in TRUE_WORDS


@dataclass(frozen=True)
class NotebookSettings:
    """What a tutorial notebook runs with."""
    model: str = field(default="smollm2-135m", metadata={"help": "name for rowsft.load_model"})
    task: str = field(default="boolq", metadata={"help": "name for rowsft.load_dataset"})
    steps: int = field(default=60, metadata={"help": "optimizer steps of a training run"})
    rows: int = field(default=64, metadata={"help": "rows per layer (default budget)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank compared against"})
    batch_size: int = field(default=4, metadata={"help": "examples per step"})
    max_length: int = field(default=256, metadata={"help": "tokens per example"})
    calibration_batches: int = field(default=4, metadata={"help": "batches used to score importance"})
    eval_examples: int | None = field(default=200, metadata={"help": "validation examples for accuracy"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    fast: bool = field(default=False, metadata={"help": "True when ROWSFT_FAST chose these settings"})

    def as_dict(self) -> dict:
        return asdict(self)


FAST_SETTINGS = NotebookSettings(model="tiny-llama", steps=5, rows=8, lora_rank=2, batch_size=2, max_length=64,
                                 calibration_batches=2, eval_examples=16, lr=1e-3, fast=True)
FULL_SETTINGS = NotebookSettings()


def settings(fast: bool | None = None, **overrides) -> NotebookSettings:
    """Settings for a notebook: :data:`FAST_SETTINGS` when ``fast`` (default: :func:`fast_mode`),
    else :data:`FULL_SETTINGS`; keyword ``overrides`` replace single fields."""
    base = FAST_SETTINGS if (fast_mode() if fast is None else fast) else FULL_SETTINGS
    unknown = set(overrides) - set(base.as_dict())
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(base.as_dict())}")
    return NotebookSettings(**{**base.as_dict(), **overrides})
