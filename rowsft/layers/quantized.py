"""Sparse updates over a bitsandbytes-quantized frozen base: merging into re-quantized weights, and float export.

A sparse layer over a ``Linear4bit`` (nf4/fp4) or ``Linear8bitLt`` (int8) computes the frozen product with
the quantized module itself, ``y = base_layer(x)`` (bitsandbytes' own forward and backward), and adds its
update into ``y`` through the same autograd functions as any hooked base layer
(`rowsft.layers.autograd.add_sparse_update`); the update is a float tensor (the base's compute dtype, or
``delta_dtype``). Step 0 is therefore the quantized model's own output, bit for bit.

Merging is where a quantized base differs. An update is usually far smaller than one quantization step
(nf4: up to 0.15 × the block's absmax; int8: up to 1/254 of the row's largest weight), so folding it into
the weight and quantizing again mostly rounds it away, or moves weights by a whole step. Hence:

- the default keeps the update as an adapter: `rowsft.merge` refuses a quantized base (`MERGE_REFUSAL`)
  and points to `rowsft.save_adapter` (adapters load on the quantized base or on a float one alike) or to
  the float export;
- ``rowsft.merge(model, requantize=True)`` folds the update into the dequantized weight, quantizes the
  result again with the layer's own scheme and reports the error that introduces (`MergeError`, per
  layer); the merge cannot be undone;
- `float_linear` / ``rowsft.layers.tuner.dequantize_and_merge``: dequantize, merge exactly, and get a plain
  float model (as large as the float model).

Documented bound of a re-quantized merge (checked per element in ``tests/test_quantized.py``): with
``T = W_q + D`` the merged target (``W_q`` the dequantized base weight, ``D`` the update), each element of
the re-quantized weight is within half the widest gap of the code table times its block's new absmax of
``T`` (nf4: 0.152 × absmax, fp4: 0.167 × absmax; blocks of 64 consecutive weights of the row-major
``(d_out, d_in)`` weight; with double quantization, whose stored absmax ``A'`` is itself 8-bit, plus
``|A' - A|``, how far the stored absmax is from the exact one), int8 within ``rowmax / 254`` plus the float16 rounding bitsandbytes applies before
quantizing (``|T| · 2⁻¹¹``). Blocks (int8: rows) the update does not touch come back unchanged; with double
quantization they keep their codes, but their 8-bit absmax may move a little (the absmax of 256 blocks share one
scale and a layer shares one offset), within the same bound.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rowsft.targets import dequantized_weight, int8_scales, linear_shape, quantization_kind

MERGE_REFUSAL = ("{name} wraps a layer quantized to {kind}: merging would re-quantize the weight and round most of the "
                 "update away. Keep the update as an adapter (rowsft.save_adapter: it loads on this quantized base or "
                 "on the float model), export a float model (rowsft.layers.tuner.dequantize_and_merge), or merge into "
                 "re-quantized weights knowingly with rowsft.merge(model, requantize=True), which reports the error")

FLOAT16_ROUNDING = 2.0 ** -11    # relative rounding of float16, which bitsandbytes casts to before int8 quantization
BOUND_SLACK = 1e-5               # relative slack for float32 rounding in quantize/dequantize arithmetic


@dataclass
class MergeError:
    """What re-quantizing a merged weight did to one layer (float figures in the weight's units).

    ``max_abs``: largest ``|M - T|`` over the weight (``M`` re-quantized merge, ``T = W_q + D`` exact target);
    ``relative_to_update``: ``‖M - T‖ / ‖D‖`` (1.0: as much error as update; near 1 when the update is far below
    a quantization step and is rounded away); ``relative_to_weight``: ``‖M - T‖ / ‖T‖``; ``update_kept``:
    ``⟨M - W_q, D⟩ / ‖D‖²``, the share of the update the merged weight carries along its own direction;
    ``within_bound``: every element within the documented bound (module docstring); ``changed_blocks``:
    quantization blocks (int8: rows) whose codes or scale changed."""
    kind: str
    max_abs: float
    relative_to_update: float
    relative_to_weight: float
    update_kept: float
    within_bound: bool
    changed_blocks: int
    blocks: int

    def as_dict(self) -> dict:
        return asdict(self)


def code_half_gap(module: nn.Module) -> float:
    """Half the widest gap between neighbouring values of a 4-bit layer's code table (a fraction of absmax)."""
    code = torch.sort(module.weight.quant_state.code.float().cpu()).values
    return float((code[1:] - code[:-1]).max()) / 2


def requantization_bound(module: nn.Module, target: torch.Tensor) -> torch.Tensor:
    """``(d_out, d_in)``: the most each element of ``target`` may move when quantized with ``module``'s scheme."""
    target = target.float()
    if quantization_kind(module) == "int8":
        rowmax = target.to(torch.float16).float().abs().amax(dim=1, keepdim=True)          # (d_out, 1)
        bound = rowmax / 254 + target.abs() * FLOAT16_ROUNDING
    else:
        blocksize = module.weight.quant_state.blocksize
        flat = target.reshape(-1)
        padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize))
        absmax = padded.view(-1, blocksize).abs().amax(dim=1, keepdim=True)             # (blocks, 1)
        per_block = absmax * code_half_gap(module)
        stored = stored_absmax(module)                                                  # (blocks,)
        if stored is not None:      # double quantization: the codes are scaled by an 8-bit absmax A', not A
            per_block = per_block + (stored.view(-1, 1).to(absmax) - absmax).abs()
        bound = per_block.expand(-1, blocksize).reshape(-1)[:flat.numel()].view(target.shape)
    return bound * (1 + BOUND_SLACK) + target.abs() * BOUND_SLACK


