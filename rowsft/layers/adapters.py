"""Saving and loading rowsft adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

The config records the format version, ``"peft_type": "ROWSFT"``, the base model's name, each
sparse layer (unit, ``(d_out, d_in)`` shape, k, index dtype, update dtype, trained bias), the trained
heads, the shapes of every linear module of the base model (to refuse an adapter made for another
model with a message saying what differs) and the selection's meta. The weights file holds, per
layer, ``<name>.indices`` and ``<name>.delta`` (rows, columns) or ``<name>.values`` (elements),
``<name>.bias_delta`` when a bias was trained, and ``heads.<parameter name>`` for trained heads.
Saving writes only those two files into the folder (other files there are kept): each is written
beside it, fsynced and moved in with one ``os.replace``, the config last, so a failed or killed save
leaves the earlier adapter's files intact (see `rowsft.io_utils.atomic_files_into`). A non-empty folder
that holds no rowsft adapter, or a file, is refused unless ``overwrite=True`` (files: always).
Loading checks the whole folder (config fields, tensor names, shapes, dtypes, index ranges, finite
values) before it changes the model, so a damaged adapter leaves the model as it was.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch as safetensors_torch
import torch
from safetensors import SafetensorError
from torch import nn

from rowsft.io_utils import atomic_files_into, refuse_file
from rowsft.layers.tuner import apply, current_selection, sparse_layers, trained_heads, unload
from rowsft.selection.choice import UNITS, LayerChoice, Selection
from rowsft.targets import linear_modules, linear_shape

FORMAT_VERSION = 1
PEFT_TYPE = "ROWSFT"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_MAX_REPORTED = 6


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"adapter config names an unknown dtype {name!r}")
    return dtype


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``(d_out, d_in)`` of every linear module (sparse layers count as the module they wrap)."""
    return {name: list(linear_shape(m)) for name, m in linear_modules(model).items()}


