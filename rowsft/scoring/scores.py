"""The `Scores` value: one importance score per row, column, coupled neuron group or single weight.

`Scores` maps a module name (or, for the ``group`` unit, a neuron-group name) to a float32 CPU tensor:
``row`` → ``(d_out,)``, ``column`` → ``(d_in,)``, ``element`` → ``(d_out, d_in)``, ``group`` →
``(group.size,)``. The stored values are normalised per layer (``normalize``: ``"mean"``, ``"max"``,
``"sum"`` or ``"none"``) so that layers can be compared on one scale; ``scales[name]`` is the divisor
that was applied, so ``raw(name)`` gives back the metric's own values.

It converts to tidy tables (one row per neuron, for heatmaps), compares with other scores (Spearman
rank correlation, top-k overlap) and saves to a folder holding ``scores.safetensors`` and
``scores.json``. Saving writes only those two files into the folder (other files there are kept),
each moved in whole with one ``os.replace``, the tensors first and ``scores.json`` last; the tensors
file embeds the same JSON (safetensors metadata ``rowsft_scores``), which loading trusts, so a save
killed at any instant leaves the earlier scores or the new ones loadable, never a mix.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rowsft.io_utils import atomic_files_into, check_output_folder
from rowsft.scoring.agreement import spearman, top_count, topk_overlap
from rowsft.targets import GroupMember, NeuronGroup, layer_index, module_type

NORMALIZATIONS = ("mean", "max", "sum", "none")
SCORE_UNITS = ("row", "column", "element", "group")
_TENSORS_FILE, _META_FILE = "scores.safetensors", "scores.json"
_EMBEDDED_KEY = "rowsft_scores"
_FORMAT = "rowsft.scores/1"


def normalization_scale(values: torch.Tensor, how: str) -> float:
    """The divisor of one layer's scores: mean / max / sum of ``|values|`` (1 for ``none`` or an all-zero layer).

    Absolute values keep the ordering of signed metrics (GraSP) and change nothing for the others.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalize={how!r} is not known; choose one of {NORMALIZATIONS}")
    if how == "none" or values.numel() == 0:
        return 1.0
    a = values.detach().abs()
    if how == "max":
        scale = float(a.max())
    else:
        scale = float(a.mean(dtype=torch.float64) if how == "mean" else a.sum(dtype=torch.float64))
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise a ValueError naming the layer when its scores hold NaN or infinite values."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise ValueError(f"scores of {name} contain {int(bad.sum())} NaN or infinite values (of {values.numel()}): "
                         "the model produced non-finite losses, gradients or activations on the calibration "
                         "batches; check the batches (labels, lengths), score in float32, or use fewer/shorter "
                         "batches")


