"""The `Selection` value: which rows, columns or single weights of which layers are trained.

It is the contract between selection (which builds it), the tuner (which applies it), memory
accounting (which prices it) and adapters (which serialise it). Kept free of any policy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch

from rowsft.io_utils import atomic_write_text

UNITS = ("row", "column", "element")


@dataclass
class LayerChoice:
    """What is trained in one linear layer.

    ``indices``: sorted, unique int64 tensor. For ``row`` they index output neurons (rows of the
    ``(d_out, d_in)`` weight), for ``column`` input neurons, for ``element`` flat positions
    ``r * d_in + c`` in the ``(d_out, d_in)`` weight.
    """
    unit: str
    indices: torch.Tensor
    shape: tuple[int, int]   # (d_out, d_in) of the layer

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        self.indices = torch.as_tensor(self.indices, dtype=torch.long).reshape(-1).cpu()
        self.shape = (int(self.shape[0]), int(self.shape[1]))

    @property
    def k(self) -> int:
        return int(self.indices.numel())

    @property
    def limit(self) -> int:
        """How many rows / columns / elements the layer has."""
        d_out, d_in = self.shape
        return {"row": d_out, "column": d_in, "element": d_out * d_in}[self.unit]

    @property
    def trainable_parameters(self) -> int:
        d_out, d_in = self.shape
        return self.k * {"row": d_in, "column": d_out, "element": 1}[self.unit]

    def validate(self, name: str = "layer") -> None:
        """Raise a clear error for out-of-range, duplicated or empty indices."""
        idx = self.indices
        if idx.numel() == 0:
            raise ValueError(f"{name}: the selection is empty; drop the layer or give it at least one {self.unit}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.limit:
            raise IndexError(f"{name}: {self.unit} indices must lie in [0, {self.limit}) for a layer of shape "
                             f"{self.shape} (d_out, d_in); got min {lo}, max {hi}")
        if torch.unique(idx).numel() != idx.numel():
            raise ValueError(f"{name}: duplicated {self.unit} indices; each {self.unit} may be chosen once")


@dataclass
class Selection(Mapping[str, torch.Tensor]):
    """Module name → trained indices, with the unit and shape of each layer.

    Behaves as a read-only mapping from module names to index tensors (``selection[name]``), and
    knows its trainable-parameter count. ``meta`` carries how it was made (metric, budget, ...).
    """
    layers: dict[str, LayerChoice] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # mapping protocol: name -> indices
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.layers[name].indices

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def unit(self, name: str) -> str:
        return self.layers[name].unit

    @property
    def trainable_parameters(self) -> int:
        return sum(c.trainable_parameters for c in self.layers.values())

    def validate(self) -> "Selection":
        if not self.layers:
            raise ValueError("the selection names no layer; pick at least one layer and a budget above zero")
        for name, choice in self.layers.items():
            choice.validate(name)
        return self

    def jaccard(self, other: "Selection") -> dict[str, float]:
        """Per-layer Jaccard overlap of the chosen indices (layers of both selections)."""
        out = {}
        for name in self.layers.keys() & other.layers.keys():
            a, b = set(self[name].tolist()), set(other[name].tolist())
            out[name] = len(a & b) / max(1, len(a | b))
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {"layers": {n: {"unit": c.unit, "shape": list(c.shape), "indices": c.indices.tolist()}
                           for n, c in self.layers.items()}, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        layers = {n: LayerChoice(v["unit"], torch.tensor(v["indices"], dtype=torch.long), tuple(v["shape"]))
                  for n, v in d["layers"].items()}
        return cls(layers, dict(d.get("meta", {})))

    def save(self, path: str) -> None:
        atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str) -> "Selection":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def summary(self) -> str:
        units = sorted({c.unit for c in self.layers.values()})
        return (f"Selection of {len(self)} layers ({'/'.join(units)}), "
                f"{self.trainable_parameters:,} trainable parameters")

    def __repr__(self) -> str:
        return f"<{self.summary()}>"
