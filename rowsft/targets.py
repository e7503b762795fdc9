"""Finding the linear-like modules that rowsft can tune, and the neurons that couple them.

A *target* is a module computing ``y = W x (+ b)``: ``torch.nn.Linear`` (weight ``d_out × d_in``)
or transformers' GPT-2 ``Conv1D`` (weight stored transposed, ``d_in × d_out``). Everything in
rowsft talks about weights in the ``(d_out, d_in)`` orientation; :func:`weight_out_in` gives that
view without copying.

bitsandbytes' quantized linear layers (``Linear4bit``: nf4/fp4, ``Linear8bitLt``: int8) are targets
too: they subclass ``nn.Linear``, but their stored weight is packed (``Params4bit`` holds two 4-bit
codes per byte, shaped ``(d_out·d_in/2, 1)``; ``Int8Params`` holds int8 codes) and their scales live
beside it (absmax per block of 64 weights, or one scale per row). For them :func:`linear_shape` reads
``(out_features, in_features)``, :func:`weight_out_in` returns a freshly *dequantized* float copy of
the weight (transient: the caller drops it after use, so scoring holds one layer's dense weight at a
time, never the whole model's), :func:`weight_dtype` the float dtype of that copy, and
:func:`quantization_tensors` the packed codes plus their scales (for the memory accounting).
bitsandbytes is never imported here: a quantized layer can only exist once it is loaded.

A *neuron group* couples rows and columns across layers, as structural pruning does: an MLP neuron
``j`` is row ``j`` of the up/gate projections and column ``j`` of the down projection; an attention
head is a block of rows of q/k/v and the matching block of columns of the output projection
(grouped-query attention: one group per key/value head, carrying all query heads that share it).
"""
from __future__ import annotations

import numbers
import re
import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

try:  # transformers' GPT-2 style layer: y = x @ W + b with W of shape (d_in, d_out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a core dependency
    Conv1D = ()

# Output heads and embeddings projections that "all-linear" leaves alone (as PEFT does).
OUTPUT_HEAD_NAMES = ("lm_head", "embed_out", "score", "classifier", "qa_outputs", "pooler.dense", "cls.predictions")

