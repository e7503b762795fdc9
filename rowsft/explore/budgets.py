"""The budget explorer: short fine-tunes over a grid of budgets and metrics, with LoRA at parity.

For "tuning row budgets interactively": each point of the grid (a method, an importance metric, a
budget and a seed) is one short fine-tune from the same pretrained model, evaluated on the same
held-out questions, with its trainable parameters and predicted peak memory. Points are cached in a
JSON-lines file keyed by everything that defines them, so re-plotting is instant and adding one
budget runs only that budget; a cached point whose predicted memory came from an older
`rowsft.memory.predict` (its ``predictor_version``) gets it computed again from the same selection,
without training again. `rowsft.viz.budget_explorer` draws the result.

    points = rowsft.explore_budgets(ExploreConfig(model="smollm2-135m", task="rotten_tomatoes",
                                                  budgets=[1, 2, 4, "lora:8"], metrics=["taylor", "random"]))
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from rowsft import baselines, memory
from rowsft.checks import check_count, check_real
from rowsft.data import batches as make_batches
from rowsft.data import load_dataset, load_model
from rowsft.evaluation.choices import evaluate
from rowsft.io_utils import atomic_write_text, file_lock
from rowsft.layers.tuner import apply, trainable_parameters
from rowsft.lean_loss import logit_positions
from rowsft.scoring.scorer import score
from rowsft.selection.budgets import LoraParity, parse_budget
from rowsft.selection.choice import Selection
from rowsft.selection.strategies import select
from rowsft.training.history import json_safe
from rowsft.training.learning_rates import default_learning_rate
from rowsft.training.loop import train


def _help(default, text: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ExploreConfig:
    """One budget exploration (see each field's ``metadata["help"]``)."""
    model: str = _help("smollm2-135m", "name for rowsft.load_model")
    task: str = _help("rotten_tomatoes", "name for rowsft.load_dataset")
    budgets: list = _help([1, 2, 4, "lora:8"], "row budgets: rows per layer, a ratio, 'lora:R' or 'params:N'")
    metrics: list = _help(["taylor", "random"], "importance metrics to compare (random is the control)")
    unit: str = _help("row", "trainable unit of the sparse points")
    lora_ranks: list = _help([], "extra peft LoRA ranks; every 'lora:R' budget adds LoRA rank R at parity")
    steps: int = _help(40, "optimizer steps of every fine-tune")
    lr: float | None = _help(None, "learning rate of the sparse fine-tunes (default: the unit's tuned rate)")
    lora_lr: float | None = _help(None, "learning rate of the LoRA fine-tunes (default: LoRA's tuned rate)")
    batch_size: int = _help(8, "examples per step")
    max_length: int = _help(96, "tokens per example")
    max_train: int = _help(2000, "training rows kept")
    calibration_batches: int = _help(4, "batches used to score importance")
    eval_examples: int = _help(200, "held-out questions every point is evaluated on (the same ones)")
    seeds: list = _help([0], "seeds (data order, random scores); several give paired comparisons over seeds")
    cache: str | None = _help(None, "JSON-lines file of finished points (None: no cache)")

    def __post_init__(self):
        self.budgets = [parse_budget(b) for b in self.budgets]        # refuse a bad budget before any work
        self.lr = default_learning_rate(self.unit) if self.lr is None else self.lr
        self.lora_lr = default_learning_rate("lora") if self.lora_lr is None else self.lora_lr
        for name in ("lr", "lora_lr"):
            check_real(f"ExploreConfig.{name}", getattr(self, name), 0.0, inclusive=False)
        for name in ("steps", "batch_size", "max_length", "max_train", "calibration_batches", "eval_examples"):
            check_count(f"ExploreConfig.{name}", getattr(self, name), 1)
        if not self.metrics and not self.lora_ranks and not any(isinstance(b, LoraParity) for b in self.budgets):
            raise ValueError("nothing to explore: give at least one metric, or a LoRA rank")
        if not self.seeds:
            raise ValueError("ExploreConfig.seeds is empty: give at least one seed, e.g. [0]")
        if self.cache is not None and Path(self.cache).is_dir():
            raise ValueError(f"ExploreConfig.cache {self.cache!r} is a folder; give a file name such as "
                             f"{str(Path(self.cache) / 'explore.jsonl')!r}")


def budget_label(budget) -> str:
    """How a budget reads in tables and legends: ``4`` rows, ``0.02``, ``lora:8``, ``params:100000``."""
    if isinstance(budget, LoraParity):
        return f"lora:{budget.rank}"
    if hasattr(budget, "n"):
        return f"params:{budget.n}"
    return str(budget)


def grid(cfg: ExploreConfig) -> list[dict]:
    """The points of an exploration, each a JSON-ready description (its cache key is made from it)."""
    common = {"model": cfg.model, "task": cfg.task, "steps": cfg.steps, "batch_size": cfg.batch_size,
              "max_length": cfg.max_length, "max_train": cfg.max_train, "eval_examples": cfg.eval_examples}
    points = [{**common, "method": cfg.unit, "metric": metric, "budget": budget_label(budget), "seed": seed,
               "lr": cfg.lr, "calibration_batches": cfg.calibration_batches}
              for budget, metric, seed in itertools.product(cfg.budgets, cfg.metrics, cfg.seeds)]
    ranks = list(dict.fromkeys([*cfg.lora_ranks, *(b.rank for b in cfg.budgets if isinstance(b, LoraParity))]))
    points.insert(0, {**common, "method": "zero-shot", "metric": None, "budget": None, "seed": 0, "lr": 0.0})
    points += [{**common, "method": "lora", "metric": None, "budget": f"lora:{rank}", "seed": seed, "lr": cfg.lora_lr}
               for rank, seed in itertools.product(ranks, cfg.seeds)]
    return points


def point_key(point: dict) -> str:
    return hashlib.sha256(json.dumps(point, sort_keys=True).encode()).hexdigest()[:16]


def read_cache(path) -> dict[str, dict]:
    """``{key: record}`` of a cache file (missing file: empty)."""
    if path is None or not Path(path).is_file():
        return {}
    records = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON record ({e}); delete the line or the file") from None
            records[record["key"]] = record
    return records


def write_cache(path, records: Iterable[dict]) -> None:
    """Add ``records`` to the cache file ``path``, keeping every record already there.

    Several processes may share one cache (the study's workers, a notebook): under a lock file
    beside it, the file is re-read, the new records merged in by key, and the whole replaced
    atomically, so no process drops another's points and a kill leaves the old or the new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        merged = read_cache(path)
        merged.update({r["key"]: r for r in records})
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in merged.values()))


def prepared_point(point: dict):
    """The point's pretrained model, tokenizer, data and training batches, seeded as its run was (the recipe of every
    explorer run and of the study; ``point`` needs ``model``, ``task``, ``max_train``, ``batch_size``, ``max_length``
    and ``seed``)."""
    torch.manual_seed(point["seed"])
    model, tokenizer = load_model(point["model"])
    data = load_dataset(point["task"], max_train=point["max_train"], seed=0)
    batches = make_batches(data["train"], tokenizer, batch_size=point["batch_size"], max_length=point["max_length"],
                           seed=point["seed"])
    return model, tokenizer, data, batches


def _selected(point: dict, model, batches):
    """The point's model made trainable (LoRA, or its selection applied) and its predicted peak memory."""
    first = next(iter(batches))
    seq_len, positions = int(first["input_ids"].shape[-1]), logit_positions(first)
    if point["method"] == "lora":
        rank = int(point["budget"].split(":")[1])
        model = baselines.lora(model, rank=rank)
        predicted = memory.predict(model.get_base_model(), ("lora", rank), point["batch_size"], seq_len,
                                   logit_positions=positions)
        return model, predicted
    selection = point_selection(point, model, batches)
    predicted = memory.predict(model, selection, point["batch_size"], seq_len, logit_positions=positions)
    return apply(model, selection), predicted