def _adapter_state(model: nn.Module, base_model_name: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` to write for the model's sparse updates and trained heads."""
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
        tensors[f"{name}.{_update_key(layer.unit)}"] = layer.update.detach().cpu().clone()
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
    return config, tensors


def _update_key(unit: str) -> str:
    return "values" if unit == "element" else "delta"


def is_rowsft_adapter_folder(path) -> bool:
    """Whether the folder ``path`` holds a rowsft adapter's ``adapter_config.json`` (readable, ``peft_type`` ROWSFT)."""
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == PEFT_TYPE


def check_save_target(path, overwrite: bool = False) -> Path:
    """Refuse (ValueError, nothing changed) a file, and without ``overwrite`` a non-empty folder that
    holds no rowsft adapter (a folder holding nothing but adapter files, e.g. from a killed first save,
    counts as one); returns ``path`` resolved."""
    target = refuse_file(path, "adapter folder")
    shown = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if overwrite or set(shown) <= {CONFIG_NAME, WEIGHTS_NAME} or is_rowsft_adapter_folder(target):
        return target
    more = f" and {len(shown) - 3} more" if len(shown) > 3 else ""
    raise ValueError(f"{str(target)!r} is not empty ({shown[:3]}{more}) and holds no rowsft adapter; save into a "
                     f"new or empty folder, or pass overwrite=True to write {CONFIG_NAME} and {WEIGHTS_NAME} "
                     f"beside those files (nothing else there is deleted)")


def save_adapter(model: nn.Module, path, base_model_name: str | None = None, overwrite: bool = False) -> Path:
    """Write the model's sparse updates (and trained heads) into the folder ``path``; returns it.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are written; other files in the
    folder are kept. A folder holding an earlier rowsft adapter gets the new one; a non-empty folder
    holding none is refused unless ``overwrite=True`` (then the two files go beside the others); a
    file at ``path`` is always refused. A failed or killed save leaves the earlier adapter's files.
    """
    config, tensors = _adapter_state(model, base_model_name)
    check_save_target(path, overwrite)
    with atomic_files_into(path, last=[CONFIG_NAME]) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
        safetensors_torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "peft_type": PEFT_TYPE})
    return Path(path)


# ------------------------------------------------------------------------------------------ reading
def _damaged(file: Path, what: str) -> ValueError:
    return ValueError(f"{str(file)!r}: {what}; the adapter is damaged or was edited by hand: save it again "
                      f"with rowsft.save_adapter (or fix that field)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(config: dict, key: str, kind, file: Path, label: str = ""):
    """``config[key]`` when present and of type ``kind``; otherwise a ValueError naming the file and field."""
    where = f"{label}{key!r}"
    if key not in config:
        raise _damaged(file, f"missing field {where}")
    value = config[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _damaged(file, f"field {where} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _check_layer_config(name: str, c, file: Path) -> None:
    label = f"layers[{name!r}]."
    if not isinstance(c, dict):
        raise _damaged(file, f"layers[{name!r}] must be an object, got {type(c).__name__}")
    if _need(c, "unit", str, file, label) not in UNITS:
        raise _damaged(file, f"{label}'unit' is {c['unit']!r}, expected one of {UNITS}")
    shape = _need(c, "shape", list, file, label)
    if len(shape) != 2 or not all(_is_int(s) and s > 0 for s in shape):
        raise _damaged(file, f"{label}'shape' must be [d_out, d_in] (two positive integers), got {shape!r}")
    if _need(c, "k", int, file, label) < 1:
        raise _damaged(file, f"{label}'k' must be at least 1, got {c['k']}")
    for key, floating in (("index_dtype", False), ("delta_dtype", True)):
        dtype = getattr(torch, _need(c, key, str, file, label), None)
        if not isinstance(dtype, torch.dtype) or dtype.is_floating_point != floating or dtype.is_complex:
            kind = "a floating-point" if floating else "an integer"
            raise _damaged(file, f"{label}{key!r} is {c[key]!r}, not {kind} torch dtype name")
    _need(c, "bias", bool, file, label)


def _check_config(config, file: Path) -> None:
    """Every field load_adapter reads, present and well-typed (ValueError naming the file and field)."""
    layers = _need(config, "layers", dict, file)
    if not layers:
        raise _damaged(file, "'layers' is empty")
    for name, c in layers.items():
        _check_layer_config(name, c, file)
    heads = _need(config, "heads", list, file)
    if not all(isinstance(h, str) for h in heads):
        raise _damaged(file, f"'heads' must be a list of module names, got {heads!r}")
    modules = _need(config, "model_modules", dict, file)
    for name, shape in modules.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) for s in shape)):
            raise _damaged(file, f"model_modules[{name!r}] must be [d_out, d_in], got {shape!r}")
    for name, c in layers.items():
        if modules.get(name) != c["shape"]:
            raise _damaged(file, f"layers[{name!r}] has shape {c['shape']} but model_modules gives {modules.get(name)}")
    _need(config, "selection_meta", (dict, type(None)), file)
    _need(config, "base_model_name_or_path", (str, type(None)), file)


def read_adapter_config(path) -> dict:
    """The ``adapter_config.json`` of an adapter folder, checked field by field (clear errors for
    missing files, bad JSON, missing or wrongly typed fields)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter at {str(path)!r}: expected a folder with {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} written by rowsft.save_adapter")
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"the adapter folder {str(path)!r} lacks {missing}; was it written by rowsft.save_adapter?")
    file = path / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _damaged(file, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _damaged(file, f"expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{str(path)!r} holds a {config.get('peft_type')!r} adapter, not a rowsft one "
                         f"(load it with peft instead)")
    version = config.get("format_version", 0)
    if not _is_int(version):
        raise _damaged(file, f"field 'format_version' must be int, got {version!r:.60}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer rowsft (format {version}); upgrade rowsft")
    _check_config(config, file)
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


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors_torch.load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{str(file)!r} cannot be read as safetensors ({e}); the adapter is damaged, "
                         f"save it again with rowsft.save_adapter") from None


def _check_tensor(file: Path, key: str, tensor: torch.Tensor | None, shape: tuple, dtype: torch.dtype | None) -> None:
    """``tensor`` present, of ``shape`` and ``dtype`` (None: any floating dtype), and finite when floating."""
    if tensor is None:
        raise _damaged(file, f"the tensor {key} is missing")
    if tuple(tensor.shape) != tuple(shape):
        raise _damaged(file, f"{key} has shape {tuple(tensor.shape)}, the config needs {tuple(shape)}")
    if dtype is None and not tensor.dtype.is_floating_point:
        raise _damaged(file, f"{key} has dtype {_dtype_name(tensor.dtype)}, expected a floating-point dtype")
    if dtype is not None and tensor.dtype != dtype:
        raise _damaged(file, f"{key} has dtype {_dtype_name(tensor.dtype)} but the config says {_dtype_name(dtype)} "
                             f"(it is not converted silently)")
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise _damaged(file, f"{key} holds NaN or infinite values")


def _expected_layer_tensors(name: str, c: dict, indices: torch.Tensor) -> dict[str, tuple]:
    """``{key: shape}`` of one layer's update (and bias) tensors, from its config and indices."""
    d_out, d_in = c["shape"]
    k = c["k"]
    update = {"row": (k, d_in), "column": (d_out, k), "element": (k,)}[c["unit"]]
    shapes = {f"{name}.{_update_key(c['unit'])}": update}
    if c["bias"]:
        n_bias = {"row": k, "column": d_out}.get(c["unit"])
        if n_bias is None:
            n_bias = int(torch.unique(torch.div(indices.long(), d_in, rounding_mode="floor")).numel())
        shapes[f"{name}.bias_delta"] = (n_bias,)
    return shapes


def _check_indices_tensor(file: Path, name: str, c: dict, tensors: dict) -> torch.Tensor:
    key = f"{name}.indices"
    indices = tensors.get(key)
    if indices is None:
        raise _damaged(file, f"the tensor {key} is missing")
    _check_tensor(file, key, indices, (c["k"],), _dtype(c["index_dtype"]))
    choice = LayerChoice(c["unit"], indices.long(), tuple(c["shape"]))
    try:
        choice.validate(key)
    except (ValueError, IndexError) as e:
        raise _damaged(file, str(e)) from None
    return indices


def _check_layers(model: nn.Module, config: dict, tensors: dict, file: Path) -> set[str]:
    """Check every layer's tensors against the config and the model; returns the tensor names used."""
    used = set()
    for name, c in config["layers"].items():
        indices = _check_indices_tensor(file, name, c, tensors)
        used.add(f"{name}.indices")
        if c["bias"] and getattr(model.get_submodule(name), "bias", None) is None:
            raise _damaged(file, f"layers[{name!r}] says bias: true but that module of the model has no bias")
        for key, shape in _expected_layer_tensors(name, c, indices).items():
            _check_tensor(file, key, tensors.get(key), shape, _dtype(c["delta_dtype"]))
            used.add(key)
    return used


def _check_heads(model: nn.Module, config: dict, tensors: dict, file: Path) -> set[str]:
    used = set()
    for head in config["heads"]:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise _damaged(file, f"'heads' names {head!r}, which this model lacks") from None
        if any(n == head or n.startswith(head + ".") for n in config["layers"]):
            raise _damaged(file, f"head {head!r} is also a sparse layer")
        for pname, p in module.named_parameters():
            key = f"heads.{head}.{pname}"
            _check_tensor(file, key, tensors.get(key), tuple(p.shape), None)
            used.add(key)
    return used


def _check_present_layers(model: nn.Module, config: dict, selection: Selection) -> None:
    """A model that already carries sparse layers must carry exactly the adapter's, unmerged, with its biases."""
    _check_same_selection(current_selection(model), selection)
    for name, layer in sparse_layers(model).items():
        if layer.merged:
            raise RuntimeError(f"{name} is merged; call rowsft.unmerge(model) before loading an adapter")
        if config["layers"][name]["bias"] and layer.bias_delta is None:
            raise ValueError(f"the adapter trained {name}'s bias but the model's sparse layer has none; "
                             f"call rowsft.unload(model) first to load this adapter into the plain model")


def _validated(model: nn.Module, path) -> tuple[dict, dict[str, torch.Tensor], Selection]:
    """Read and check the whole adapter folder against ``model`` without changing it."""
    config = read_adapter_config(path)
    check_model_matches(model, config)
    file = Path(path) / WEIGHTS_NAME
    tensors = _read_tensors(file)
    used = _check_layers(model, config, tensors, file) | _check_heads(model, config, tensors, file)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise _damaged(file, f"unknown tensors {unknown[:3]}{' ...' if len(unknown) > 3 else ''} that the config "
                             f"does not describe")
    selection = Selection({n: LayerChoice(c["unit"], tensors[f"{n}.indices"].long(), tuple(c["shape"]))
                           for n, c in config["layers"].items()}, dict(config.get("selection_meta") or {}))
    if sparse_layers(model):
        _check_present_layers(model, config, selection)
    return config, tensors, selection


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` (in place; returns it).

    A plain model gets the adapter's selection applied first; a model that already carries sparse
    layers must carry exactly the adapter's selection (unmerged). The whole folder is checked first:
    a damaged or mismatched adapter raises a ValueError and leaves the model unchanged."""
    config, tensors, selection = _validated(model, path)
    layer_configs = config["layers"]
    applied = not sparse_layers(model)
    if applied:
        dtypes = {c["delta_dtype"] for c in layer_configs.values()}
        apply(model, selection, train_heads=list(config["heads"]) or False,
              delta_dtype=_dtype(dtypes.pop()) if len(dtypes) == 1 else None,
              train_bias=any(c["bias"] for c in layer_configs.values()))
    try:
        _copy_in(model, layer_configs, tensors)
    except BaseException:
        if applied:
            unload(model)
        raise
    return model


def _copy_in(model: nn.Module, layer_configs: dict, tensors: dict[str, torch.Tensor]) -> None:
    layers = sparse_layers(model)
    with torch.no_grad():
        for name, c in layer_configs.items():
            _load_layer(layers[name], name, c, tensors)
        parameters = dict(model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("heads."):
                target = parameters[key[len("heads."):]]
                target.copy_(value.to(device=target.device, dtype=target.dtype))


def _check_same_selection(current: Selection, wanted: Selection) -> None:
    different = [n for n in wanted.layers.keys() | current.layers.keys()
                 if n not in current.layers or n not in wanted.layers
                 or current.unit(n) != wanted.unit(n) or not torch.equal(current[n], wanted[n])]
    if different:
        raise ValueError(f"the model already carries a different selection ({sorted(different)[:3]} differ); "
                         f"call rowsft.unload(model) first to load this adapter into the plain model")


def _load_layer(layer, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{name}.{_update_key(layer.unit)}"
    dtype = _dtype(config["delta_dtype"])
    update = layer.update
    if update.dtype != dtype:          # mixed update dtypes in one adapter
        update.data = update.data.to(dtype)
        layer.delta_dtype = dtype
    update.copy_(tensors[key].to(update.device))
    if config["bias"]:
        layer.bias_delta.copy_(tensors[f"{name}.bias_delta"].to(layer.bias_delta))
    elif layer.bias_delta is not None:  # the adapter trained no bias here
        layer.bias_delta = None
        layer.bias_indices = None
