"""``save_as_lora``: a rowsft fine-tune written as a stock peft LoRA adapter, exactly.

A row update is a rank-``k`` LoRA: with ``delta (k, d_in)`` on rows ``idx`` of ``W (d_out, d_in)``,

    ΔW = B A,   A = delta (k, d_in),   B = one-hot columns (d_out, k), B[idx[j], j] = 1,

and a column update (``delta (d_out, k)`` on input columns ``idx``) is its transpose:
``A = one-hot rows (k, d_in), A[j, idx[j]] = 1``, ``B = delta``. Scaling ``lora_alpha / r`` is 1 (``lora_alpha
= r``; ``rank_pattern`` / ``alpha_pattern`` carry layers whose ``k`` differs from the most common one), so the
LoRA forward ``base(x) + B (A x)`` adds exactly the update (products with 0 and 1 only). Coupled groups are
rows on some modules and columns on others, each exported as above. GPT-2's ``Conv1D`` layers get
``fan_in_fan_out=True`` (peft's flag for weights stored ``(d_in, d_out)``); ``A`` and ``B`` keep the
``(r, d_in)`` / ``(d_out, r)`` shapes either way. Trained heads (``rowsft.apply(train_heads=...)``, peft's
``modules_to_save``) go to the LoRA's ``modules_to_save``.

Refused, with the reason: element updates (a sparse mask is not low-rank: an exact LoRA would need a rank up
to ``min(d_out, d_in)``), trained bias entries (``train_bias=True``), merged updates.

The folder holds ``adapter_config.json`` (written by peft's ``LoraConfig``) and ``adapter_model.safetensors``;
plain peft loads it without rowsft (``PeftModel.from_pretrained(base, folder)``), and so can any LoRA consumer.
Files are staged and moved in one ``os.replace`` each (`rowsft.io_utils.atomic_files_into`); other files in the
folder are kept, and a non-empty folder that holds no LoRA adapter is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch as safetensors_torch
import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import ModulesToSaveWrapper
from torch import nn

from rowsft.distributed import full_tensor, is_sharded, reshard, run_on_main_process, unwrap
from rowsft.integrations.peft_layer import RowSFTLayer
from rowsft.integrations.peft_plan import most_common_k
from rowsft.io_utils import atomic_files_into, check_output_folder
from rowsft.layers.tuner import sparse_layers, trained_heads
from rowsft.targets import is_transposed

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


@dataclass
class Update:
    """One layer's update: ``unit``, ``delta`` (``(k, d_in)`` rows, ``(d_out, k)`` columns), ``indices (k,)``."""
    unit: str
    delta: torch.Tensor
    indices: torch.Tensor
    shape: tuple[int, int]      # (d_out, d_in)
    conv1d: bool


