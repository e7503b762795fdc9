"""Quantized bases: the checks and the bitsandbytes settings behind ``load_model(name, quantization=...)``.

``quantization="nf4" | "fp4" | "int8"`` (bitsandbytes, the ``quantized`` extra): every route goes through
transformers' own ``BitsAndBytesConfig`` loading, which runs on CPU with bitsandbytes >= 0.50 as on CUDA.
The linear layers (GPT-2's ``Conv1D`` included) become ``Linear4bit`` / ``Linear8bitLt``; the embeddings and the
output heads that ``rowsft.targets`` names (``lm_head``, ``classifier``, ``score``, ...) stay in ``dtype``: a new
classification head must be trainable. 4-bit layers compute in ``dtype`` (``bnb_4bit_compute_dtype``) and keep
one float32 absmax per block of 64 weights; with ``double_quant=True`` (QLoRA's "double quantization",
``bnb_4bit_use_double_quant``) those absmax are themselves quantized to 8 bits in blocks of 256, which saves
about 0.37 bit per weight (SmolLM2-135M: 6.5 MiB → 1.7 MiB of statistics) for a slightly coarser scale per block.

On CPU, bitsandbytes would repack a 4-bit layer's weight for a bf16 inference kernel the first time it runs in
eval mode on an input that needs no gradient: a different product (bf16) from the one training sees, and no
gradient through it afterwards. :func:`settle_quantized_layers` turns that repacking off
(``support_avx512bf16_for_cpu = False``), so every forward multiplies by the dequantized weight, in evaluation as
in training. :func:`import_bitsandbytes` silences its one-line note about an optional hub kernel it cannot fetch
offline, and shows its per-call note that int8 inputs are cast to float16 (eval mode) once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

from rowsft.targets import OUTPUT_HEAD_NAMES

QUANTIZATIONS = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # what a quantized base may compute in


def check_quantization_request(quantization, double_quant: bool = False) -> str | None:
    """``quantization`` in lower case (None stays None), after checking the request itself: a known kind, and
    ``double_quant`` a bool given only with a 4-bit kind. Loads nothing (the command line checks its flags with it)."""
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    if quantization is None:
        if double_quant:
            raise ValueError("double_quant=True quantizes the 4-bit statistics; it needs quantization='nf4' or 'fp4' "
                             "(got no quantization)")
        return None
    if not isinstance(quantization, str) or quantization.strip().lower() not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} (or None for a float model), got "
                         f"{quantization!r}")
    kind = quantization.strip().lower()
    if double_quant and kind not in FOUR_BIT:
        raise ValueError(f"double_quant=True applies to the 4-bit kinds {FOUR_BIT}, not {kind!r} (int8 keeps one "
                         f"scale per row, nothing to compress); drop double_quant or pick nf4")
    return kind


def check_quantization(quantization, dtype, device, model_kwargs: dict, double_quant: bool = False) -> str | None:
    """``quantization`` in lower case (None stays None), after checking that it can be honoured: the request
    (`check_quantization_request`), a float compute ``dtype``, a CPU or CUDA ``device``, no ``quantization_config``
    of the caller's own beside it, and bitsandbytes installed. Every refusal comes before anything loads."""
    kind = check_quantization_request(quantization, double_quant)
    if kind is None:
        return None
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"a quantized base computes in float32, bfloat16 or float16; dtype={dtype} is none of "
                         f"these (it sets the compute dtype of the quantized layers and the dtype of the rest)")
    try:
        device_type = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from None
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"quantized models load on 'cpu' or 'cuda' here, not {device!r}")
    if "quantization_config" in model_kwargs:
        raise ValueError("pass either quantization=... or your own quantization_config, not both")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError("quantization needs bitsandbytes: pip install --no-deps 'bitsandbytes>=0.50' (the "
                          "'quantized' extra; --no-deps keeps the CPU torch already installed)")
    import_bitsandbytes()
    return kind


class _FirstOnly(logging.Filter):
    """Lets a log message that starts with ``prefix`` through once per process."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        shown, self.seen = self.seen, True
        return not shown


def import_bitsandbytes():
    """``import bitsandbytes`` without its import-time note that an optional CPU kernel from the model hub could
    not be fetched (it falls back to its own CPU code), and with its int8 per-call note shown only once."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        cpu_ops.setLevel(level)
    autograd_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOnly) for f in autograd_log.filters):
        autograd_log.addFilter(_FirstOnly("MatMul8bitLt: inputs will be cast"))
    return bitsandbytes


def bitsandbytes_config(quantization: str, dtype: torch.dtype, double_quant: bool = False):
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` ("nf4", "fp4", "int8") computing in ``dtype``;
    ``double_quant``: quantize the 4-bit layers' absmax statistics too."""
    from transformers import BitsAndBytesConfig
    heads = list(OUTPUT_HEAD_NAMES)     # output heads stay in dtype (a new classification head must train)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=heads)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization, bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=double_quant, llm_int8_skip_modules=heads)


def settle_quantized_layers(model) -> None:
    """Keep every 4-bit layer on the dequantize-and-multiply path in eval mode too (see the module docstring)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def forget_quantization(model) -> None:
    """Drop transformers' record that ``model`` was quantized (config entry, quantizer, flags), for a model whose
    weights are plain floats again, so that ``save_pretrained`` writes a plain model."""
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    with contextlib.suppress(AttributeError):
        model.config._is_quantized = False
    for attribute, plain in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None),
                             ("is_loaded_in_4bit", False), ("is_loaded_in_8bit", False)):
        if hasattr(model, attribute):
            setattr(model, attribute, plain)


__all__ = ["COMPUTE_DTYPES", "FOUR_BIT", "QUANTIZATIONS", "bitsandbytes_config", "check_quantization",
           "check_quantization_request",
           "forget_quantization", "import_bitsandbytes", "settle_quantized_layers"]