UNITS = ("row", "column", "element", "group")


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` (bitsandbytes' quantized layers included: they subclass it) and HF ``Conv1D``
    (and rowsft's own wrappers of them)."""
    base = getattr(module, "base_layer", None)
    if base is not None and is_linear_like(base):
        return True
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True when the stored weight is ``(d_in, d_out)`` (HF Conv1D)."""
    return bool(Conv1D) and isinstance(module, Conv1D)


# ---------------------------------------------------------------- quantized layers (bitsandbytes)
def _bnb_linear_classes() -> tuple[type, type] | None:
    """``(Linear4bit, Linear8bitLt)`` once bitsandbytes is imported, else None (then no quantized layer exists)."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is None:
        return None
    return bnb_nn.Linear4bit, bnb_nn.Linear8bitLt


def quantization_kind(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes quantized linear layer (or a wrapper of one), else None."""
    module = getattr(module, "base_layer", module)
    classes = _bnb_linear_classes()
    if classes is None:
        return None
    if isinstance(module, classes[0]):
        return str(getattr(module.weight, "quant_type", "fp4"))
    if isinstance(module, classes[1]):
        return "int8" if module.weight.dtype == torch.int8 else None   # has_fp16_weights: a plain float weight
    return None


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` with quantized weights (or a wrapper of one)."""
    return quantization_kind(module) is not None


def int8_scales(module: nn.Module) -> torch.Tensor:
    """The per-row scales ``(d_out,)`` of an int8 layer (bitsandbytes moves them from the weight to the
    layer's matmul state on the first forward)."""
    scales = getattr(module.weight, "SCB", None)
    return module.state.SCB if scales is None else scales


def _quant_state_4bit(module: nn.Module):
    """The 4-bit layer's QuantState in the standard packing (the CPU inference packing, which bitsandbytes
    may switch a layer to in eval mode, is undone first, as its own state-dict saving does)."""
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnb_functional
        weight.data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = module.quant_state = state
    return state


def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new ``(d_out, d_in)`` float tensor holding the quantized layer's weight as its own forward sees it
    (nf4/fp4: codes times their block's absmax; int8: codes times ``scale / 127``), in ``dtype`` (default:
    `weight_dtype`). The same arithmetic as bitsandbytes' CPU training kernels, so a float layer holding
    this weight computes the same products."""
    import bitsandbytes.functional as bnb_functional
    module = getattr(module, "base_layer", module)
    kind = quantization_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized linear layer")
    with torch.no_grad():
        if kind == "int8":
            scale = int8_scales(module).unsqueeze(1).mul(1.0 / 127.0)                     # (d_out, 1)
            weight = module.weight.data.to(torch.float32).mul_(scale)                    # (d_out, d_in)
        else:
            weight = bnb_functional.dequantize_4bit(module.weight.data, _quant_state_4bit(module))  # (d_out, d_in)
    return weight.to(dtype or weight_dtype(module))


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype of the layer's weight as rowsft computes with it: the stored dtype, or for a quantized
    layer the dtype it was quantized from (4-bit) / its compute dtype (int8: float32, or the bias's dtype)."""
    module = getattr(module, "base_layer", module)
    kind = quantization_kind(module)
    if kind is None:
        return module.weight.dtype
    if kind == "int8":
        bias = getattr(module, "bias", None)
        return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32
    state = getattr(module.weight, "quant_state", None)
    return getattr(state, "original_dtype", None) or getattr(state, "dtype", None) or torch.float32


def quantization_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized layer keeps beside its parameters (absmax per block, the code table, the nested
    statistics; int8: the row scales): what its weight costs on top of the packed codes. Empty for other layers."""
    module = getattr(module, "base_layer", module)
    kind = quantization_kind(module)
    if kind is None:
        return []
    if kind == "int8":
        return [t for t in (getattr(module.weight, "SCB", None), getattr(module.state, "SCB", None))
                if torch.is_tensor(t)]
    state = module.weight.quant_state
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return [t for t in tensors if torch.is_tensor(t)]


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a linear-like module (a quantized one: its logical shape, not the packed storage's)."""
    module = getattr(module, "base_layer", module)
    if not is_linear_like(module):
        raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers Conv1D)")
    if is_quantized(module):
        return int(module.out_features), int(module.in_features)
    w = module.weight
    return (w.shape[1], w.shape[0]) if is_transposed(module) else (w.shape[0], w.shape[1])


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as a ``(d_out, d_in)`` tensor (a view for Conv1D, no copy; for a quantized layer a freshly
    dequantized copy, `dequantized_weight`, to be dropped after use)."""
    module = getattr(module, "base_layer", module)
    if is_quantized(module):
        return dequantized_weight(module)
    return module.weight.t() if is_transposed(module) else module.weight


def is_output_head(name: str) -> bool:
    return any(name == h or name.endswith("." + h) or name.startswith(h + ".") or ("." + h + ".") in ("." + name + ".")
               for h in OUTPUT_HEAD_NAMES)


_LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module name (``model.layers.3.mlp.up_proj`` → 3)."""
    m = _LAYER_INDEX.search("." + name + ".")
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The last component of a module name (``up_proj``, ``query``, ``c_fc``, ...); for ``*.dense`` the
    parent is kept (``attention.output.dense`` → ``attention.output.dense``) so BERT's layers stay apart,
    and so for GPT-2's ``attn.c_proj`` / ``mlp.c_proj``."""
    parts = name.split(".")
    if parts[-1] == "dense" and len(parts) >= 3:
        return ".".join(p for p in parts[-3:] if not p.isdigit())
    if parts[-1] == "c_proj" and len(parts) >= 2:  # GPT-2 has attn.c_proj and mlp.c_proj
        return ".".join(parts[-2:])
    return parts[-1]


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear-like module, by name, in model order (wrappers count once, not their inner base)."""
    found: dict[str, nn.Module] = {}
    inside = None  # named_modules is depth-first: a wrapper's children follow it directly
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if is_linear_like(module):
            found[name] = module
            inside = name + "."
    return found


def find_targets(model: nn.Module, targets: str | Iterable[str] = "all-linear",
                 layers: Iterable[int] | None = None, include_heads: bool = False) -> dict[str, nn.Module]:
    """Select target modules.

    ``targets``: ``"all-linear"`` (every linear layer but output heads), ``"attention"``, ``"mlp"``, a
    list of module types or exact names (``["q_proj", "v_proj"]``), or a regular expression string
    (``r".*\\.mlp\\..*"``). ``layers``: keep only these block indices.
    """
    candidates = linear_modules(model)
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no linear layers (nn.Linear or transformers Conv1D) to tune")
    check_targets(targets)
    if isinstance(targets, str) and targets in ("all-linear", "attention", "mlp"):
        chosen = {n: m for n, m in candidates.items() if include_heads or not is_output_head(n)}
        if targets != "all-linear":
            groups = neuron_groups(model)
            family = {mem.module for g in groups if g.kind == targets for mem in g.members}
            chosen = {n: m for n, m in chosen.items() if n in family}
    elif isinstance(targets, str):
        pattern = re.compile(targets)                                  # valid: check_targets compiled it
        chosen = {n: m for n, m in candidates.items() if pattern.fullmatch(n) or module_type(n) == targets}
    else:
        wanted = list(targets)
        def matches(n: str, w: str) -> bool:  # exact name, module type, or a dotted suffix ("c_proj", "mlp.c_proj")
            return n == w or module_type(n) == w or n.endswith("." + w)
        chosen = {n: m for n, m in candidates.items() if any(matches(n, w) for w in wanted)}
        missing = [w for w in wanted if not any(matches(n, w) for n in chosen)]
        if missing:
            raise ValueError(f"no linear module matches {missing}; module types here: {sorted(set(map(module_type, candidates)))}")
    if layers is not None:
        keep = check_layer_indices(layers, sorted({layer_index(n) for n in candidates} - {None}))
        chosen = {n: m for n, m in chosen.items() if layer_index(n) in keep}
    if not chosen:
        raise ValueError(f"targets={targets!r} with layers={layers!r} matches no linear layer; "
                         f"module types here: {sorted(set(map(module_type, candidates)))}")
    return chosen


def check_targets(targets) -> None:
    """A TypeError saying what ``targets`` accepts when it is neither a string nor strings; a ValueError
    when a string is none of the keywords and no valid regular expression."""
    ok = isinstance(targets, str) or (isinstance(targets, Iterable) and not isinstance(targets, (bytes, dict)))
    if ok and not isinstance(targets, str):
        targets_list = list(targets)
        ok = bool(targets_list) and all(isinstance(t, str) for t in targets_list)
    if not ok:
        raise TypeError(f"targets must be 'all-linear', 'attention', 'mlp', a regular expression string, or a "
                        f"non-empty list of module types / names such as ['q_proj', 'v_proj']; got {targets!r}")
    if isinstance(targets, str) and targets not in ("all-linear", "attention", "mlp"):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r} is neither 'all-linear', 'attention', 'mlp' nor a valid regular expression ({e}); fix the pattern or pass a list of module types") from None


def check_layer_indices(layers, known: list[int]) -> set[int]:
    """``layers`` as a set of block indices: a ValueError naming any entry that is not a whole number,
    or that names a block the model (or the scores) lack, with the indices that exist (``known``)."""
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a list of block indices such as [0, 1], got {layers!r}")
    entries = list(layers)
    bad = [x for x in entries if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad:
        raise ValueError(f"layers must hold whole block indices (ints) such as {known[:2] or [0]}; "
                         f"{bad} are not (indices are never rounded)")
    unknown = sorted({int(x) for x in entries} - set(known))
    if unknown:
        raise ValueError(f"layers {unknown} do not exist; block indices here: {known}. Drop the unknown ones")
    return {int(x) for x in entries}


# ---------------------------------------------------------------- coupled neuron groups
@dataclass(frozen=True)
class GroupMember:
    """One module's share of a neuron group: neuron ``j`` owns, for each offset ``o``, the indices
    ``o + j*block … o + (j+1)*block - 1`` along ``unit`` (rows or columns of the weight)."""
    module: str
    unit: str          # "row" or "column"
    block: int = 1
    offsets: tuple[int, ...] = (0,)

    def indices(self, neurons: torch.Tensor) -> torch.Tensor:
        """Row/column indices of this member for the given neuron ids (sorted)."""
        neurons = torch.as_tensor(neurons, dtype=torch.long).reshape(-1, 1)
        within = torch.arange(self.block).reshape(1, -1)
        parts = [(o + neurons * self.block + within).reshape(-1) for o in self.offsets]
        return torch.sort(torch.cat(parts)).values


@dataclass(frozen=True)
class NeuronGroup:
    """A family of coupled neurons in one block: ``size`` neurons, each spanning all ``members``."""
    name: str                  # e.g. "model.layers.3.mlp"
    kind: str                  # "mlp" or "attention"
    size: int                  # number of neurons (MLP width, or key/value heads)
    members: tuple[GroupMember, ...] = field(default_factory=tuple)


def _cfg(model, *names, default=None):
    cfg = getattr(model, "config", None)
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def neuron_groups(model: nn.Module) -> list[NeuronGroup]:
    """Coupled neuron groups of Llama/Mistral/Qwen-style, BERT and GPT-2 blocks (empty if unknown)."""
    mods = linear_modules(model)
    heads = _cfg(model, "num_attention_heads", "n_head")
    kv_heads = _cfg(model, "num_key_value_heads", default=heads)
    groups: list[NeuronGroup] = []
    prefixes = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in mods if "." in n))  # parents, in model order
    for p in prefixes:
        has = lambda t: f"{p}.{t}" in mods  # noqa: E731
        # Llama-style MLP: gate/up rows + down column
        if has("up_proj") and has("down_proj"):
            width = linear_shape(mods[f"{p}.up_proj"])[0]
            members = [GroupMember(f"{p}.{t}", "row") for t in ("gate_proj", "up_proj") if has(t)]
            members.append(GroupMember(f"{p}.down_proj", "column"))
            groups.append(NeuronGroup(p, "mlp", width, tuple(members)))
        # Llama-style attention (grouped-query aware): one group per key/value head
        if has("q_proj") and has("o_proj") and heads:
            d_q = linear_shape(mods[f"{p}.q_proj"])[0]
            head_dim = d_q // heads
            per_kv = heads // kv_heads
            members = [GroupMember(f"{p}.q_proj", "row", head_dim * per_kv)]
            members += [GroupMember(f"{p}.{t}", "row", head_dim) for t in ("k_proj", "v_proj") if has(t)]
            members.append(GroupMember(f"{p}.o_proj", "column", head_dim * per_kv))
            groups.append(NeuronGroup(p, "attention", kv_heads, tuple(members)))
        # GPT-2: fused c_attn (q|k|v rows) + c_proj columns; c_fc rows + c_proj columns
        if has("c_attn") and has("c_proj") and heads:
            d = linear_shape(mods[f"{p}.c_attn"])[1]
            hd = d // heads
            groups.append(NeuronGroup(p, "attention", heads, (
                GroupMember(f"{p}.c_attn", "row", hd, (0, d, 2 * d)), GroupMember(f"{p}.c_proj", "column", hd))))
        if has("c_fc") and has("c_proj"):
            width = linear_shape(mods[f"{p}.c_fc"])[0]
            groups.append(NeuronGroup(p, "mlp", width, (GroupMember(f"{p}.c_fc", "row"), GroupMember(f"{p}.c_proj", "column"))))
        # BERT: attention.self.{query,key,value} rows + attention.output.dense columns
        if p.endswith("attention.self") and has("query") and heads:
            base = p[: -len(".self")]
            if f"{base}.output.dense" in mods:
                hd = linear_shape(mods[f"{p}.query"])[0] // heads
                members = tuple(GroupMember(f"{p}.{t}", "row", hd) for t in ("query", "key", "value") if has(t))
                groups.append(NeuronGroup(base, "attention", heads, members + (GroupMember(f"{base}.output.dense", "column", hd),)))
        # BERT MLP: intermediate.dense rows + output.dense columns (sibling prefixes)
        if p.endswith(".intermediate") and has("dense"):
            block = p[: -len(".intermediate")]
            if f"{block}.output.dense" in mods:
                width = linear_shape(mods[f"{p}.dense"])[0]
                groups.append(NeuronGroup(block + ".mlp", "mlp", width, (
                    GroupMember(f"{p}.dense", "row"), GroupMember(f"{block}.output.dense", "column"))))
    return groups


# ---------------------------------------------------------------- roles
QKV = {"q_proj", "k_proj", "v_proj", "c_attn", "query", "key", "value", "qkv_proj", "Wqkv"}
ATTN_OUT = {"o_proj", "out_proj", "attention.output.dense", "attn.c_proj"}
UP = {"gate_proj", "up_proj", "c_fc", "intermediate.dense", "fc1", "w1", "w3"}
DOWN = {"down_proj", "output.dense", "fc2", "w2", "mlp.c_proj"}


def role(name: str) -> str:
    """``"qkv" | "o" | "up" | "down" | "head" | "other"`` of a linear module name."""
    t = module_type(name)
    if is_output_head(name):
        return "head"
    if t in QKV:
        return "qkv"
    if t in ATTN_OUT or (t == "c_proj" and ".attn." in f".{name}."):
        return "o"
    if t in UP:
        return "up"
    if t in DOWN or t == "c_proj":
        return "down"
    return "other"
