"""`predict`: the memory of a training step from the model's shapes alone (no forward pass), for
budget sliders that must answer in milliseconds.

Weights, trainable, gradients, optimizer and indices are exact. Activations follow an analytic model
of what autograd saves in a transformer block, per token (``s`` = bytes of the model dtype, h = hidden,
h_kv = key/value width, i = MLP width, n = heads, T = sequence length, V = vocabulary)::

    norm      RMSNorm: its input upcast to fp32 h·4 + 1 fp32 statistic (+ h·s for a trained weight);
              LayerNorm: h·s + 2 statistics
    inputs    h·s for the q/k/v input, the o input, the up/gate input (i·s for the down input) of each
              linear layer that trains (weight or adapter; a column adapter keeps only its k columns;
              with fused attention the o input is the kernel's saved output, counted once);
              LoRA adds r·s per adapted layer (the A output). rowsft row and element updates keep
              nothing for a q/k/v or up/gate input whose norm keeps its own input (float32 or
              LayerNorm, gradients reaching it), nor for a down input whose MLP keeps the factors
              (`rowsft.layers.rebuild`: the input is rebuilt in backward)
    attention fused kernels (sdpa flash / efficient): q, k, v, output = (2h + 2h_kv)·s + n·4 (log-sum-exp);
              on padded batches attention gets a mask, and transformers then repeats k and v to every head
              before the kernel (no native GQA with a mask) and the kernel keeps the (B, 1, T, T) mask of each
              block: 4h·s + n·4 + T·s
              math path (eager, or sdpa with attention dropout on CPU): (h + 2h_kv + 3·n·T)·s
              (probabilities, dropout mask, dropped probabilities; 1·n·T without dropout; torch's
              CPU math path computes in fp32, so 4 bytes instead of s there)
    MLP       gated SiLU: 3i·s (gate out, SiLU out, up out; i·s when only up/down train in the first
              trained block); GPT-2 gelu_new: 4i·s; exact GELU: i·s
    dropout   h·s per residual dropout in train mode (GPT-2, BERT: 2 per block, 1 after the embeddings)
    head      causal LM: final norm + V·4 (fp32 log-probabilities) + 8 (labels); full fine-tuning adds
              the lm_head input h·s and the input ids (8)

A block saves its attention and MLP internals only once gradients flow through it: from the first
block that trains on (all blocks for full fine-tuning). Pre-norm blocks (Llama, GPT-2) save their
first norm only when gradients reach the block input; post-norm blocks (BERT) save both norms of
every trained block. Gradient checkpointing is not modelled.

Quantized bases (bitsandbytes): the weights are the packed codes (4-bit: half a byte per weight; int8: one)
plus their statistics (4-bit: one float32 absmax per block of 64 weights, or one byte with double quantization plus a
float32 absmax per 256 of those, and a 16-entry code table; int8:
one float32 scale per row), exactly as `rowsft.memory.breakdown` counts them; the trainable part is priced
in the float dtype the layers compute in. A 4-bit layer keeps only its packed weight for backward, so the
formula above holds unchanged; the transient adds the largest quantized layer's weight dequantized to its
float dtype, which each of its forwards and backwards makes and frees. An int8 layer keeps its input for
backward whenever the input needs a gradient, trained or not (bitsandbytes' int8 matmul holds it in its
context), so under an int8 base every linear input that gradients reach counts whole, and rowsft layers keep
their inputs instead of rebuilding them (`rowsft.layers.sparse`).

Calibrated against `rowsft.memory.breakdown` on the tiny Llama, GPT-2 and BERT models (float32, CPU)
for full, row, column, element and LoRA training and for single-layer selections: within 3% there;
the documented (and tested) tolerance is 25%.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from rowsft.layers.sparse import input_kept_elsewhere, is_sparse_layer, kept_input_width
from rowsft.memory.measure import dequantized_weight_bytes, quantization_state
from rowsft.memory.report import OPTIMIZER_MOMENTS, MemoryReport
from rowsft.selection.choice import Selection
from rowsft.targets import find_targets, layer_index, linear_shape, module_type, quantization_kind, role


def _cfg(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


@dataclass
class Shapes:
    """The figures of a model that the activation formula needs."""
    layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    heads: int
    vocab: int
    rms_norm: bool
    post_norm: bool        # BERT-style: LayerNorm after each residual add
    mlp: str               # "gated" | "gelu_new" | "gelu"
    math_attention: bool   # attention probabilities are materialised
    attention_bytes: int   # bytes per element inside the attention (torch's CPU math path computes in fp32)
    attn_dropout: bool
    resid_dropout: bool
    causal_lm: bool
    dtype_bytes: int
    int8: bool = False     # bitsandbytes int8 linear layers, which keep their inputs for backward

    @classmethod
    def of(cls, model: torch.nn.Module) -> "Shapes":
        config = getattr(model, "config", None)
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        param = next(model.parameters()) if param is None else param     # the float dtype, past packed codes
        hidden = _cfg(config, "hidden_size", "n_embd", "d_model", default=0)
        heads = _cfg(config, "num_attention_heads", "n_head", default=1)
        kv_heads = _cfg(config, "num_key_value_heads", default=heads)
        names = [n for n, _ in model.named_modules()]
        act = str(_cfg(config, "hidden_act", "activation_function", default="gelu"))
        attn_p = float(_cfg(config, "attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", default=0.0) or 0.0)
        resid_p = float(_cfg(config, "resid_pdrop", "hidden_dropout_prob", "hidden_dropout", default=0.0) or 0.0)
        impl = str(getattr(config, "_attn_implementation", "eager") or "eager")
        cpu_math = impl != "eager" and attn_p > 0 and param.device.type != "cuda"
        math_attention = impl == "eager" or cpu_math
        return cls(layers=int(_cfg(config, "num_hidden_layers", "n_layer", default=0)), hidden=int(hidden),
                   kv_hidden=int(hidden * kv_heads // max(1, heads)),
                   intermediate=int(_cfg(config, "intermediate_size", "n_inner", default=None) or 4 * hidden),
                   heads=int(heads), vocab=int(_cfg(config, "vocab_size", default=0)),
                   rms_norm=any("RMSNorm" in type(m).__name__ for m in model.modules()),
                   post_norm=any(n.endswith("output.LayerNorm") for n in names),
                   mlp="gated" if any(n.endswith("gate_proj") for n in names) else ("gelu_new" if "new" in act else "gelu"),
                   math_attention=math_attention, attention_bytes=4 if cpu_math else param.element_size(),
                   attn_dropout=attn_p > 0, resid_dropout=resid_p > 0,
                   causal_lm=hasattr(model, "lm_head") or "CausalLM" in type(model).__name__ or "LMHead" in type(model).__name__,
                   dtype_bytes=param.element_size(),
                   int8=any(quantization_kind(m) == "int8" for m in model.modules()))


def head_positions(seq_len: int, logit_positions: int | None) -> int:
    """Positions per example whose logits are computed: all ``seq_len``, or ``logit_positions`` of them."""
    return seq_len if logit_positions is None else min(int(logit_positions), seq_len)


def activation_formula(shapes: Shapes, adapted: dict[str, tuple], batch_size: int, seq_len: int, full: bool,
                       extra_per_token: int = 0, logit_positions: int | None = None, padded: bool = True) -> int:
    """Bytes saved for backward by one forward (see the module docstring). ``adapted``: linear module
    name → ``(width, d_in)`` or ``(width, d_in, rebuildable)``: elements per token its trained part keeps
    (d_in; k for column adapters), and whether it keeps a `rowsft.layers.rebuild` source instead where there is one;
    ``full``: every weight trains. ``extra_per_token``: further bytes per token (LoRA's A outputs).
    ``logit_positions``: positions per example that reach the LM head (None: all ``seq_len``; fewer
    with `rowsft.lean_loss`, which keeps only the labelled ones). ``padded``: the batches carry padding, so a fused
    attention kernel reads k and v repeated to every head and keeps the mask (see the module docstring)."""
    s, h, kv, i, n, T = shapes.dtype_bytes, shapes.hidden, shapes.kv_hidden, shapes.intermediate, shapes.heads, seq_len
    # transformers' RMSNorm upcasts its input to fp32 (and keeps that copy); LayerNorm keeps its own
    norm = (h * 4 + 4 + (h * s if full else 0)) if shapes.rms_norm else (h * s + 2 * min(s, 4))
    if shapes.math_attention:
        attention = ((h + 2 * kv) + (3 if shapes.attn_dropout else 1) * n * T) * shapes.attention_bytes
    elif padded:      # a mask: k and v repeated to every head (h wide), the (B, 1, T, T) mask kept (T per token)
        attention = (4 * h + T) * s + n * 4
    else:
        attention = (2 * h + 2 * kv) * s + n * 4
    mlp = {"gated": 3 * i, "gelu_new": 4 * i, "gelu": i}[shapes.mlp] * s
    dropout = h * s if shapes.resid_dropout else 0

    # per block and input role: [the whole input, if a member keeps it (q/k/v and gate/up share one), Σ subsets
    # (column layers' k columns, lean element layers' touched columns: each a tensor of its own)], then the
    # same two for members that keep a rebuild source instead when the frozen graph keeps one
    per_layer: dict[int, dict[str, list[int]]] = {}
    gated_layers, trained_types = set(), {}
    for name, (width, d_in, *rest) in adapted.items():
        r = role(name)
        if r == "head":
            continue
        layer = -1 if layer_index(name) is None else layer_index(name)
        slot = per_layer.setdefault(layer, {}).setdefault(r, [0, 0, 0, 0])
        at = 2 if rest and rest[0] else 0
        if width >= d_in:
            slot[at] = d_in
        else:
            slot[at + 1] += width
        if module_type(name) == "gate_proj":
            gated_layers.add(layer)
        trained_types.setdefault(layer, set()).add(module_type(name))
    norm_keeps_input = s == 4 or not shapes.rms_norm     # an RMSNorm upcasts a half input: that copy is what it keeps
    first = 0 if full else min((l for l in per_layer if l >= 0), default=shapes.layers)
    per_token = extra_per_token
    for layer in range(shapes.layers):
        slots = ({"qkv": [h, 0, 0, 0], "o": [h, 0, 0, 0], "up": [h, 0, 0, 0], "down": [i, 0, 0, 0]} if full
                 else per_layer.get(layer, {}))
        flowing = full or layer > first                          # gradients reach the block's input
        attn_core = flowing or "qkv" in slots                    # attention internals are saved
        res_mid = attn_core or "o" in slots                      # the mid-block residual needs grad
        mlp_core = res_mid or "up" in slots
        types = trained_types.get(layer, set())
        rebuilt = {"qkv": flowing and norm_keeps_input, "up": res_mid and norm_keeps_input, "o": False,
                   "down": mlp_core and (shapes.mlp != "gated" or res_mid or {"gate_proj", "up_proj"} <= types)}
        if shapes.int8:     # every int8 layer whose input needs a gradient keeps that input itself
            reached = {"qkv": (flowing, h), "o": (attn_core, h), "up": (res_mid, h), "down": (mlp_core, i)}
            slots = {r: [max(slots.get(r, [0] * 4)[0], width) if needed else slots.get(r, [0] * 4)[0],
                         *slots.get(r, [0] * 4)[1:]] for r, (needed, width) in reached.items()}
            rebuilt = dict.fromkeys(rebuilt, False)
        if attn_core and not shapes.math_attention and "o" in slots:
            slots = {**slots, "o": [0, slots["o"][1], 0, slots["o"][3]]}   # the whole o input: the kernel's saved output
        for r, (whole, part, rb_whole, rb_part) in slots.items():
            per_token += (whole + part if rebuilt.get(r) else max(whole, rb_whole) + part + rb_part) * s
        per_token += attention + dropout if attn_core else 0
        if shapes.post_norm:
            per_token += (norm if res_mid else 0) + (norm if mlp_core else 0)
        else:
            per_token += (norm if flowing else 0) + (norm if res_mid else 0)
        if mlp_core:
            gate_only = shapes.mlp == "gated" and not res_mid and layer not in gated_layers
            per_token += (i * s if gate_only else mlp) + dropout  # a frozen gate keeps only the SiLU output
    tokens = batch_size * seq_len
    head = 0
    if first < shapes.layers:
        if shapes.causal_lm:
            per_token += norm
            per_position = shapes.vocab * 4 + 8 + (h * s if full else 0)
            head = batch_size * head_positions(seq_len, logit_positions) * per_position
        if full:  # input ids kept by the embedding backward, embedding dropout (and LayerNorm)
            per_token += 8 + dropout + (norm if shapes.post_norm else 0)
    return int(tokens * per_token + head)


def _adapter_param_names(model) -> set[int]:
    """ids of parameters that belong to adapters already applied (rowsft updates, LoRA factors)."""
    ids = set()
    for module in model.modules():
        if is_sparse_layer(module):
            for attr in ("delta", "values", "bias_delta"):
                p = getattr(module, attr, None)
                if isinstance(p, torch.nn.Parameter):
                    ids.add(id(p))
    for name, p in model.named_parameters():
        if "lora_" in name:
            ids.add(id(p))
    return ids


_TARGETS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _target_shapes(model: torch.nn.Module, targets) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of ``find_targets(model, targets)``, cached per model while its
    module count stays the same (a slider calls `predict` many times on one model)."""
    key = (repr(targets), sum(1 for _ in model.modules()))
    cached = _TARGETS_CACHE.get(model)
    if cached is None or cached[0] != key:
        cached = (key, {n: linear_shape(m) for n, m in find_targets(model, targets).items()})
        _TARGETS_CACHE[model] = cached
    return cached[1]


def _index_bytes(choice) -> int:
    d_out, d_in = choice.shape
    per = 4 if choice.unit == "element" and d_out * d_in < 2 ** 31 else 8
    return choice.k * per


PREDICTOR_VERSION = 2    # 1: before the padded term (fused attention on padded batches, session 13); 2: with it.
                         # Bump when `predict` changes what it returns for the same inputs; stored predictions
                         # (the budget explorer's cache) with another version are computed again.


def predict(model: torch.nn.Module, selection_or_method, batch_size: int, seq_len: int, optimizer: str = "adamw",
            targets="all-linear", logit_positions: int | None = None, padded: bool = True):
    """Predicted `MemoryReport` of training ``model`` with ``selection_or_method`` on batches of
    ``batch_size × seq_len`` tokens, without running the model.

    ``selection_or_method``: a `Selection` (rowsft sparse updates, in the model's dtype), ``"full"``,
    ``"lora"`` (rank 8) or ``("lora", rank)`` (LoRA on ``targets``; adapters in float32 over a
    half-precision model, as peft does by default). ``logit_positions``: positions per example whose
    logits are computed (None: all ``seq_len``, as ``model(**batch)``; the labelled ones under
    `rowsft.lean_loss`, e.g. 1 for a one-token answer). ``padded``: whether the batches carry padding, as
    `rowsft.data.batches` pads each batch to its longest example (default); then attention gets a mask, with which
    transformers repeats k and v to every head and the kernel keeps the mask, ``(B, 1, T, T)`` per block (on
    SmolLM2-135M at 4 × 256 tokens, 120 MiB more than without padding). False for batches with no padding.
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if optimizer not in OPTIMIZER_MOMENTS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_MOMENTS)}, got {optimizer!r}")
    shapes = Shapes.of(model)
    s = shapes.dtype_bytes
    adapter_ids = _adapter_param_names(model)
    seen, base = set(), 0
    frozen = [p for p in model.parameters() if id(p) not in adapter_ids] + quantization_state(model)
    for p in frozen:                                          # quantized layers: packed codes, then their statistics
        key = p.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            base += p.untyped_storage().nbytes()
    full, extra, indices = False, 0, 0
    spec = selection_or_method
    if isinstance(spec, Selection):
        if not spec.layers:
            raise ValueError("the selection names no layer; pick at least one layer and a budget above zero")
        trainable = spec.trainable_parameters * s
        adapted = {name: (kept_input_width(c.unit, c.indices, c.shape[1], not input_kept_elsewhere(name)), c.shape[1],
                          c.unit != "column" and not shapes.int8)
                   for name, c in spec.layers.items()}   # as the layers built from it will keep
        indices = sum(_index_bytes(c) for c in spec.layers.values())
        units = sorted({c.unit for c in spec.layers.values()})
        method = "rowsft-" + "/".join(units)
    elif spec == "full":
        full, adapted, method = True, {}, "full"
        trainable = base
    elif spec == "lora" or (isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] == "lora"):
        rank = 8 if spec == "lora" else int(spec[1])
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        lora_bytes = 4 if s < 4 else s
        shapes_of = _target_shapes(model, targets)
        trainable = sum(rank * (d_out + d_in) for d_out, d_in in shapes_of.values()) * lora_bytes
        adapted = {name: (d_in, d_in) for name, (d_out, d_in) in shapes_of.items()}
        extra = rank * lora_bytes * len(shapes_of)
        method = f"lora-r{rank}"
        if not shapes.causal_lm:  # peft's SEQ_CLS task also trains (a copy of) the classification head
            head = [p for n, p in model.named_parameters() if {"classifier", "score"} & set(n.split("."))
                    and "original_module" not in n and "lora_" not in n]
            head_bytes = sum(p.numel() * p.element_size() for p in head)
            trainable += head_bytes
            if any("modules_to_save" in n for n, _ in model.named_parameters()):
                base -= head_bytes  # the copy exists already; counted below with the trainable part
    else:
        raise ValueError(f"selection_or_method must be a rowsft Selection, 'full', 'lora' or ('lora', rank); "
                         f"got {spec!r}")
    activations = activation_formula(shapes, adapted, batch_size, seq_len, full, extra_per_token=extra,
                                     logit_positions=logit_positions, padded=padded)
    # gradients of the fp32 log-probabilities and of the logits at the start of backward
    labels = int(_cfg(getattr(model, "config", None), "num_labels", default=0) or 0)
    outputs = head_positions(seq_len, logit_positions) * shapes.vocab if shapes.causal_lm else labels
    transient = batch_size * outputs * (4 + s) + dequantized_weight_bytes(model)   # + a quantized layer's float weight
    weights = base if full else base + trainable
    return MemoryReport(weights=weights, trainable=trainable, gradients=trainable, optimizer=OPTIMIZER_MOMENTS[optimizer] * trainable,
                        activations=activations, indices=indices, transient=transient, method=method,
                        details={"batch_size": batch_size, "seq_len": seq_len, "predicted": True})


__all__ = ["predict", "PREDICTOR_VERSION", "activation_formula", "Shapes"]
