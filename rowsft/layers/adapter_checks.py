"""Reading and checking a rowsft adapter folder without changing any model.

`validated_adapter` reads ``adapter_config.json`` and ``adapter_model.safetensors`` and checks everything
`rowsft.load_adapter` will use: config fields present and well-typed, each layer's tensors present with
the shapes and dtypes the config states (no silent conversion), indices in range, finite values, no
tensor the config does not describe, and the model the adapter was saved for. A problem is a
ValueError naming the file and what is wrong; the model is never touched here.

The weights file carries a copy of the config in its safetensors metadata (``rowsft_adapter_config``),
and that copy is the authority: a save killed between its two renames (weights first, config last)
leaves new weights beside the old ``adapter_config.json``, and the embedded copy still describes the
weights exactly. ``adapter_config.json`` is then only read for adapters saved before the copy existed;
when it disagrees with the embedded copy, a warning says so and the embedded one is used.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from rowsft.layers.tuner import current_selection, sparse_layers
from rowsft.selection.choice import UNITS, LayerChoice, Selection
from rowsft.targets import linear_modules, linear_shape

FORMAT_VERSION = 1
PEFT_TYPE = "ROWSFT"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
EMBEDDED_CONFIG_KEY = "rowsft_adapter_config"
MAX_REPORTED = 6


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"adapter config names an unknown dtype {name!r}")
    return dtype


def model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def module_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``(d_out, d_in)`` of every linear module (sparse layers count as the module they wrap)."""
    return {name: list(linear_shape(m)) for name, m in linear_modules(model).items()}


def update_key(unit: str) -> str:
    return "values" if unit == "element" else "delta"


def weights_metadata(config_text: str) -> dict[str, str]:
    """The safetensors metadata `save_adapter` writes: format, peft type and the config's JSON text."""
    return {"format": "pt", "peft_type": PEFT_TYPE, EMBEDDED_CONFIG_KEY: config_text}


def _embedded_label(weights: Path) -> str:
    """How messages name the config copy inside the weights file."""
    return f"{str(weights)!r} (its embedded copy of {CONFIG_NAME})"