def point_selection(point: dict, model, batches) -> Selection:
    """The point's selection, made as its run made it: ``point["metric"]`` scores of unit ``point["method"]`` on the
    first ``calibration_batches`` of ``batches``, selected at ``point["budget"]``."""
    calibration = list(itertools.islice(iter(batches), point["calibration_batches"]))
    scores = score(model, calibration, metric=point["metric"], unit=point["method"], seed=point["seed"])
    return select(scores, parse_budget(point["budget"]))


def predicted_again(point: dict, record: dict) -> dict:
    """``record`` (of ``point``) with its predicted peak computed by this version of `rowsft.memory.predict`
    (the same selection, made as its run made it; nothing trained): a cached record of an older predictor."""
    predicted = None
    if point["method"] != "zero-shot":
        model, _, _, batches = prepared_point(point)
        predicted = int(_selected(point, model, batches)[1].total)
    return {**record, "predicted_peak_bytes": predicted, "predictor_version": memory.PREDICTOR_VERSION}


def run_point(point: dict) -> dict:
    """One short fine-tune and its evaluation; a JSON-ready record."""
    model, tokenizer, data, batches = prepared_point(point)
    if point["method"] == "zero-shot":                                   # the pretrained model itself
        result = evaluate(model, tokenizer, data["validation"], max_length=point["max_length"],
                          max_examples=point["eval_examples"], progress=False)
        return {**point, "trainable_parameters": 0, "total_parameters": sum(p.numel() for p in model.parameters()),
                "predicted_peak_bytes": None, "predictor_version": memory.PREDICTOR_VERSION, "final_loss": None,
                "evaluation": json_safe(result)}
    model, predicted = _selected(point, model, batches)
    trainable, total = trainable_parameters(model)
    started = time.perf_counter()
    history = train(model, batches, steps=point["steps"], lr=point["lr"], seed=point["seed"], progress=False)
    train_seconds = time.perf_counter() - started
    result = evaluate(model, tokenizer, data["validation"], max_length=point["max_length"],
                      max_examples=point["eval_examples"], progress=False)
    return {**point, "trainable_parameters": int(trainable), "total_parameters": int(total),
            "predicted_peak_bytes": int(predicted.total), "predictor_version": memory.PREDICTOR_VERSION,
            "final_loss": history.steps[-1]["loss"],
            "train_seconds": train_seconds, "threads": torch.get_num_threads(), "evaluation": json_safe(result)}


