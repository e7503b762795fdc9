"""Saving and loading rowsft adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

The config records the format version, ``"peft_type": "ROWSFT"``, the base model's name, each
sparse layer (unit, ``(d_out, d_in)`` shape, k, index dtype, update dtype, trained bias), the trained
heads, the shapes of every linear module of the base model (to refuse an adapter made for another
model with a message saying what differs) and the selection's meta. The weights file holds, per
layer, ``<name>.indices`` and ``<name>.delta`` (rows, columns) or ``<name>.values`` (elements),
``<name>.bias_delta`` when a bias was trained, and ``heads.<parameter name>`` for trained heads.
Folders are written atomically: a failed save leaves any earlier adapter at ``path`` intact.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rowsft.io_utils import atomic_directory
from rowsft.layers.tuner import apply, current_selection, sparse_layers, trained_heads
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import linear_modules, linear_shape

FORMAT_VERSION = 1
PEFT_TYPE = "ROWSFT"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_MAX_REPORTED = 6


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"adapter config names an unknown dtype {name!r}")
    return dtype


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``(d_out, d_in)`` of every linear module (sparse layers count as the module they wrap)."""
    return {name: list(linear_shape(m)) for name, m in linear_modules(model).items()}


def save_adapter(model: nn.Module, path, base_model_name: str | None = None) -> Path:
    """Write the model's sparse updates (and trained heads) to the folder ``path``; returns it."""
    from safetensors.torch import save_file

    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no rowsft sparse layers to save; call rowsft.apply(model, selection) first")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[:3]} are merged; call rowsft.unmerge(model) before saving the adapter")
    tensors: dict[str, torch.Tensor] = {}
    layer_configs = {}
    for name, layer in layers.items():
        tensors[f"{name}.indices"] = layer.indices.detach().cpu().clone()
        key = "values" if layer.unit == "element" else "delta"
        tensors[f"{name}.{key}"] = layer.update.detach().cpu().clone()
        if layer.bias_delta is not None:
            tensors[f"{name}.bias_delta"] = layer.bias_delta.detach().cpu().clone()
        layer_configs[name] = {"unit": layer.unit, "shape": [layer.out_features, layer.in_features], "k": layer.k,
                               "index_dtype": _dtype_name(layer.indices.dtype),
                               "delta_dtype": _dtype_name(layer.update.dtype), "bias": layer.bias_delta is not None}
    heads = trained_heads(model)
    parameters = dict(model.named_parameters())
    for head in heads:
        for pname, _ in model.get_submodule(head).named_parameters():
            tensors[f"heads.{head}.{pname}"] = parameters[f"{head}.{pname}"].detach().cpu().clone()
    config = {
        "format_version": FORMAT_VERSION,
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name or _model_name(model),
        "layers": layer_configs,
        "heads": heads,
        "model_modules": _module_shapes(model),
        "selection_meta": current_selection(model).meta,
    }
    with atomic_directory(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "peft_type": PEFT_TYPE})
    return Path(path)


def read_adapter_config(path) -> dict:
    """The ``adapter_config.json`` of an adapter folder, with clear errors for missing files."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter at {str(path)!r}: expected a folder with {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} written by rowsft.save_adapter")
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the adapter folder {str(path)!r} lacks {missing}; was it written by rowsft.save_adapter?")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{str(path)!r} holds a {config.get('peft_type')!r} adapter, not a rowsft one "
                         f"(load it with peft instead)")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer rowsft (format {config['format_version']}); upgrade rowsft")
    return config


def check_model_matches(model: nn.Module, config: dict) -> None:
    """Raise a ValueError naming what differs between ``model`` and the model the adapter was saved for."""
    saved = {n: tuple(s) for n, s in config["model_modules"].items()}
    here = {n: tuple(s) for n, s in _module_shapes(model).items()}
    tuned = [n for n in config["layers"] if n in saved]
    ordered = tuned + [n for n in saved if n not in config["layers"]]   # the adapter's own layers first
    problems = [f"{n} is {saved[n]}, this one has {here[n]}" for n in ordered if n in here and here[n] != saved[n]]
    absent = [n for n in ordered if n not in here]
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        problems.append(f"modules {absent[:3]}{more} do not exist in this one")
    extra = [n for n in here if n not in saved]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        problems.append(f"this one has modules {extra[:3]}{more} that it lacked")
    if problems:
        more = f" (and {len(problems) - _MAX_REPORTED} more differences)" if len(problems) > _MAX_REPORTED else ""
        raise ValueError(f"adapter was saved for a model ({config.get('base_model_name_or_path')}) whose "
                         + "; ".join(problems[:_MAX_REPORTED]) + more
                         + f"; this model is {_model_name(model) or type(model).__name__}")


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` (in place; returns it).

    A plain model gets the adapter's selection applied first; a model that already carries sparse
    layers must carry exactly the adapter's selection (unmerged)."""
    from safetensors.torch import load_file

    config = read_adapter_config(path)
    check_model_matches(model, config)
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    layer_configs = config["layers"]
    missing = [f"{n}.indices" for n in layer_configs if f"{n}.indices" not in tensors]
    if missing:
        raise ValueError(f"{WEIGHTS_NAME} in {str(path)!r} lacks {missing[:3]}; the adapter is damaged, save it again")
    selection = Selection({n: LayerChoice(c["unit"], tensors[f"{n}.indices"].long(), tuple(c["shape"]))
                           for n, c in layer_configs.items()}, dict(config.get("selection_meta") or {}))
    present = sparse_layers(model)
    if present:
        _check_same_selection(current_selection(model), selection)
    else:
        dtypes = {c["delta_dtype"] for c in layer_configs.values()}
        apply(model, selection, train_heads=list(config.get("heads") or []) or False,
              delta_dtype=_dtype(dtypes.pop()) if len(dtypes) == 1 else None,
              train_bias=any(c.get("bias") for c in layer_configs.values()))
    layers = sparse_layers(model)
    with torch.no_grad():
        for name, c in layer_configs.items():
            _load_layer(layers[name], name, c, tensors)
        parameters = dict(model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("heads."):
                target = parameters[key[len("heads."):]]
                target.copy_(value.to(device=target.device, dtype=target.dtype))
    return model


def _check_same_selection(current: Selection, wanted: Selection) -> None:
    different = [n for n in wanted.layers.keys() | current.layers.keys()
                 if n not in current.layers or n not in wanted.layers
                 or current.unit(n) != wanted.unit(n) or not torch.equal(current[n], wanted[n])]
    if different:
        raise ValueError(f"the model already carries a different selection ({sorted(different)[:3]} differ); "
                         f"call rowsft.unload(model) first to load this adapter into the plain model")


def _load_layer(layer, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    if layer.merged:
        raise RuntimeError(f"{name} is merged; call rowsft.unmerge(model) before loading an adapter")
    key = f"{name}.{'values' if layer.unit == 'element' else 'delta'}"
    if key not in tensors:
        raise ValueError(f"the adapter lacks {key}; it is damaged, save it again")
    dtype = _dtype(config["delta_dtype"])
    update = layer.update
    if update.dtype != dtype:          # mixed update dtypes in one adapter
        update.data = update.data.to(dtype)
        layer.delta_dtype = dtype
    update.copy_(tensors[key].to(update.device))
    if config.get("bias"):
        layer.bias_delta.copy_(tensors[f"{name}.bias_delta"].to(layer.bias_delta))
    elif layer.bias_delta is not None:  # the adapter trained no bias here
        layer.bias_delta = None
        layer.bias_indices = None
