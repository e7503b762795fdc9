"""Saving and loading rowsft adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

The config records the format version, ``"peft_type": "ROWSFT"``, the base model's name, each
sparse layer (unit, ``(d_out, d_in)`` shape, k, index dtype, update dtype, trained bias), the trained
heads, the shapes of every linear module of the base model (to refuse an adapter made for another
model with a message saying what differs) and the selection's meta. The weights file holds, per
layer, ``<name>.indices`` and ``<name>.delta`` (rows, columns) or ``<name>.values`` (elements),
``<name>.bias_delta`` when a bias was trained, and ``heads.<parameter name>`` for trained heads.
The weights file also embeds the config (the same JSON, safetensors metadata ``rowsft_adapter_config``),
and loading trusts that copy over ``adapter_config.json``.
Saving writes only those two files into the folder (other files there are kept): each is written
beside it, fsynced and moved in with one ``os.replace``, the weights first and the config last, so a
failed or killed save leaves the earlier adapter's files intact, and a kill between the two renames
leaves the new weights, which carry their own config: the folder loads as the new adapter (see
`rowsft.io_utils.atomic_files_into`). A non-empty folder that holds no rowsft adapter, or a file, is
refused unless ``overwrite=True`` (files: always).
Loading checks the whole folder (config fields, tensor names, shapes, dtypes, index ranges, finite
values) before it changes the model, so a damaged adapter leaves the model as it was.

Under FSDP2 (a model sharded with ``fully_shard`` / `rowsft.distributed.shard`) each rank holds a slice of
every delta. ``save_adapter`` must then be called on every rank: it gathers the full deltas (a collective),
rank 0 writes the folder and the other ranks wait for it (and raise rank 0's error if it fails).
``load_adapter`` is called on every rank too and copies each rank's slice in; it needs the model to carry
the adapter's selection already (a sharded model cannot get new layers): load into the plain model, then
shard it.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch as safetensors_torch
import torch
from torch import nn

from rowsft.distributed import copy_full_into, full_tensor, is_sharded, reshard, run_on_main_process
from rowsft.io_utils import atomic_files_into, check_output_folder
from rowsft.layers.adapter_checks import (
    CONFIG_NAME,
    FORMAT_VERSION,
    PEFT_TYPE,
    WEIGHTS_NAME,
    dtype_from_name,
    dtype_name,
    model_name,
    module_shapes,
    read_weights_metadata,
    update_key,
    validated_adapter,
    weights_metadata,
)
from rowsft.layers.tuner import apply, current_selection, sparse_layers, trained_heads, unload


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor; an FSDP2 shard is gathered from every rank first (a collective)."""
    with torch.no_grad():
        return full_tensor(tensor.detach()).cpu().clone()


