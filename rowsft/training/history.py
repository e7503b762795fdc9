"""`History`: what a `rowsft.train` run did, step by step, in a JSON-safe form.

One dict per optimizer step in ``steps`` (``step, loss, lr, elapsed, epoch`` and, when recorded,
``grad_norm`` and ``memory_*`` figures), one dict per evaluation in ``evals`` (``step`` and the
metrics of the evaluation function), and how the run ended (``stopped``, ``stop_reason``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from rowsft.io_utils import atomic_write_text


def json_safe(value: Any) -> Any:
    """``value`` with tensors, numpy scalars, tuples and non-finite floats turned into JSON types
    (NaN and ±inf become ``None``)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays / scalars
        return json_safe(value.tolist())
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)


@dataclass
class History:
    """The record of one training run.

    ``steps``: one dict per optimizer step; ``evals``: one dict per evaluation; ``stopped``: True
    when the run ended early on request (stop event, ``state.request_stop()``, Ctrl-C) or on a
    non-finite loss; ``stop_reason`` says which; ``wall_time``: seconds the run took; ``config``:
    the `TrainConfig` used, as a dict; ``meta``: free-form facts (trainable parameters, device...).
    """
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    stopped: bool = False
    stop_reason: str | None = None
    wall_time: float = 0.0
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def losses(self) -> list[float]:
        """The training loss of every step, in order."""
        return [s["loss"] for s in self.steps]

    @property
    def lrs(self) -> list[float]:
        return [s["lr"] for s in self.steps]

    @property
    def last_step(self) -> int:
        """The number of the last completed step (0 when none ran)."""
        return self.steps[-1]["step"] if self.steps else 0

    @property
    def final_loss(self) -> float | None:
        return self.steps[-1]["loss"] if self.steps else None

    def metric(self, name: str) -> list[tuple[int, Any]]:
        """``[(step, value), ...]`` of one evaluation metric."""
        return [(e["step"], e[name]) for e in self.evals if name in e]

    def __len__(self) -> int:
        return len(self.steps)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """A JSON-safe dict (NaN losses become ``None``)."""
        return json_safe({"steps": self.steps, "evals": self.evals, "stopped": self.stopped,
                          "stop_reason": self.stop_reason, "wall_time": self.wall_time,
                          "config": self.config, "meta": self.meta})

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(steps=list(d.get("steps", [])), evals=list(d.get("evals", [])), stopped=bool(d.get("stopped", False)),
                   stop_reason=d.get("stop_reason"), wall_time=float(d.get("wall_time", 0.0)),
                   config=dict(d.get("config", {})), meta=dict(d.get("meta", {})))

    def save(self, path) -> None:
        """Write the history as JSON (atomically)."""
        atomic_write_text(path, self.to_json(indent=1))

    @classmethod
    def load(cls, path) -> "History":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dataframe(self):
        """The steps as a pandas DataFrame (one row per step)."""
        import pandas as pd
        return pd.DataFrame(self.steps)

    def __repr__(self) -> str:
        end = f", stopped ({self.stop_reason})" if self.stopped else ""
        loss = f", final loss {self.final_loss:.4g}" if self.steps and self.final_loss is not None else ""
        return f"<History {len(self.steps)} steps, {len(self.evals)} evals{loss}, {self.wall_time:.1f} s{end}>"
