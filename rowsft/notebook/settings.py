"""Notebook settings and FAST mode: one environment variable picks tiny or real settings.

``ROWSFT_FAST=1`` (or ``true``/``yes``/``on``) makes the tutorials and the dashboard use the random
tiny Llama and a handful of steps, so that every notebook runs in seconds under nbval/CI; unset,
they use the bundled SmolLM2-135M-Instruct on Rotten Tomatoes (as an LM task) with the main job's
settings (``rowsft`` on the command line), which show real learning in about three minutes on a 2-core
CPU: 80 steps of 8 reviews, 2 rows per layer chosen by Taylor importance, the rows' tuned learning rate. This is the only place that reads ``ROWSFT_FAST``; ``notebooks/_setup.py`` and the
dashboard both take their settings from :func:`settings`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

from rowsft.training.learning_rates import DEFAULT_LEARNING_RATES

FAST_ENV = "ROWSFT_FAST"
TRUE_WORDS = ("1", "true", "yes", "on")


def fast_mode() -> bool:
    """True when ``ROWSFT_FAST`` is "1", "true", "yes" or "on" (any case)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in TRUE_WORDS


def _help(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class NotebookSettings:
    """What a tutorial notebook or the dashboard runs with (see each field's ``metadata["help"]``)."""
    fast: bool = _help(False, "True when ROWSFT_FAST chose these settings")
    model: str = _help("smollm2-135m", "causal LM to fine-tune (name for rowsft.load_model)")
    classifier: str = _help("minilm-l6", "encoder + new classification head (tutorial 05's live comparison)")
    task: str = _help("rotten_tomatoes", "name for rowsft.load_dataset (the main job's task; boolq is the hard case)")
    max_train: int = _help(2000, "training rows kept")
    batch_size: int = _help(8, "examples per step")
    max_length: int = _help(96, "tokens per example")
    calibration_batches: int = _help(4, "batches used to score importance")
    steps: int = _help(80, "optimizer steps of a training run")
    lr: float = _help(DEFAULT_LEARNING_RATES["rowsft"], "peak learning rate of the row-sparse fine-tunes (the tuned default)")
    rows: int = _help(2, "rows per layer trained by default (the main job's budget)")
    show_rows: int = _help(64, "rows per layer in illustrations (heatmap marks, memory arithmetic): enough to see")
    lora_rank: int = _help(8, "LoRA rank compared against (and used for parity budgets)")
    eval_examples: int = _help(400, "validation examples for accuracy (the same first ones every time)")
    train_blocks: int | None = _help(None, "train only the last this many blocks (None: all, as the main job); see top_blocks")
    seed: int = _help(0, "seed of data splits, batch order and initialisation")

    def as_dict(self) -> dict:
        return asdict(self)

    def top_blocks(self, num_blocks: int) -> list[int] | None:
        """The block indices to train: the last ``train_blocks`` of ``num_blocks`` (None: all).

        The backward pass stops at the first block that trains, so training only the upper blocks of
        SmolLM2 roughly halves the time of a step on a CPU; the tutorials say so where they use it.
        """
        if not self.train_blocks or self.train_blocks >= num_blocks:
            return None
        return list(range(num_blocks - self.train_blocks, num_blocks))

    def summary(self) -> str:
        mode = "FAST (tiny model, few rows, few steps)" if self.fast else "default (bundled real models and data)"
        return "\n".join([f"mode: {mode}"] + [f"  {k:20s} {v}" for k, v in self.as_dict().items() if k != "fast"])

    def __repr__(self) -> str:
        return self.summary()


FULL_SETTINGS = NotebookSettings()
FAST_SETTINGS = replace(FULL_SETTINGS, fast=True, model="tiny-llama", classifier="tiny-bert", max_train=48,
                        batch_size=4, max_length=64, calibration_batches=2, steps=4, rows=2, show_rows=8, lora_rank=2, eval_examples=16,
                        train_blocks=None)


def settings(fast: bool | None = None, **overrides) -> NotebookSettings:
    """Settings for a notebook: :data:`FAST_SETTINGS` when ``fast`` (default: :func:`fast_mode`),
    else :data:`FULL_SETTINGS`; keyword ``overrides`` replace single fields."""
    base = FAST_SETTINGS if (fast_mode() if fast is None else fast) else FULL_SETTINGS
    unknown = set(overrides) - set(base.as_dict())
    if unknown:
        raise TypeError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(base.as_dict())}")
    return replace(base, **overrides)
