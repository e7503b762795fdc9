"""`TrainConfig`: how `rowsft.train` optimises, one field per knob, each with its help text."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from rowsft.checks import check_count, check_real

# name -> (lowest allowed value, whether the lowest is allowed); every one must be a finite real number
REAL_FIELDS = {"lr": (0.0, True), "weight_decay": (0.0, True), "eps": (0.0, False), "momentum": (0.0, True),
               "warmup_ratio": (0.0, True)}
# above this, one AdamW step moves every trained value by about lr: nothing learnt survives, and float32 overflows
MAX_LR = 10.0
# autocast's names -> the dtype forward and loss run in (float16 would need loss scaling, which the loop does not do)
AUTOCAST_DTYPES = {"bf16": "bfloat16"}
# name -> lowest allowed value; every one must be a whole number (not a bool or a float)
COUNT_FIELDS = {"warmup_steps": 0, "grad_accum_steps": 1, "eval_every": 0, "log_every": 1, "memory_every": 0}


def _help(default, text: str, **kw):
    if callable(default) and not isinstance(default, type):
        return field(default_factory=default, metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """How `train` optimises (see each field's ``metadata["help"]``, or `TrainConfig.help()`)."""
    lr: float = _help(1e-4, "peak learning rate")
    weight_decay: float = _help(0.0, "decoupled weight decay of AdamW (pulls deltas toward 0, i.e. toward the pretrained model)")
    betas: tuple[float, float] = _help((0.9, 0.999), "AdamW moment coefficients")
    eps: float = _help(1e-8, "AdamW epsilon")
    fused: bool | None = _help(None, "AdamW's fused kernel, one pass over all trained tensors: None uses it where torch has "
                               "it for every one (CPU, CUDA: transformers' Trainer defaults to adamw_torch_fused), True "
                               "requires it, False takes torch's per-tensor (or foreach) loop")
    optimizer: Any = _help("adamw", "'adamw', 'sgd', or a function params -> torch.optim.Optimizer")
    momentum: float = _help(0.0, "momentum of the 'sgd' optimizer")
    warmup_steps: int = _help(0, "steps of linear warm-up from 0 to lr (wins over warmup_ratio)")
    warmup_ratio: float = _help(0.0, "warm-up as a fraction of the run's steps (used when warmup_steps is 0)")
    schedule: Any = _help("linear", "decay after warm-up: 'linear' (to 0), 'cosine' (to 0), 'constant', or a function "
                                     "step (1-based) -> factor of lr (warm-up then does not apply)")
    grad_accum_steps: int = _help(1, "micro-batches whose gradients are summed into one optimizer step")
    max_grad_norm: float | None = _help(1.0, "clip the global L2 norm of the trainable gradients to this (None: no clipping)")
    gradient_checkpointing: bool = _help(False, "recompute block activations in backward (transformers models) to save memory")
    seed: int | None = _help(0, "seed of torch's RNG (dropout) and of the batch order when shuffle=True; None: leave the RNG alone")
    shuffle: bool = _help(False, "visit each epoch's batches in a seeded random order (rowsft.batches already shuffles itself)")
    eval_every: int = _help(0, "call eval_data every this many steps (0: only at the end)")
    log_every: int = _help(10, "refresh the progress bar / log line every this many steps")
    device: str | None = _help(None, "device to train on (the model is moved there); None: the model's device")
    autocast: str | None = _help(None, "'bf16': each step's forward and loss run under torch.autocast to bfloat16 (the "
                                 "weights, deltas and optimizer stay in the model's dtype; row layers then write their rows "
                                 "into a kept bf16 copy of each weight, their fastest form); None: the model's own dtype. "
                                 "eval_data runs as it is given")
    progress: bool = _help(True, "show a tqdm progress bar")
    memory_every: int = _help(0, "record memory figures every this many steps (rowsft.memory.MemoryCallback; 0: off)")
    lean_logits: bool = _help(True, "causal LMs: run the LM head only at positions whose next token is labelled (same loss, "
                              "less time and memory; rowsft.lean_loss)")
    nan_policy: str = _help("raise", "non-finite loss: 'raise' (an error naming the step) or 'skip' (drop that update)")

    def __post_init__(self):
        for name, (low, inclusive) in REAL_FIELDS.items():
            check_real(name, getattr(self, name), low, inclusive)
        for name, low in COUNT_FIELDS.items():
            check_count(name, getattr(self, name), low)
        if self.lr > MAX_LR:
            raise ValueError(f"lr = {self.lr:g} is far above any workable learning rate (rowsft refuses more than "
                             f"{MAX_LR:g}): one step would wipe what the deltas learnt; try 1e-3, or find a rate with "
                             f"rowsft.lr_range_test")
        if self.max_grad_norm is not None:
            check_real("max_grad_norm", self.max_grad_norm, 0.0, False, "or None (no clipping)")
        check_betas(self.betas)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        checks = [
            (callable(self.schedule) or self.schedule in ("linear", "cosine", "constant"),
             f"schedule must be 'linear', 'cosine', 'constant' or a function step -> factor, got {self.schedule!r}"),
            (self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.fused in (None, True, False), f"fused must be None, True or False, got {self.fused!r}"),
            (self.nan_policy in ("raise", "skip"), f"nan_policy must be 'raise' or 'skip', got {self.nan_policy!r}"),
            (callable(self.optimizer) or self.optimizer in ("adamw", "sgd"),
             f"optimizer must be 'adamw', 'sgd' or a function params -> Optimizer, got {self.optimizer!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        check_autocast_name(self.autocast)
        self.betas = tuple(self.betas)

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name} = {f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}: "
                         f"{f.metadata.get('help', '')}" for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("optimizer", "schedule"):
            if callable(getattr(self, name)):
                d[name] = getattr(getattr(self, name), "__name__", "custom")
        return d


def check_autocast_name(autocast) -> None:
    """``autocast``: None or a name in `AUTOCAST_DTYPES`; float16 is refused with the reason (no loss scaling)."""
    if autocast is None or autocast in AUTOCAST_DTYPES:
        return
    fp16 = str(autocast).lower() in ("fp16", "float16", "half")
    raise ValueError(f"autocast must be None or 'bf16', got {autocast!r}"
                     + ("; float16 needs loss scaling, which rowsft.train does not do: use 'bf16', or transformers' "
                        "Trainer(fp16=True)" if fp16 else ""))


def check_betas(betas) -> None:
    """AdamW's ``betas``: two finite numbers in [0, 1)."""
    try:
        pair = tuple(betas)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(not isinstance(b, bool) and isinstance(b, numbers.Real) and math.isfinite(b)
                                 and 0.0 <= b < 1.0 for b in pair):
        raise ValueError(f"betas must be two finite numbers in [0, 1), such as (0.9, 0.999); got {betas!r}")