class Scores(Mapping[str, torch.Tensor]):
    """Importance scores by layer (module name, or group name for the ``group`` unit).

    ``metric`` and ``unit`` say what was measured; ``shapes`` maps every module involved to its
    ``(d_out, d_in)``; ``groups`` maps group names to their :class:`~rowsft.targets.NeuronGroup`
    (``group`` unit only); ``meta`` records how the scores were made (batches, seed, options).
    """

    def __init__(self, values: Mapping[str, torch.Tensor], metric: str, unit: str, normalize: str = "none",
                 shapes: Mapping[str, tuple[int, int]] | None = None,
                 groups: Mapping[str, NeuronGroup] | None = None,
                 scales: Mapping[str, float] | None = None, meta: dict | None = None,
                 dtype: torch.dtype = torch.float32):
        if unit not in SCORE_UNITS:
            raise ValueError(f"unit must be one of {SCORE_UNITS}, got {unit!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r} is not known; choose one of {NORMALIZATIONS}")
        self.dtype = dtype  # float32 by contract; float64 on request (exactness checks)
        self._values = {n: torch.as_tensor(v).detach().to("cpu", dtype) for n, v in values.items()}
        self.metric, self.unit, self.normalize = metric, unit, normalize
        self.shapes = {n: (int(s[0]), int(s[1])) for n, s in (shapes or {}).items()}
        self.groups = dict(groups or {})
        self.scales = {n: float((scales or {}).get(n, 1.0)) for n in self._values}
        self.meta = dict(meta or {})
        for name, v in self._values.items():
            expected = self.expected_shape(name)
            if expected is not None and tuple(v.shape) != expected:
                raise ValueError(f"scores of {name} have shape {tuple(v.shape)}; a {unit} score there needs {expected}")

    # ------------------------------------------------------------ mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._values[name]
        except KeyError:
            raise KeyError(f"no scores for {name!r}; scored layers: {list(self._values)[:8]}"
                           f"{' ...' if len(self._values) > 8 else ''}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return (f"<Scores metric={self.metric!r} unit={self.unit!r} normalize={self.normalize!r}, "
                f"{len(self)} layers, {sum(v.numel() for v in self._values.values()):,} scores>")

    # ------------------------------------------------------------ facts
    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """The score shape a layer must have for this unit (None when its shape is unknown)."""
        if self.unit == "group":
            return (self.groups[name].size,) if name in self.groups else None
        if name not in self.shapes:
            return None
        d_out, d_in = self.shapes[name]
        return {"row": (d_out,), "column": (d_in,), "element": (d_out, d_in)}[self.unit]

    def raw(self, name: str) -> torch.Tensor:
        """The metric's own values for ``name`` (before per-layer normalisation)."""
        return self[name] * self.scales[name]

    def renormalize(self, normalize: str) -> "Scores":
        """The same scores normalised another way (from the raw values)."""
        values, scales = {}, {}
        for name in self:
            raw = self.raw(name)
            scales[name] = normalization_scale(raw, normalize)
            values[name] = raw / scales[name]
        return Scores(values, self.metric, self.unit, normalize, self.shapes, self.groups, scales, self.meta,
                      self.dtype)

    def subset(self, names) -> "Scores":
        """Scores of the given layers only (in the given order)."""
        names = list(names)
        return Scores({n: self[n] for n in names}, self.metric, self.unit, self.normalize, self.shapes,
                      {n: self.groups[n] for n in names if n in self.groups},
                      {n: self.scales[n] for n in names}, self.meta, self.dtype)

    def layer_type(self, name: str) -> str:
        """``module_type`` of a module, or the kind (``mlp`` / ``attention``) of a group."""
        return self.groups[name].kind if name in self.groups else module_type(name)

    # ------------------------------------------------------------ tables
    def tidy(self):
        """pandas DataFrame, one row per scored unit: ``layer, module_type, layer_index, neuron, score``.

        ``neuron`` is the row, column or group-neuron index; for the ``element`` unit the flat index
        ``r * d_in + c``.
        """
        import numpy as np
        import pandas as pd
        names = list(self._values)
        sizes = np.array([v.numel() for v in self._values.values()], dtype=np.int64)
        per_layer = lambda values: np.repeat(np.asarray(values), sizes)  # noqa: E731  one value per layer -> per unit
        types = [self.layer_type(n) for n in names]
        type_names = list(dict.fromkeys(types))
        blocks = [layer_index(n + ".") for n in names]
        return pd.DataFrame({
            "layer": pd.Categorical.from_codes(per_layer(np.arange(len(names), dtype=np.int64)), categories=names),
            "module_type": pd.Categorical.from_codes(per_layer(np.array([type_names.index(t) for t in types],
                                                                        dtype=np.int64)), categories=type_names),
            "layer_index": pd.arrays.IntegerArray(per_layer(np.array([b or 0 for b in blocks], dtype=np.int64)),
                                                  per_layer(np.array([b is None for b in blocks], dtype=bool))),
            "neuron": np.concatenate([np.arange(n, dtype=np.int64) for n in sizes] or [np.zeros(0, np.int64)]),
            "score": np.concatenate([v.reshape(-1).numpy() for v in self._values.values()] or [np.zeros(0)]),
        })

    def summary(self):
        """pandas DataFrame, one row per layer: ``layer, module_type, layer_index, mean, std, max, min``."""
        import pandas as pd
        rows = []
        for name, v in self._values.items():
            v64 = v.double().reshape(-1)
            rows.append({"layer": name, "module_type": self.layer_type(name), "layer_index": layer_index(name + "."),
                         "mean": float(v64.mean()), "std": float(v64.std()) if v64.numel() > 1 else 0.0,
                         "max": float(v64.max()), "min": float(v64.min())})
        frame = pd.DataFrame(rows, columns=["layer", "module_type", "layer_index", "mean", "std", "max", "min"])
        frame["layer_index"] = frame["layer_index"].astype("Int64")
        return frame

    # ------------------------------------------------------------ comparisons
    def _common(self, other: "Scores") -> list[str]:
        common = [n for n in self if n in other and self[n].shape == other[n].shape]
        if not common:
            raise ValueError(f"these scores ({self.unit}, {len(self)} layers) and the other ones ({other.unit}, "
                             f"{len(other)} layers) share no layer of the same shape; compare scores of the same "
                             "unit on the same model and targets")
        return common

    def rank_correlation(self, other: "Scores") -> dict[str, float]:
        """Spearman rank correlation per shared layer (NaN where one side is constant)."""
        return {n: spearman(self[n], other[n]) for n in self._common(other)}

    def topk_overlap(self, other: "Scores", k: int | float) -> dict[str, float]:
        """Per shared layer, the fraction of this layer's top-``k`` that is also in the other's top-``k``.

        ``k``: a count (capped at the layer size) or a ratio in (0, 1] of each layer.
        """
        top_count(k, 1)                                          # refuse a bad k before any work
        return {n: topk_overlap(self[n], other[n], k) for n in self._common(other)}

    # ------------------------------------------------------------ files
    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write ``scores.safetensors`` (the tensors, with the rest embedded) and ``scores.json`` (the rest)
        into the folder ``path``.

        Only those two files are written; other files in the folder are kept. A folder holding earlier
        scores gets the new ones; a non-empty folder holding none is refused unless ``overwrite=True``
        (then the two files go beside the others); a file at ``path`` is always refused. A failed or
        killed save leaves the earlier scores or the new ones, never a mix.
        """
        info = {"format": _FORMAT, "metric": self.metric, "unit": self.unit, "normalize": self.normalize,
                "names": list(self._values), "shapes": {n: list(s) for n, s in self.shapes.items()},
                "scales": self.scales, "groups": {n: asdict(g) for n, g in self.groups.items()}, "meta": self.meta}
        text = json.dumps(info, indent=1, default=str)
        check_scores_target(path, overwrite)
        with atomic_files_into(path, last=[_META_FILE]) as tmp:
            save_file({f"s{i}": v.contiguous() for i, v in enumerate(self._values.values())},
                      str(tmp / _TENSORS_FILE), metadata={"format": "pt", _EMBEDDED_KEY: text})
            (tmp / _META_FILE).write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "Scores":
        """Read scores written by :meth:`save` (the JSON embedded in ``scores.safetensors`` when present,
        else ``scores.json``, as in folders saved before it was embedded)."""
        info, tensors = _read_saved_scores(Path(path))
        values = {n: tensors[f"s{i}"] for i, n in enumerate(info["names"])}
        groups = {n: NeuronGroup(g["name"], g["kind"], g["size"],
                                 tuple(GroupMember(m["module"], m["unit"], m["block"], tuple(m["offsets"]))
                                       for m in g["members"]))
                  for n, g in info.get("groups", {}).items()}
        dtype = next(iter(values.values())).dtype if values else torch.float32
        return cls(values, info["metric"], info["unit"], info["normalize"],
                   {n: tuple(s) for n, s in info["shapes"].items()}, groups, info.get("scales"), info.get("meta"),
                   dtype)


def _read_tensors_file(file: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a scores tensors file, both from one open file."""
    with safe_open(str(file), framework="pt") as f:
        return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}


