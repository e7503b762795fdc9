"""Shared setup of the rowsft tutorials: the knobs of FAST and default mode, plotting, answer checks.

Every notebook's first cell imports this module (before torch) and calls :func:`settings`, which takes
the knobs from :func:`rowsft.notebook.settings` (the one place that reads ``ROWSFT_FAST``)::

    import _setup
    S = _setup.settings()
    FAST = S.fast

Default mode runs the bundled real models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2) on real data
with budgets that finish in a few minutes on a 2-core laptop; FAST mode (``ROWSFT_FAST=1``, used by
the notebook tests) swaps in a 2-layer random Llama with the real SmolLM2 tokenizer, a few dozen
real rows and a handful of steps, so that every cell runs in seconds.
"""
from __future__ import annotations

import os
import random

# Before torch loads (import this module first): idle OpenMP threads sleep instead of spinning. On a small
# machine shared with other processes, spinning threads made every step many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rowsft.notebook.settings import NotebookSettings  # noqa: E402  (no torch behind it)
from rowsft.notebook.settings import settings as notebook_settings  # noqa: E402

def settings(fast: bool | None = None, **overrides) -> NotebookSettings:
    """The tutorial settings (`rowsft.notebook.settings`: FAST mode when ``fast``, default: ``ROWSFT_FAST``),
    then configures the session: seeds, CPU threads, quiet libraries and the plotly renderer."""
    chosen = notebook_settings(fast, **overrides)
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
    configure_figures()


def configure_figures(static: bool | None = None) -> str:
    """Plotly's renderer for the tutorials; returns the renderer string it set.

    Figures are saved as plotly JSON (the "application/vnd.plotly.v1+json" mimetype) that JupyterLab's
    bundled plotly extension renders offline; no copy of plotly.js is embedded in the notebook. Beside it,
    a PNG of the figure (kaleido driving the system Chromium, offline; about 20-150 kB a figure) shows
    where plotly's JavaScript does not run: ``jupyter nbconvert --to html``, GitHub, nbviewer. PNG rather
    than SVG: a heatmap or a 500-point curve is several times smaller as PNG. Without kaleido or
    Chromium (or with ``ROWSFT_STATIC_FIGURES=0``) figures stay interactive only, after a one-line warning.
    """
    import plotly.io as pio
    from rowsft.viz.export import static_renderer
    if static is None:
        static = os.environ.get("ROWSFT_STATIC_FIGURES", "1").strip().lower() not in ("0", "false", "no")
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        renderer = static_renderer("plotly_mimetype", fmt="png") if static else "plotly_mimetype"
    for w in caught:                                        # one plain line, not a warning block with a traceback
        print(str(w.message))
    pio.renderers.default = renderer
    return renderer


# ----------------------------------------------------------------------------------------------
# answer checks (notebook 06, and the exercises of the others)

def _is_blank(answer) -> bool:
    return answer is None or answer is Ellipsis


class Verdict:
    """What :func:`check` found: ``.right`` is True, False, or None (not answered). A check cell ends
    with the call, so the object shows nothing of its own (the printed line is the feedback)."""

    def __init__(self, right: bool | None):
        self.right = right

    def __bool__(self) -> bool:
        return bool(self.right)

    def _ipython_display_(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"Verdict(right={self.right})"


def check(question: str, answer, expected, rel_tol: float = 0.02, explanation: str = "",
          notes: dict | None = None) -> Verdict:
    """Compare a student's ``answer`` with ``expected`` and print right/wrong with an explanation.

    Numbers count as right within ``rel_tol`` (relative); anything else must be equal (text: ignoring
    case and surrounding spaces). ``answer`` left as ``None`` or ``...`` prints a reminder and returns
    ``Verdict(None)``. ``notes``: ``{wrong answer: hint}`` for tempting wrong answers, printed instead of the
    general hint when the student gives one of them.
    """
    if _is_blank(answer):
        print(f"{question}: not answered yet - replace the ... above with your answer and run this cell again.")
        return Verdict(None)
    for wrong, note in (notes or {}).items():
        if answer == wrong or str(answer).strip().lower() == str(wrong).strip().lower():
            print(f"{question}: not quite - you said {answer!r}. {note}")
            return Verdict(False)
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            value = float(answer)
        except (TypeError, ValueError):
            print(f"{question}: expected a number, got {answer!r}.")
            return Verdict(False)
        scale = max(abs(float(expected)), 1e-12)
        right = abs(value - float(expected)) <= rel_tol * scale
    else:
        right = answer == expected or str(answer).strip().lower() == str(expected).strip().lower()
    if right:
        print(f"{question}: RIGHT. {explanation}".rstrip())
    else:
        print(f"{question}: not quite - you said {answer!r}. Hint: {explanation}".rstrip())
    return Verdict(right)


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
