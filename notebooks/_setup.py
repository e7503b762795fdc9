"""Shared setup of the rowsft tutorials: the knobs of FAST and default mode, plotting, answer checks.

Every notebook's first cell reads ``ROWSFT_FAST`` itself, imports this module (before torch) and calls
:func:`settings`::

    FAST = os.environ.get("ROWSFT_FAST", "").strip().lower() in ("1", "true", "yes", "on")
    import _setup
    S = _setup.settings(FAST)

Default mode runs the bundled real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) on real data
with budgets that finish in a few minutes on a 2-core laptop; FAST mode (``ROWSFT_FAST=1``, used by
the notebook tests) swaps in a 2-layer random Llama with the real SmolLM2 tokenizer, a few dozen
real rows and a handful of steps, so that every cell runs in seconds.
"""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass, replace

# Before torch loads (import this module first): idle OpenMP threads sleep instead of spinning. On a small
# machine shared with other processes, spinning threads made every step many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FAST_VALUES = ("1", "true", "yes", "on")


def fast_from_env() -> bool:
    """True when the environment variable ``ROWSFT_FAST`` asks for FAST mode."""
    return os.environ.get("ROWSFT_FAST", "0").strip().lower() in FAST_VALUES


@dataclass(frozen=True)
class Settings:
    """The knobs the tutorials share; one instance for FAST mode, one for default mode."""
    fast: bool
    model: str               # causal LM the tutorials fine-tune
    classifier: str          # encoder + new classification head (notebook 05's live comparison)
    task: str                # dataset name for rowsft.load_dataset
    max_train: int           # training rows kept
    batch_size: int          # examples per step
    max_length: int          # tokens per example
    calibration_batches: int  # batches used to score importance
    steps: int               # optimizer steps of a fine-tune
    lr: float                # peak learning rate of the row-sparse fine-tunes
    budget: int              # rows per layer
    lora_rank: int           # LoRA rank used for the parity budget
    eval_examples: int       # validation examples for accuracy
    train_blocks: int | None = None  # train only the last this many blocks (None: all); see top_blocks
    seed: int = 0

    def top_blocks(self, num_blocks: int) -> list[int] | None:
        """The block indices the tutorials train: the last ``train_blocks`` of ``num_blocks`` (None: all).

        The backward pass stops at the first block that trains, so training only the upper blocks of
        SmolLM2 roughly halves the time of a step on a CPU; the tutorials say so where they use it.
        """
        if not self.train_blocks or self.train_blocks >= num_blocks:
            return None
        return list(range(num_blocks - self.train_blocks, num_blocks))

    def summary(self) -> str:
        mode = "FAST (tiny model, few rows, few steps)" if self.fast else "default (bundled real models and data)"
        lines = [f"mode: {mode}"] + [f"  {k:20s} {v}" for k, v in asdict(self).items() if k != "fast"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


DEFAULT = Settings(fast=False, model="smollm2-135m", classifier="minilm-l6", task="boolq", max_train=2000,
                   batch_size=4, max_length=128, calibration_batches=4, steps=40, lr=5e-4, budget=64,
                   lora_rank=8, eval_examples=200, train_blocks=10)
FAST = replace(DEFAULT, fast=True, model="tiny-llama", classifier="tiny-bert", max_train=48, max_length=64,
               calibration_batches=2, steps=4, budget=8, lora_rank=2, eval_examples=16, train_blocks=None)


def settings(fast: bool | None = None, **overrides) -> Settings:
    """The tutorial settings for FAST or default mode (``fast=None`` reads ``ROWSFT_FAST``), then
    configures the session: seeds, CPU threads, quiet libraries and the plotly renderer."""
    fast = fast_from_env() if fast is None else bool(fast)
    chosen = replace(FAST if fast else DEFAULT, **overrides)
    configure(seed=chosen.seed)
    return chosen


def configure(seed: int = 0) -> None:
    """Seeds, at most 2 CPU threads, no hub access, quiet transformers, plotly figures as JupyterLab mimetype."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import numpy as np
    import torch
    warnings.filterwarnings("ignore", category=FutureWarning)       # library deprecation notices
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    # Figures are saved as plotly JSON (the "application/vnd.plotly.v1+json" mimetype) that JupyterLab's
    # bundled plotly extension renders offline; no copy of plotly.js is embedded in the notebook.
    import plotly.io as pio
    pio.renderers.default = "plotly_mimetype"


# ----------------------------------------------------------------------------------------------
# answer checks (notebook 06, and the exercises of the others)

def _is_blank(answer) -> bool:
    return answer is None or answer is Ellipsis


def check(question: str, answer, expected, rel_tol: float = 0.02, explanation: str = "") -> bool | None:
    """Compare a student's ``answer`` with ``expected`` and print right/wrong with an explanation.

    Numbers count as right within ``rel_tol`` (relative); anything else must be equal. ``answer``
    left as ``None`` or ``...`` prints a reminder and returns ``None``.
    """
    if _is_blank(answer):
        print(f"{question}: not answered yet - replace the ... above with your answer and run this cell again.")
        return None
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            value = float(answer)
        except (TypeError, ValueError):
            print(f"{question}: expected a number, got {answer!r}.")
            return False
        scale = max(abs(float(expected)), 1e-12)
        right = abs(value - float(expected)) <= rel_tol * scale
    else:
        right = answer == expected or str(answer).strip().lower() == str(expected).strip().lower()
    if right:
        print(f"{question}: RIGHT. {explanation}".rstrip())
    else:
        print(f"{question}: not quite - you said {answer!r}. Hint: {explanation}".rstrip())
    return right


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ----------------------------------------------------------------------------------------------
# quiet native output

class quiet_native_stderr:
    """Context manager: silence what C/C++ code writes to file descriptor 2 (e.g. the
    ``USDT: ... profiler_start`` lines of PyTorch's profiler, used by ``measure_peak`` on CPU).

    Python exceptions and warnings are unaffected: they are reported through ``sys.stderr``'s
    Python object, not by writing to the descriptor directly.
    """

    def __enter__(self):
        import sys
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except OSError:  # no real descriptor 2 (unusual frontends): nothing to silence
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        return False