def _read_saved_scores(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(info, tensors)`` of a scores folder; a FileNotFoundError saying what is expected when it holds none."""
    tensors_file, meta_file = path / _TENSORS_FILE, path / _META_FILE
    metadata, tensors = _read_tensors_file(tensors_file) if tensors_file.is_file() else ({}, {})
    text = metadata.get(_EMBEDDED_KEY)
    if text is None and tensors_file.is_file() and meta_file.is_file():
        text = meta_file.read_text()
    if text is None:
        raise FileNotFoundError(f"{path} holds no saved scores (expected {_META_FILE} and {_TENSORS_FILE}); "
                                "write them with Scores.save(path)")
    return json.loads(text), tensors


def holds_scores(path: str | Path) -> bool:
    """Whether the folder ``path`` holds scores written by :meth:`Scores.save`."""
    try:
        info, _ = _read_saved_scores(Path(path))
    except (OSError, ValueError, RuntimeError, SafetensorError):
        return False
    return isinstance(info, dict) and str(info.get("format", "")).startswith("rowsft.scores/")


def check_scores_target(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse (ValueError, nothing changed) a file, and without ``overwrite`` a non-empty folder that
    holds no saved scores (a folder holding nothing but scores files counts as one); returns ``path`` resolved."""
    return check_output_folder(path, "scores folder",
                               lambda folder, names: set(names) <= {_TENSORS_FILE, _META_FILE} or holds_scores(folder),
                               "no saved scores", f"{_TENSORS_FILE} and {_META_FILE}", overwrite)