def _damaged(file: Path | str, what: str) -> ValueError:
    """A ValueError naming ``file`` (a path, or a label from `_embedded_label`) and what is wrong."""
    where = repr(str(file)) if isinstance(file, Path) else file
    return ValueError(f"{where}: {what}; the adapter is damaged or was edited by hand: save it again "
                      f"with rowsft.save_adapter (or fix that field)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(config: dict, key: str, kind, file: Path | str, label: str = ""):
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


def _check_layer_config(name: str, c, file: Path | str) -> None:
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


def _check_config(config, file: Path | str) -> None:
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


def _weights_file(path) -> Path:
    """``path/adapter_model.safetensors``; a FileNotFoundError saying what is expected when it is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter at {str(path)!r}: expected a folder with {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME} written by rowsft.save_adapter")
    if not (path / WEIGHTS_NAME).is_file():
        missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
        raise FileNotFoundError(f"the adapter folder {str(path)!r} lacks {missing}; was it written by rowsft.save_adapter?")
    return path / WEIGHTS_NAME


def _read_weights(file: Path, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of the weights file, both read from one open file (a save that replaces
    the file meanwhile cannot mix two adapters); ``tensors=False`` reads the header only."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            loaded = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{str(file)!r} cannot be read as safetensors ({e}); the adapter is damaged, "
                         f"save it again with rowsft.save_adapter") from None
    return metadata, loaded


def read_weights_metadata(path) -> dict[str, str]:
    """The safetensors metadata of the adapter folder ``path``'s weights file (header only)."""
    return _read_weights(_weights_file(path), tensors=False)[0]


def _parse_config(text: str, where: Path | str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise _damaged(where, f"not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise _damaged(where, f"expected a JSON object, got {type(config).__name__}")
    return config


def _json_config(file: Path) -> dict:
    """``adapter_config.json`` parsed (not yet checked)."""
    try:
        text = file.read_text()
    except UnicodeDecodeError as e:
        raise _damaged(file, f"not valid JSON ({e})") from None
    return _parse_config(text, file)


def _warn_if_stale(file: Path, embedded: dict) -> None:
    """Warn when ``adapter_config.json`` exists but differs from the config embedded in the weights."""
    if not file.is_file():
        return
    try:
        same = _json_config(file) == embedded
    except (OSError, ValueError):
        same = False
    if not same:
        warnings.warn(f"{str(file)!r} differs from the config embedded in {WEIGHTS_NAME} (a save was interrupted "
                      f"between its two renames, or the file was edited by hand); the embedded config is used. "
                      f"Save the adapter again with rowsft.save_adapter to rewrite {CONFIG_NAME}")


def _authoritative_config(folder: Path, metadata: dict[str, str]) -> tuple[dict, Path | str]:
    """``(config, where)``: the config embedded in the weights when there is one, else ``adapter_config.json``
    (adapters saved before the embedded copy existed); ``where`` names its source in messages."""
    weights, file = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    text = metadata.get(EMBEDDED_CONFIG_KEY)
    if text is not None:
        embedded = _parse_config(text, _embedded_label(weights))
        _warn_if_stale(file, embedded)
        return embedded, _embedded_label(weights)
    if not file.is_file():
        raise FileNotFoundError(f"the adapter folder {str(folder)!r} lacks [{CONFIG_NAME!r}] and its {WEIGHTS_NAME} "
                                f"embeds no config; was it written by rowsft.save_adapter?")
    return _json_config(file), file


def _checked_config(folder: Path, metadata: dict[str, str]) -> dict:
    """The authoritative config of ``folder``, checked field by field."""
    config, where = _authoritative_config(folder, metadata)
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{str(folder)!r} holds a {config.get('peft_type')!r} adapter, not a rowsft one "
                         f"(load it with peft instead)")
    if "format_version" not in config and "peft_version" in config:
        raise ValueError(f"{str(folder)!r} holds a RowSFT adapter written by peft (PeftModel.save_pretrained), not "
                         f"by rowsft.save_adapter: load it with peft.PeftModel.from_pretrained(model, path) (touch "
                         f"rowsft.RowSFTConfig first: that registers the method with peft)")
    version = config.get("format_version", 0)
    if not _is_int(version):
        raise _damaged(where, f"field 'format_version' must be int, got {version!r:.60}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{str(folder)!r} was written by a newer rowsft (format {version}); upgrade rowsft")
    _check_config(config, where)
    return config


def read_adapter_config(path) -> dict:
    """The config of an adapter folder, checked field by field (clear errors for missing files, bad
    JSON, missing or wrongly typed fields): the copy embedded in ``adapter_model.safetensors`` when
    there is one (it always matches the weights), else ``adapter_config.json``."""
    return _checked_config(Path(path), read_weights_metadata(path))


def check_model_matches(model: nn.Module, config: dict) -> None:
    """Raise a ValueError naming what differs between ``model`` and the model the adapter was saved for."""
    saved = {n: tuple(s) for n, s in config["model_modules"].items()}
    here = {n: tuple(s) for n, s in module_shapes(model).items()}
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
        more = f" (and {len(problems) - MAX_REPORTED} more differences)" if len(problems) > MAX_REPORTED else ""
        raise ValueError(f"adapter was saved for a model ({config.get('base_model_name_or_path')}) whose "
                         + "; ".join(problems[:MAX_REPORTED]) + more
                         + f"; this model is {model_name(model) or type(model).__name__}")


def _check_tensor(file: Path, key: str, tensor: torch.Tensor | None, shape: tuple, dtype: torch.dtype | None) -> None:
    """``tensor`` present, of ``shape`` and ``dtype`` (None: any floating dtype), and finite when floating."""
    if tensor is None:
        raise _damaged(file, f"the tensor {key} is missing")
    if tuple(tensor.shape) != tuple(shape):
        raise _damaged(file, f"{key} has shape {tuple(tensor.shape)}, the config needs {tuple(shape)}")
    if dtype is None and not tensor.dtype.is_floating_point:
        raise _damaged(file, f"{key} has dtype {dtype_name(tensor.dtype)}, expected a floating-point dtype")
    if dtype is not None and tensor.dtype != dtype:
        raise _damaged(file, f"{key} has dtype {dtype_name(tensor.dtype)} but the config says {dtype_name(dtype)} "
                             f"(it is not converted silently)")
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise _damaged(file, f"{key} holds NaN or infinite values")


def _expected_layer_tensors(name: str, c: dict, indices: torch.Tensor) -> dict[str, tuple]:
    """``{key: shape}`` of one layer's update (and bias) tensors, from its config and indices."""
    d_out, d_in = c["shape"]
    k = c["k"]
    update = {"row": (k, d_in), "column": (d_out, k), "element": (k,)}[c["unit"]]
    shapes = {f"{name}.{update_key(c['unit'])}": update}
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
    _check_tensor(file, key, indices, (c["k"],), dtype_from_name(c["index_dtype"]))
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
            _check_tensor(file, key, tensors.get(key), shape, dtype_from_name(c["delta_dtype"]))
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


def validated_adapter(model: nn.Module, path) -> tuple[dict, dict[str, torch.Tensor], Selection]:
    """Read and check the whole adapter folder against ``model`` without changing it."""
    file = _weights_file(path)
    metadata, tensors = _read_weights(file)
    config = _checked_config(Path(path), metadata)
    check_model_matches(model, config)
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


def _check_same_selection(current: Selection, wanted: Selection) -> None:
    different = [n for n in wanted.layers.keys() | current.layers.keys()
                 if n not in current.layers or n not in wanted.layers
                 or current.unit(n) != wanted.unit(n) or not torch.equal(current[n], wanted[n])]
    if different:
        raise ValueError(f"the model already carries a different selection ({sorted(different)[:3]} differ); "
                         f"call rowsft.unload(model) first to load this adapter into the plain model")