def stored_absmax(module: nn.Module) -> torch.Tensor | None:
    """A 4-bit layer's absmax per block as its dequantization uses it, ``(blocks,)`` float32, when double
    quantization stores it in 8 bits (``quant_state.nested``); None when the absmax are stored exactly."""
    state = module.weight.quant_state
    if not getattr(state, "nested", False):
        return None
    import bitsandbytes.functional as bnb_functional
    return (bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float().reshape(-1)


def _quantized_codes(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` as stored: packed 4-bit codes and block absmax, or int8 codes and row scales."""
    if quantization_kind(module) == "int8":
        return module.weight.data, int8_scales(module)
    return module.weight.data, module.weight.quant_state.absmax


@torch.no_grad()
def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Store the float ``weight (d_out, d_in)`` into the quantized ``module`` with its own scheme (4-bit: same code
    table, block size and storage; int8: row-wise absmax, from float16 as bitsandbytes does)."""
    import bitsandbytes.functional as bnb_functional
    from bitsandbytes.nn import Params4bit
    if tuple(weight.shape) != linear_shape(module):
        raise ValueError(f"requantize: weight of shape {tuple(weight.shape)} for a layer of {linear_shape(module)}")
    if quantization_kind(module) == "int8":
        codes, scales, _ = bnb_functional.int8_vectorwise_quant(weight.to(module.weight.device, torch.float16))
        module.weight.data = codes
        module.weight.CB, module.weight.SCB = None, None
        module.state.CB, module.state.SCB = codes, scales
        return
    old = module.weight
    state = old.quant_state
    packed, new_state = bnb_functional.quantize_4bit(
        weight.to(old.device, state.dtype), blocksize=state.blocksize, compress_statistics=state.nested,
        quant_type=state.quant_type, quant_storage=getattr(old, "quant_storage", torch.uint8))
    module.weight = Params4bit(packed, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
                               compress_statistics=state.nested, quant_type=state.quant_type,
                               quant_storage=getattr(old, "quant_storage", torch.uint8), module=module,
                               bnb_quantized=True)
    module.quant_state = new_state


@torch.no_grad()
def merge_requantized(module: nn.Module, update: torch.Tensor, fold) -> MergeError:
    """Fold a sparse update into ``module``'s dequantized weight and quantize the result again; returns the error.

    ``update``: the update as a dense ``(d_out, d_in)`` tensor (for the error figures); ``fold(weight)``: adds the
    update into a float ``(d_out, d_in)`` weight in place (`rowsft.layers.sparse.fold_update`)."""
    kind = quantization_kind(module)
    base = dequantized_weight(module, torch.float32)                                     # W_q (d_out, d_in)
    target = base.clone()
    fold(target)                                                                         # T = W_q + D
    codes_before, scales_before = (t.clone() for t in _quantized_codes(module))
    requantize(module, target)
    merged = dequantized_weight(module, torch.float32)                                   # M
    error = merged - target
    dense = update.to(torch.float32)
    update_norm = float(torch.linalg.vector_norm(dense))
    error_norm = float(torch.linalg.vector_norm(error))
    within = bool((error.abs() <= requantization_bound(module, target)).all())
    changed, blocks = _changed_blocks(module, kind, codes_before, scales_before)
    kept = float((merged - base).reshape(-1) @ dense.reshape(-1)) / update_norm ** 2 if update_norm else 1.0
    return MergeError(kind=kind, max_abs=float(error.abs().max()),
                      relative_to_update=error_norm / update_norm if update_norm else 0.0,
                      relative_to_weight=error_norm / max(float(torch.linalg.vector_norm(target)), 1e-30),
                      update_kept=kept, within_bound=within, changed_blocks=changed, blocks=blocks)


def _changed_blocks(module, kind, codes_before, scales_before) -> tuple[int, int]:
    codes, scales = _quantized_codes(module)
    if kind == "int8":
        rows = (codes != codes_before).any(dim=1) | (scales != scales_before)
        return int(rows.sum()), int(rows.numel())
    per_block = module.weight.quant_state.blocksize // 2                                # bytes of packed codes per block
    flat, before = codes.reshape(-1), codes_before.reshape(-1)
    pad = (-flat.numel()) % per_block
    differ = torch.nn.functional.pad(flat != before, (0, pad)).view(-1, per_block).any(dim=1)
    differ = differ[:scales.numel()] | (scales != scales_before)
    return int(differ.sum()), int(differ.numel())


@torch.no_grad()
def float_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` holding the quantized ``module``'s dequantized weight and its bias (frozen), in
    ``dtype`` (default: the layer's float dtype), on the module's device."""
    d_out, d_in = linear_shape(module)
    weight = dequantized_weight(module, dtype)                                          # (d_out, d_in)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias.detach().to(weight.dtype).clone()
    linear.requires_grad_(False)
    return linear


__all__ = ["MERGE_REFUSAL", "MergeError", "merge_requantized", "requantize", "requantization_bound",
           "float_linear", "code_half_gap", "stored_absmax"]
