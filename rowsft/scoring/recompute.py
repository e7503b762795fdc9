"""Recompute each transformer block's activations during backward, for the calibration passes of scoring.

Gradient metrics need, for every target layer, its input ``X`` and its output gradient ``G_out``; ``X``
exists in the forward pass and ``G_out`` only in backward, so ``X`` (and whatever the frozen blocks
save for the input gradients) would live across the whole forward/backward gap: the activations of
every block at once, most of the calibration peak. Wrapping each block's forward in non-reentrant
``torch.utils.checkpoint`` keeps only the block inputs; a block's activations, ``X`` included, are
recomputed when backward reaches it and freed when it leaves. The scores are unchanged (the
recomputation is the same deterministic forward, RNG state preserved) and the price is about one
more forward pass.

transformers' own gradient checkpointing acts only in training mode, while scoring runs in eval mode
(no dropout), so the blocks are wrapped here, for the duration of a ``with`` statement.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: children of an ``nn.ModuleList`` named ``layers`` / ``layer`` / ``h`` /
    ``blocks`` (Llama ``model.layers``, BERT ``encoder.layer``, GPT-2 ``transformer.h``); outermost lists only.
    Empty when the model has none (then nothing is recomputed)."""
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LIST_NAMES:
            for block in module:
                blocks.append(block)
                inside.update(id(m) for m in block.modules())
    return blocks


@contextlib.contextmanager
def recompute_blocks(blocks: list[nn.Module]) -> Iterator[None]:
    """Within the ``with``, each block's forward runs under non-reentrant checkpointing; restored on exit."""
    _unset = object()
    previous = []
    try:
        for block in blocks:
            own = block.__dict__.get("forward", _unset)  # an instance-level forward (e.g. accelerate hooks)
            previous.append((block, own))
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            block.forward = forward
        yield
    finally:
        for block, own in previous:
            if own is _unset:
                del block.forward
            else:
                block.forward = own