def _adapter_state(model: nn.Module, base_model_name: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` to write for the model's sparse updates and trained heads (full tensors, also when
    the model is sharded: then every rank must call this, in the same order)."""
    layers = sparse_layers(model)
    if not layers:
        raise ValueError("the model has no rowsft sparse layers to save; call rowsft.apply(model, selection) first")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"{merged[:3]} are merged; call rowsft.unmerge(model) before saving the adapter")
    tensors: dict[str, torch.Tensor] = {}
    layer_configs = {}
    for name, layer in layers.items():
        tensors[f"{name}.indices"] = _host_copy(layer.indices)                     # (k,), whole on every rank
        tensors[f"{name}.{update_key(layer.unit)}"] = _host_copy(layer.update)     # gathered when sharded
        if layer.bias_delta is not None:
            tensors[f"{name}.bias_delta"] = _host_copy(layer.bias_delta)
        layer_configs[name] = {"unit": layer.unit, "shape": [layer.out_features, layer.in_features], "k": layer.k,
                               "index_dtype": dtype_name(layer.indices.dtype),
                               "delta_dtype": dtype_name(layer.update.dtype), "bias": layer.bias_delta is not None}
    heads = trained_heads(model)
    parameters = dict(model.named_parameters())
    for head in heads:
        for pname, _ in model.get_submodule(head).named_parameters():
            tensors[f"heads.{head}.{pname}"] = _host_copy(parameters[f"{head}.{pname}"])
    config = {
        "format_version": FORMAT_VERSION,
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": base_model_name or model_name(model),
        "layers": layer_configs,
        "heads": heads,
        "model_modules": module_shapes(model),
        "selection_meta": current_selection(model).meta,
    }
    return config, tensors


def is_rowsft_adapter_folder(path) -> bool:
    """Whether the folder ``path`` holds a rowsft adapter: an ``adapter_config.json`` or an
    ``adapter_model.safetensors`` (e.g. left alone by a save killed between its renames) whose
    ``peft_type`` is ROWSFT."""
    try:
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        config = None
    if isinstance(config, dict) and config.get("peft_type") == PEFT_TYPE:
        return True
    try:
        return read_weights_metadata(path).get("peft_type") == PEFT_TYPE
    except (OSError, ValueError):
        return False


def check_save_target(path, overwrite: bool = False) -> Path:
    """Refuse (ValueError, nothing changed) a file, and without ``overwrite`` a non-empty folder that
    holds no rowsft adapter (another kind of adapter, e.g. a peft LoRA, counts as foreign; the weights
    file alone, left by a first save killed between its renames, counts as a rowsft adapter: it
    carries its config); returns ``path`` resolved."""
    return check_output_folder(path, "adapter folder", lambda folder, _: is_rowsft_adapter_folder(folder),
                               "no rowsft adapter", f"{CONFIG_NAME} and {WEIGHTS_NAME}", overwrite)


def save_adapter(model: nn.Module, path, base_model_name: str | None = None, overwrite: bool = False) -> Path:
    """Write the model's sparse updates (and trained heads) into the folder ``path``; returns it.

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are written; other files in the
    folder are kept. A folder holding an earlier rowsft adapter gets the new one; a non-empty folder
    holding none is refused unless ``overwrite=True`` (then the two files go beside the others); a
    file at ``path`` is always refused. The weights file embeds the config and is renamed into place
    first, the config last: a save failed or killed at any instant leaves the earlier adapter or the
    new one loadable, never a mix.

    A model sharded with FSDP2: call this on every rank (not only the main process, as with DDP). The
    deltas are gathered from all ranks, rank 0 checks the folder and writes, the others wait and return
    the same path, or raise rank 0's error.
    """
    sharded = is_sharded(model)
    if sharded:
        reshard(model)          # every parameter back to its DTensor shard, the same on every rank
    config, tensors = _adapter_state(model, base_model_name)
    if sharded:
        return Path(run_on_main_process(lambda: str(_write(config, tensors, path, overwrite)), "rowsft.save_adapter"))
    return _write(config, tensors, path, overwrite)


def _write(config: dict, tensors: dict[str, torch.Tensor], path, overwrite: bool) -> Path:
    check_save_target(path, overwrite)
    text = json.dumps(config, indent=2, default=str)
    with atomic_files_into(path, last=[CONFIG_NAME]) as tmp:
        (tmp / CONFIG_NAME).write_text(text)
        safetensors_torch.save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=weights_metadata(text))
    return Path(path)


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load an adapter written by :func:`save_adapter` into ``model`` (in place; returns it).

    A plain model gets the adapter's selection applied first; a model that already carries sparse
    layers must carry exactly the adapter's selection (unmerged). The whole folder is checked first:
    a damaged or mismatched adapter raises a ValueError and leaves the model unchanged.

    A model sharded with FSDP2: call this on every rank; the model must already carry the adapter's selection
    with the same update dtypes and trained biases (each rank copies in its slice). Otherwise load the adapter
    into the plain model first, then shard it."""
    sharded = is_sharded(model)
    if sharded and not sparse_layers(model):
        raise RuntimeError("rowsft.load_adapter got a model sharded with FSDP2 (fully_shard) that carries no rowsft "
                           "layers: layers added now would be neither sharded nor averaged across ranks. Load the "
                           "adapter into the plain model, then shard it: rowsft.load_adapter(model, path); "
                           "rowsft.distributed.shard(model).")
    config, tensors, selection = validated_adapter(model, path)
    layer_configs = config["layers"]
    if sharded:
        _check_sharded_layers(sparse_layers(model), layer_configs)
        reshard(model)          # write into the DTensor shards the optimizer steps, not into gathered copies
    applied = not sparse_layers(model)
    if applied:
        dtypes = {c["delta_dtype"] for c in layer_configs.values()}
        apply(model, selection, train_heads=list(config["heads"]) or False,
              delta_dtype=dtype_from_name(dtypes.pop()) if len(dtypes) == 1 else None,
              train_bias=any(c["bias"] for c in layer_configs.values()))
    try:
        _copy_in(model, layer_configs, tensors)
    except BaseException:
        if applied:
            unload(model)
        raise
    return model


def _check_sharded_layers(layers: dict, layer_configs: dict) -> None:
    """A sharded layer can take new values but not a new dtype nor a bias added or dropped: refuse those first."""
    for name, c in layer_configs.items():
        layer = layers[name]
        if layer.update.dtype != dtype_from_name(c["delta_dtype"]) or (layer.bias_delta is not None) != c["bias"]:
            raise ValueError(f"{name}: the adapter holds {c['delta_dtype']} updates{' and a bias' if c['bias'] else ''}, "
                             f"the sharded model's layer {dtype_name(layer.update.dtype)} updates"
                             f"{' and a bias' if layer.bias_delta is not None else ''}; a sharded parameter cannot "
                             "change dtype or appear: load the adapter into the plain model, then shard it")


def _copy_in(model: nn.Module, layer_configs: dict, tensors: dict[str, torch.Tensor]) -> None:
    layers = sparse_layers(model)
    with torch.no_grad():
        for name, c in layer_configs.items():
            _load_layer(layers[name], name, c, tensors)
        parameters = dict(model.named_parameters())
        for key, value in tensors.items():
            if key.startswith("heads."):
                copy_full_into(parameters[key[len("heads."):]], value)       # this rank's slice when sharded


def _load_layer(layer, name: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    key = f"{name}.{update_key(layer.unit)}"
    dtype = dtype_from_name(config["delta_dtype"])
    update = layer.update
    if update.dtype != dtype:          # mixed update dtypes in one adapter
        update.data = update.data.to(dtype)
        layer.delta_dtype = dtype
    copy_full_into(update, tensors[key])                          # this rank's slice when sharded
    if config["bias"]:
        copy_full_into(layer.bias_delta, tensors[f"{name}.bias_delta"])
    elif layer.bias_delta is not None:  # the adapter trained no bias here
        layer.bias_delta = None
        layer.bias_indices = None