def explore_budgets(cfg: ExploreConfig | None = None, progress: bool | Callable = True,
                    stop: Callable[[], bool] | None = None, keep: Callable[[dict], bool] | None = None,
                    **overrides) -> list[dict]:
    """Run (or read from ``cfg.cache``) every point of the exploration; returns the records in grid order.

    ``progress``: a tqdm bar (True), none (False), or a callable ``(done, total, record)`` called after
    each point (the dashboard's progress bar). ``stop``: asked before each point that must run; when
    it returns True the points finished so far are returned (and stay cached). ``keep(point)``: when
    given, points it rejects are neither run nor returned unless already cached (splitting one grid
    between processes that share the cache). Keyword ``overrides`` replace `ExploreConfig` fields.
    """
    cfg = dataclasses.replace(cfg or ExploreConfig(), **overrides) if overrides else (cfg or ExploreConfig())
    points = grid(cfg)
    cached = read_cache(cfg.cache)
    records = []
    bar = tqdm(total=len(points), desc="budget explorer", disable=progress is not True)
    for done, point in enumerate(points, 1):
        key = point_key(point)
        record = cached.get(key)
        if record is None and cfg.cache is not None:
            record = read_cache(cfg.cache).get(key)          # another process may have run it meanwhile
        if record is not None and record.get("predictor_version") != memory.PREDICTOR_VERSION:
            record = predicted_again(point, record)          # an older predictor's memory; the run itself stands
            cached[key] = record
            if cfg.cache is not None:
                write_cache(cfg.cache, [record])
        if record is None:
            if keep is not None and not keep(point):
                continue
            if stop is not None and stop():
                break
            record = {"key": key, **run_point(point)}
            cached[key] = record
            if cfg.cache is not None:
                write_cache(cfg.cache, [record])
        records.append(record)
        bar.update(1)
        if callable(progress):
            progress(done, len(points), record)
    bar.close()
    return records
