"""One fine-tuning job from start to end: load → score → select → apply → train → evaluate → save.

`JobConfig` names everything a run needs; `run_job` executes it with the library's verbs and
returns a `JobResult` of plain figures (accuracy before/after, trainable parameters, memory,
time). The command line, the tutorials and the study all go through here, so a figure printed by
one is computed exactly as the others compute it.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import torch

from rowsft import baselines, memory
from rowsft.cli.outputs import check_job_output, save_job_output
from rowsft.data import batches as make_batches
from rowsft.data import load_dataset, load_model
from rowsft.data.quantization import check_quantization_request
from rowsft.evaluation.choices import evaluate
from rowsft.evaluation.stats import correctness, exact_mcnemar
from rowsft.layers import tuner
from rowsft.scoring.scorer import canonical_metric, score
from rowsft.selection.budgets import parse_budget
from rowsft.selection.strategies import STRATEGIES, select
from rowsft.targets import check_targets
from rowsft.training.config import MAX_LR, check_autocast_name
from rowsft.training.learning_rates import default_learning_rate
from rowsft.training.loop import train
from rowsft.training.parts import autocast_context, check_device

METHODS = ("rowsft", "column", "element", "lora", "dora", "full")
METHOD_UNITS = {"rowsft": "row", "column": "column", "element": "element"}
TRUE_WORDS = ("true", "yes", "on", "1", "y")
FALSE_WORDS = ("false", "no", "off", "0", "n")


@dataclass
class JobConfig:
    """A fine-tuning job. Every field has a default so ``JobConfig()`` is the main job."""
    model: str = field(default="smollm2-135m", metadata={"help": "bundled name (smollm2-135m, minilm-l6, tiny-llama, ...), HF id or path"})
    quantization: str | None = field(default=None, metadata={"help": "nf4, fp4 or int8: load the frozen base quantized by bitsandbytes (the 'quantized' extra); rows then train over it, and method lora is QLoRA"})
    double_quant: bool = field(default=False, metadata={"help": "with nf4/fp4: quantize the per-block absmax statistics too, as QLoRA does"})
    task: str = field(default="rotten_tomatoes", metadata={"help": "rotten_tomatoes (the model learns it in minutes), boolq (the hard case), piqa, siqa, openbookqa, commonsenseqa"})
    method: str = field(default="rowsft", metadata={"help": f"one of {METHODS}"})
    train_in_weight: bool = field(default=False, metadata={"help": "rowsft only: keep the rows inside the base weight between steps (rowsft.apply(train_in_weight=True)): the same training up to float rounding, one more copy of the trained rows in memory; not over a quantized base. The default rows already compute the same products, lent to the float32 weight for each product (or written into its kept bf16 copy under bf16 autocast)"})
    metric: str = field(default="taylor", metadata={"help": "importance metric for rowsft/column/element selection"})
    budget: str = field(default="2", metadata={"help": "rows per layer (64), ratio (0.02), 'lora:8' (parity with LoRA rank 8) or 'params:N'"})
    strategy: str = field(default="per-layer", metadata={"help": "per-layer or global"})
    targets: str = field(default="all-linear", metadata={"help": "all-linear, attention, mlp, or a regex"})
    lora_rank: int = field(default=8, metadata={"help": "rank for lora/dora"})
    steps: int = field(default=80, metadata={"help": "optimizer steps"})
    lr: float | None = field(default=None, metadata={"help": "peak learning rate (default: the method's tuned rate, rowsft.training.learning_rates)"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    max_length: int = field(default=96, metadata={"help": "tokens per example (prompt start is truncated)"})
    calibration_batches: int = field(default=4, metadata={"help": "batches used to score importance"})
    zo_perturbations: int = field(default=64, metadata={"help": "zo-taylor only: SPSA perturbations (each costs two forward passes per calibration batch)"})
    max_train: int | None = field(default=2000, metadata={"help": "cap on training rows (None = all)"})
    eval_examples: int | None = field(default=400, metadata={"help": "validation examples for accuracy (None = all)"})
    eval_before: bool = field(default=True, metadata={"help": "also evaluate before fine-tuning"})
    seed: int = field(default=0, metadata={"help": "seed for data order, random selection and init"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/validation split of single-file tasks (rotten_tomatoes, piqa, siqa, openbookqa, commonsenseqa) and of the max_train subset: kept apart from seed, so that runs with other seeds, and rowsft eval, score the very same held-out questions and none of them is trained on"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)"})
    autocast: str | None = field(default=None, metadata={"help": "bf16: train under torch.autocast to bfloat16 (weights and deltas stay float32; rows then train in a kept bf16 copy of each weight, their fastest form); evaluation stays in the model's dtype"})
    out: str | None = field(default=None, metadata={"help": "folder to save the adapter into (optional)"})
    overwrite: bool = field(default=False, metadata={"help": "let --out be a non-empty folder holding other files (they are kept)"})
    measure_peak: bool = field(default=False, metadata={"help": "also measure the peak bytes of one training step (slow on CPU)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, coerce_field(f.name, str(f.type), getattr(self, f.name)))
        self.validate()

    def validate(self) -> "JobConfig":
        """Check every field before anything is loaded; a ValueError naming the field and the fix."""
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choose one of {METHODS}")
        for name in ("steps", "batch_size", "max_length", "calibration_batches", "zo_perturbations", "lora_rank"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_train", "eval_examples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer or None (all), got {getattr(self, name)!r}")
        if self.lr is None:
            self.lr = default_learning_rate(self.method)
        if not (0 < self.lr <= MAX_LR and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number at most {MAX_LR:g}, such as 1e-3, got {self.lr!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is unknown; choose one of {STRATEGIES}")
        parse_budget(self.budget)
        unit = METHOD_UNITS.get(self.method)
        if unit is not None:
            canonical_metric(self.metric, unit, None)
        check_targets(self.targets)
        check_device(self.device)
        check_autocast_name(self.autocast)          # the loop's own check, before anything is loaded
        self._check_quantization()
        return self

    def _check_quantization(self) -> None:
        self.quantization = check_quantization_request(self.quantization, self.double_quant)
        if self.quantization is not None and self.method == "full":
            raise ValueError("full fine-tuning cannot train quantized weights; drop quantization, or train rows "
                             "(method rowsft) or LoRA (QLoRA) over the quantized base")
        if self.train_in_weight and self.method != "rowsft":
            raise ValueError(f"train_in_weight trains rows inside the base weight; it goes with method rowsft, not "
                             f"{self.method}: drop --train-in-weight or use --method rowsft")
        if self.train_in_weight and self.quantization is not None:
            raise ValueError("train_in_weight cannot write rows into a quantized weight; drop --train-in-weight or "
                             "--quantization")


def coerce_field(name: str, kind: str, value: Any) -> Any:
    """``value`` read as a JobConfig field of type ``kind`` (``"int"``, ``"float | None"``, ...), as a YAML or
    JSON file or a flag may write it: ``"1e-3"`` → 0.001, ``"false"``/``"no"``/``"0"`` → False; a value of the
    wrong kind (2.7 for an int) is a ValueError naming the field."""
    optional = "None" in kind
    base = kind.split("|")[0].strip()
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{name} needs a value ({base}); remove the key to use the default")
    reader = {"bool": _read_bool, "int": _read_int, "float": _read_float, "str": _read_str}.get(base)
    return value if reader is None else reader(name, value)


def _read_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be true or false (also yes/no, on/off, 1/0), got {value!r}")


def _read_int(name: str, value: Any) -> int:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
            or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}; write e.g. {name}: 60")
    return int(number)


def _read_float(name: str, value: Any) -> float:
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}; write e.g. {name}: 0.0002 or 2e-4")
    return float(number)


def _read_str(name: str, value: Any) -> Any:
    if isinstance(value, str):
        return value
    if name == "budget" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)            # YAML reads `budget: 64` as an int; parse_budget reads the text
    if name == "targets" and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)           # a list of module types, as rowsft.score takes
    raise ValueError(f"{name} must be text, got {value!r} ({type(value).__name__})")


@dataclass
class JobResult:
    config: dict
    trainable_parameters: int = 0
    total_parameters: int = 0
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    memory: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    median_step_seconds: float | None = None
    final_loss: float | None = None
    stopped: bool = False
    adapter_path: str | None = None
    history: dict = field(default_factory=dict)
    eval_before: dict | None = None       # evaluate()'s summary without per_question: interval, acc_norm, majority, n
    eval_after: dict | None = None
    correct_before: list | None = None    # per-question 0/1, the same questions before and after (for paired tests)
    correct_after: list | None = None
    paired: dict | None = None            # exact McNemar of after vs before: b_only (fixed), a_only (broken), p_value
    wall_seconds: float = 0.0             # the whole job: loading, scoring, evaluations, training, saving

    def as_row(self) -> dict:
        """Flat dict for tables and results files (no history, no per-question lists)."""
        skip = ("config", "history", "memory", "eval_before", "eval_after", "correct_before", "correct_after", "paired")
        row = {k: v for k, v in asdict(self).items() if k not in skip}
        for name in ("before", "after"):
            summary = getattr(self, f"eval_{name}")
            if summary:
                row[f"interval_{name}"] = list(summary["interval"])
                row[f"acc_norm_{name}"] = summary.get("acc_norm")
                row["majority"] = summary["majority"]["accuracy"]
        if self.paired:
            row["paired_p"] = self.paired["p_value"]
        row.update({f"cfg_{k}": v for k, v in self.config.items()})
        row.update({f"mem_{k}": v for k, v in self.memory.items()})
        return row


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def prepare_model(model, cfg: JobConfig, calibration, log: Callable[[str], None] = print):
    """Turn a loaded model into the trainable form ``cfg.method`` asks for; returns (model, selection or None)."""
    unit = METHOD_UNITS.get(cfg.method)
    if unit is not None:
        scores = score(model, calibration, metric=cfg.metric, unit=unit, targets=cfg.targets,
                               num_batches=cfg.calibration_batches, seed=cfg.seed,
                               num_perturbations=cfg.zo_perturbations)
        selection = select(scores, cfg.budget, strategy=cfg.strategy)
        tuner.apply(model, selection, train_heads=_has_new_head(model), train_in_weight=cfg.train_in_weight)
        log(f"selected {selection.summary()} by {cfg.metric}")
        return model, selection
    if cfg.method in ("lora", "dora"):
        return baselines.lora(model, rank=cfg.lora_rank, targets=cfg.targets, use_dora=cfg.method == "dora"), None
    return baselines.full_finetune(model), None


def _has_new_head(model) -> bool:
    """Classification models get a freshly initialised head, which must train with the rows (as in the paper)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def run_job(cfg: JobConfig, callbacks=(), log: Callable[[str], None] = print, model=None, tokenizer=None,
            data=None) -> JobResult:
    """Run one job. ``model``/``tokenizer``/``data`` may be passed in to reuse what is loaded."""
    cfg.validate()
    check_job_output(cfg.method, cfg.out, cfg.overwrite)        # refused before anything is loaded or trained
    job_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model is None and cfg.quantization is not None:     # placed by bitsandbytes' loading; 4-bit refuses .to()
        model, tokenizer = load_model(cfg.model, quantization=cfg.quantization, double_quant=cfg.double_quant,
                                      device=device)
    elif model is None:
        model, tokenizer = load_model(cfg.model)
    if cfg.quantization is None:
        model.to(device)
    data = data if data is not None else load_dataset(cfg.task, max_train=cfg.max_train, seed=cfg.split_seed)
    if len(data["train"]) == 0:
        raise ValueError(f"task {cfg.task!r} has no training rows (max_train={cfg.max_train})")
    batches = make_batches(data["train"], tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed)
    result = JobResult(config=asdict(cfg))

    def evaluation(m) -> tuple[dict, list]:
        summary = evaluate(m, tokenizer, data["validation"], batch_size=max(8, cfg.batch_size),
                           max_length=cfg.max_length, max_examples=cfg.eval_examples, progress=cfg.progress)
        correct = correctness(summary).astype(int).tolist()
        return {k: v for k, v in summary.items() if k != "per_question"}, correct

    # Prepared first, so that a budget or target that does not fit this model is refused before the long
    # evaluation; at step 0 the prepared model computes exactly the pretrained model's outputs (zero deltas,
    # LoRA's B = 0), so "before" is the pretrained model's accuracy.
    model, selection = prepare_model(model, cfg, batches, log)
    if cfg.eval_before:
        result.eval_before, result.correct_before = evaluation(model)
        result.accuracy_before = result.eval_before["accuracy"]
        log(f"accuracy before: {describe_accuracy(result.eval_before)}")
    result.trainable_parameters, result.total_parameters = tuner.trainable_parameters(model)
    first = next(iter(batches))
    first = {k: v.to(device) for k, v in first.items()}
    report = memory.breakdown(model, first)
    result.memory = report.byte_counts()
    log(str(report))
    if cfg.measure_peak:
        with autocast_context(cfg.autocast, torch.device(device)):          # the step as it trains
            result.memory["measured_peak"] = int(memory.measure_peak(model, first)["peak"])

    start = time.perf_counter()
    history = train(model, batches, steps=cfg.steps, lr=cfg.lr, callbacks=callbacks, seed=cfg.seed,
                    progress=cfg.progress, autocast=cfg.autocast)
    result.train_seconds = time.perf_counter() - start
    result.history = history.to_dict()
    steps = history.steps
    durations = [b["elapsed"] - a["elapsed"] for a, b in zip(steps, steps[1:])]
    result.median_step_seconds = _median(durations)
    result.final_loss = steps[-1]["loss"] if steps else None
    result.stopped = bool(getattr(history, "stopped", False))
    result.eval_after, result.correct_after = evaluation(model)
    result.accuracy_after = result.eval_after["accuracy"]
    log(f"accuracy after: {describe_accuracy(result.eval_after)}")
    if result.correct_before is not None:
        result.paired = exact_mcnemar(result.correct_before, result.correct_after)
    if cfg.out:
        save_job_output(cfg.method, model, tokenizer, cfg.out, cfg.overwrite)
        result.adapter_path = cfg.out
        log(f"{'model' if cfg.method == 'full' else 'adapter'} saved to {cfg.out}")
    result.wall_seconds = time.perf_counter() - job_start
    return result


def describe_accuracy(summary: dict) -> str:
    """``0.8450 (95% CI 0.806–0.878, n=400)``: an evaluate() summary in one phrase."""
    low, high = summary["interval"]
    return f"{summary['accuracy']:.4f} (95% CI {low:.3f}–{high:.3f}, n={summary['n']})"


def config_from_mapping(values: dict[str, Any]) -> JobConfig:
    """A JobConfig from a dict (YAML/JSON file), rejecting unknown keys with the list of known ones."""
    if not isinstance(values, dict):
        raise ValueError(f"a job config must be a mapping of JobConfig fields, got {type(values).__name__}")
    known = set(JobConfig.__dataclass_fields__)
    unknown = sorted(set(map(str, values)) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
    return JobConfig(**values)
