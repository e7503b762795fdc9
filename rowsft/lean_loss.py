"""The training loss of a batch, with the LM head run only where a label needs it.

Our causal-LM batches label only the answer tokens (-100 on prompt and padding), yet a plain
``model(**batch)`` projects every position onto the vocabulary: for SmolLM2 at 4 × 256 tokens that
is a ``(1024, 49152)`` logits tensor, its fp32 copy and their gradients (≈ 0.8 GB) and two
``576 × 49152`` matmuls per token, to keep a handful of rows. :func:`training_loss` asks the model
for the logits of the positions whose *next* token is labelled (transformers' ``logits_to_keep``,
here a 1-D tensor of positions: the union over the batch) and computes the same mean cross-entropy
as transformers' ``ForCausalLMLoss`` from them. The loss, and so every gradient, is the same as the
model's own (up to float rounding order); tests compare both in float64.

Anything else (classification batches, models without ``logits_to_keep``, a batch with no label)
goes through ``model(**batch).loss`` unchanged.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
import torch.nn.functional as F

from rowsft.distributed import unwrap

IGNORE_INDEX = -100


def innermost_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside every wrapper: those of `rowsft.distributed.unwrap` (DDP, DataParallel,
    DeepSpeed, ``torch.compile``), peft's (``get_base_model()``) and FSDP's (``.module``)."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        model = unwrap(model)
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif type(model).__name__ == "FullyShardedDataParallel":
            model = model.module
    return model


@functools.lru_cache(maxsize=256)
def _takes_logits_to_keep(forward) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs do). The
    signature is read once per forward function, not at every training step."""
    forward = innermost_model(model).forward
    return _takes_logits_to_keep(getattr(forward, "__func__", forward))   # the function, not a fresh bound method


def kept_positions(labels: torch.Tensor) -> torch.Tensor | None:
    """Positions ``t`` whose next token is labelled in some row: ``(n,)`` long, or None if none is."""
    needed = (labels[:, 1:] != IGNORE_INDEX).any(dim=0)          # (T-1,)
    if not bool(needed.any()):
        return None
    return needed.nonzero().squeeze(1)                            # (n,)


def logit_positions(batch: dict) -> int | None:
    """How many positions per example reach the LM head under :func:`lean_forward` (for
    ``rowsft.memory.predict(..., logit_positions=)``); None when every position does."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if not (torch.is_tensor(labels) and labels.dim() == 2):
        return None
    positions = kept_positions(labels)
    return None if positions is None else int(positions.numel())


def lean_forward(model: torch.nn.Module, batch: dict, lean: bool = True):
    """``model(**batch)``, except that with ``lean`` a causal LM computes logits ``(B, n, V)`` only at
    the ``n`` positions whose next token is labelled; the output's ``loss`` is the same mean
    cross-entropy either way."""
    labels = batch.get("labels")
    input_ids = batch.get("input_ids")
    if not (lean and torch.is_tensor(labels) and torch.is_tensor(input_ids) and labels.dim() == 2
            and labels.shape == input_ids.shape and accepts_logits_to_keep(model)):
        return model(**batch)
    positions = kept_positions(labels)
    if positions is None:                                         # nothing labelled: let the model say so (NaN)
        return model(**batch)
    output = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=positions)
    logits = output["logits"]                                     # (B, n, V)
    targets = labels[:, positions + 1]                            # (B, n): the token each kept position predicts
    if logits.dtype != torch.float64:
        logits = logits.float()                                   # the loss in fp32 at least, as transformers does
    output["loss"] = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     targets.reshape(-1).to(logits.device), ignore_index=IGNORE_INDEX)
    return output


def training_loss(model: torch.nn.Module, batch: dict, lean: bool = True) -> torch.Tensor:
    """The scalar loss of ``batch`` under ``model`` (see :func:`lean_forward`)."""
    return loss_of(lean_forward(model, batch, lean))


def loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]) and output[0].dim() == 0:
        loss = output[0]
    if loss is None:
        raise ValueError("the model returned no loss: batches need a 'labels' key (causal LM: input_ids with -100 "
                         "on prompt and padding; classification: class ids)")
    return loss