def lora_factors(update: Update) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (k, d_in), B (d_out, k))`` with ``B @ A`` equal to the dense update."""
    d_out, d_in = update.shape
    delta = update.delta.detach().cpu()
    index = update.indices.detach().cpu().long()
    k = index.numel()
    positions = torch.arange(k)
    if update.unit == "row":
        b = torch.zeros(d_out, k, dtype=delta.dtype)
        b[index, positions] = 1                                  # (d_out, k), column j is the one-hot of row idx[j]
        return delta.contiguous(), b
    a = torch.zeros(k, d_in, dtype=delta.dtype)
    a[positions, index] = 1                                      # (k, d_in), row j is the one-hot of column idx[j]
    return a, delta.contiguous()


def _plain(model: nn.Module) -> nn.Module:
    """The model whose module names the LoRA keys use (inside DDP, PeftModel and RowSFTModel wrappers)."""
    model = unwrap(model)
    if isinstance(model, BaseTuner):
        model = model.model
    while callable(getattr(model, "get_base_model", None)):
        inner = model.get_base_model()
        if inner is model:
            break
        model = unwrap(inner)
    return model


def _active_adapter(model: nn.Module, plain: nn.Module, adapter_name: str | None) -> str | None:
    layers = [m for m in plain.modules() if isinstance(m, RowSFTLayer)]
    if not layers:
        return None
    known = sorted({a for layer in layers for a in layer.rowsft_delta})
    if adapter_name is not None:
        if adapter_name not in known:
            raise ValueError(f"the model has no RowSFT adapter {adapter_name!r}; it has {known}")
        return adapter_name
    active = list(getattr(model, "active_adapters", None) or layers[0].active_adapters)
    if len(active) != 1:
        raise ValueError(f"the model has active adapters {active}; pass adapter_name= to choose the one to export")
    return active[0]


def collect_updates(model: nn.Module, adapter_name: str | None = None) -> tuple[dict[str, Update], dict]:
    """``({module name: Update}, {head parameter key: tensor})`` of a model from `rowsft.apply` or from peft
    (``get_peft_model(model, RowSFTConfig(...))``); refuses what has no exact LoRA (see the module docstring)."""
    plain = _plain(model)
    adapter = _active_adapter(model, plain, adapter_name)
    updates, heads = {}, {}
    for name, layer in sparse_layers(plain).items():                         # rowsft.apply
        if layer.bias_delta is not None:
            raise ValueError(f"{name} trains bias entries (train_bias=True); a LoRA adapter has no place for them: "
                             f"merge the model (rowsft.merge_and_unload) instead of exporting it")
        updates[name] = Update(layer.unit, layer.update, layer.indices, (layer.out_features, layer.in_features),
                               is_transposed(layer.base_layer))
        if layer.merged:
            raise RuntimeError(f"{name} is merged; call rowsft.unmerge(model) before save_as_lora")
    for head in trained_heads(plain):
        for pname, p in plain.get_submodule(head).named_parameters():
            heads[f"{head}.{pname}"] = p
    for name, module in plain.named_modules():                               # peft
        if isinstance(module, RowSFTLayer) and adapter in module.rowsft_delta:
            if adapter in module.merged_adapters:
                raise RuntimeError(f"{name} has adapter {adapter!r} merged; call unmerge_adapter() before save_as_lora")
            updates[name] = Update(module.rowsft_unit[adapter], module.rowsft_delta[adapter],
                                   module.rowsft_indices[adapter], (module.out_features, module.in_features),
                                   is_transposed(module.get_base_layer()))
        elif isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for pname, p in module.modules_to_save[adapter].named_parameters():
                heads[f"{name}.{pname}"] = p
    if not updates:
        raise ValueError("the model carries no rowsft update to export; call rowsft.apply(model, selection) or "
                         "get_peft_model(model, RowSFTConfig(...)) first")
    elements = [n for n, u in updates.items() if u.unit == "element"]
    if elements:
        raise ValueError(f"{elements[:3]} train single weights (unit 'element'): a sparse mask is not low-rank, so no "
                         f"exact LoRA adapter exists (it would need rank up to min(d_out, d_in)). Keep it as a rowsft "
                         f"adapter (save_pretrained / rowsft.save_adapter), or merge it into the weights")
    conv = {u.conv1d for u in updates.values()}
    if len(conv) > 1:
        raise ValueError("the updates sit on both nn.Linear and Conv1D layers; peft's LoraConfig has one "
                         "fan_in_fan_out flag for all of them, so export the two kinds separately")
    return updates, heads


def is_lora_folder(path) -> bool:
    """Whether ``path`` holds a peft LoRA adapter (``adapter_config.json`` with ``peft_type`` LORA)."""
    try:
        return json.loads((Path(path) / CONFIG_NAME).read_text()).get("peft_type") == "LORA"
    except (OSError, ValueError, AttributeError):
        return False


def lora_config(updates: dict[str, Update], heads: dict, base_model_name: str | None, task_type=None):
    """The ``peft.LoraConfig`` of the export: ``r`` = the most common ``k``, ``lora_alpha = r``, patterns for the rest."""
    from peft import LoraConfig
    ks = {name: int(u.indices.numel()) for name, u in updates.items()}
    r = most_common_k(list(ks.values()))
    pattern = {name: k for name, k in ks.items() if k != r}
    head_modules = sorted({key.rsplit(".", 1)[0] for key in heads})
    return LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), target_modules=sorted(updates),
                      lora_dropout=0.0, bias="none", fan_in_fan_out=next(iter(updates.values())).conv1d,
                      modules_to_save=head_modules or None, base_model_name_or_path=base_model_name,
                      task_type=task_type, init_lora_weights=True)


def save_as_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None,
                 overwrite: bool = False) -> Path:
    """Write the model's row / column / group updates as a peft LoRA adapter folder at ``path``; returns it.

    ``model``: after `rowsft.apply`, or a peft model of RowSFT (``adapter_name``: which adapter, default the
    active one). Everything is checked before anything is written (ValueError / RuntimeError naming the
    fix); see the module docstring for the mapping and what is refused.

    On a model sharded with FSDP2 (``rowsft.distributed.shard``), call it on **every** process: the deltas and
    heads are gathered from all of them and process 0 checks the folder and writes it."""
    if is_sharded(model):
        reshard(model)                                            # the shards the optimizer steps, no gathered copies
        updates, heads = collect_updates(model, adapter_name)
        updates = {name: dataclasses.replace(u, delta=full_tensor(u.delta.detach())) for name, u in updates.items()}
        heads = {key: full_tensor(p.detach()) for key, p in heads.items()}   # collectives: same order on every rank
        return run_on_main_process(lambda: _write_lora(model, path, updates, heads, overwrite), "save_as_lora")
    updates, heads = collect_updates(model, adapter_name)
    return _write_lora(model, path, updates, heads, overwrite)


def _write_lora(model: nn.Module, path, updates: dict, heads: dict, overwrite: bool) -> Path:
    """Check the folder, then write the LoRA config and factors into it atomically."""
    check_output_folder(path, "LoRA adapter folder", lambda folder, _: is_lora_folder(folder), "no peft LoRA adapter",
                        f"{CONFIG_NAME} and {WEIGHTS_NAME}", overwrite)
    plain = _plain(model)
    peft_configs = getattr(plain, "peft_config", None) or {}
    peft_config = next(iter(peft_configs.values()), None) if peft_configs else None
    name = getattr(peft_config, "base_model_name_or_path", None) or \
        getattr(getattr(plain, "config", None), "name_or_path", None) or None
    config = lora_config(updates, heads, name, getattr(peft_config, "task_type", None))
    tensors = {}
    for module, update in updates.items():
        a, b = lora_factors(update)
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a                  # (k, d_in)
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b                  # (d_out, k)
    for key, p in heads.items():
        tensors[f"{KEY_PREFIX}{key}"] = p.detach().cpu().contiguous()
    provenance = {"exported_by": "rowsft.save_as_lora", "units": sorted({u.unit for u in updates.values()})}
    with atomic_files_into(path, last=[CONFIG_NAME]) as tmp:
        config.save_pretrained(str(tmp))
        safetensors_torch.save_file(tensors, str(tmp / WEIGHTS_NAME),
                                    metadata={"format": "pt", "rowsft": json.dumps(provenance)})
    return Path(path)


__all__ = ["save_as_lora", "collect_updates", "lora_factors", "lora_config", "is_lora_folder", "Update"]
