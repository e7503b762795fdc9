"""Learning-rate sweep per method on the default task: where rowsft's default learning rates come from.

Every run is one `rowsft.cli.job.run_job` (the main job's code) on the bundled SmolLM2-135M and
Rotten Tomatoes as an LM task, with the main job's settings (80 steps of 8 reviews of at most 96
tokens), evaluated on the same held-out reviews. For each method (rows, columns and SPEFT
elements selected by importance, peft LoRA) and budget, a few learning rates a factor of about 3
apart; the zero-shot model is evaluated once and every run is paired with it (exact McNemar).

    .venv/bin/python benchmarks/lr_sweep.py                 # run what is missing, print the table
    .venv/bin/python benchmarks/lr_sweep.py --report        # only print the table from the results
    .venv/bin/python benchmarks/lr_sweep.py --only "row taylor lora:8"

Results: one JSON line per run in ``benchmarks/results/lr_sweep.jsonl`` (rewritten atomically after
every run, so an interrupted sweep resumes) and the table in ``benchmarks/results/lr_sweep.md``.
The chosen rates are written into :data:`rowsft.training.learning_rates.DEFAULT_LEARNING_RATES`
by hand, with this file as their source.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from rowsft.cli.job import JobConfig, run_job
from rowsft.data import load_dataset, load_model
from rowsft.evaluation import evaluate
from rowsft.evaluation.stats import correctness, exact_mcnemar
from rowsft.io_utils import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = dict(model="smollm2-135m", task="rotten_tomatoes", steps=80, batch_size=8, max_length=96,
                calibration_batches=4, eval_examples=400, max_train=2000)
# (label, method, metric, budget, learning rates)
GRID = (
    ("row taylor", "rowsft", "taylor", "2", (3e-4, 1e-3, 3e-3)),
    ("row taylor", "rowsft", "taylor", "lora:8", (3e-4, 1e-3, 3e-3)),
    ("column taylor", "column", "taylor", "lora:8", (1e-4, 3e-4, 1e-3, 3e-3)),
    ("SPEFT gradient", "element", "gradient", "lora:8", (1e-4, 3e-4, 1e-3, 3e-3)),
    ("LoRA r=8", "lora", "taylor", "-", (1e-4, 3e-4, 1e-3, 3e-3)),
)


def run_key(label: str, budget: str, lr: float, seed: int) -> str:
    return f"{label}|{budget}|{lr:g}|{seed}"


def load_rows(path: Path) -> dict:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows}


def save_rows(path: Path, rows: dict) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows.values()))


def zero_shot(seed: int) -> dict:
    model, tokenizer = load_model(SETTINGS["model"])
    data = load_dataset(SETTINGS["task"], max_train=SETTINGS["max_train"], seed=JobConfig.split_seed)   # the jobs' split
    start = time.perf_counter()
    summary = evaluate(model, tokenizer, data["validation"], batch_size=8, max_length=SETTINGS["max_length"],
                       max_examples=SETTINGS["eval_examples"], progress=False)
    return {"key": run_key("zero-shot", "-", 0.0, seed), "label": "zero-shot", "budget": "-", "lr": 0.0, "seed": seed,
            "accuracy": summary["accuracy"], "interval": list(summary["interval"]),
            "majority": summary["majority"]["accuracy"], "n": summary["n"],
            "correct": correctness(summary).astype(int).tolist(), "wall_s": time.perf_counter() - start}


def one_run(label: str, method: str, metric: str, budget: str, lr: float, seed: int) -> dict:
    cfg = JobConfig(**SETTINGS, method=method, metric=metric, budget=budget if budget != "-" else "lora:8",
                    lora_rank=8, lr=lr, seed=seed, eval_before=False, progress=False)
    result = run_job(cfg, log=lambda *_: None)
    return {"key": run_key(label, budget, lr, seed), "label": label, "method": method, "metric": metric, "budget": budget,
            "lr": lr, "seed": seed, "accuracy": result.accuracy_after, "interval": list(result.eval_after["interval"]),
            "acc_norm": result.eval_after["acc_norm"], "choice_loss": result.eval_after["choice_loss"],
            "n": result.eval_after["n"], "trainable_parameters": result.trainable_parameters,
            "final_loss": result.final_loss, "train_s": result.train_seconds, "wall_s": result.wall_seconds,
            "correct": result.correct_after, "threads": torch.get_num_threads()}


def table(rows: dict) -> str:
    base = rows.get(run_key("zero-shot", "-", 0.0, 0))
    lines = ["| method | budget | lr | accuracy (95% CI) | vs zero-shot | McNemar p | trainable | train s |",
             "|---|---|---|---|---|---|---|---|"]
    if base:
        low, high = base["interval"]
        lines.append(f"| zero-shot | – | – | {base['accuracy']:.3f} ({low:.3f}–{high:.3f}) | – | – | 0 | – |")
    best: dict = {}
    for row in rows.values():
        if row["label"] == "zero-shot":
            continue
        low, high = row["interval"]
        diff = p = "–"
        if base:
            diff = f"{100 * (row['accuracy'] - base['accuracy']):+.1f} pts"
            p = f"{exact_mcnemar(base['correct'], row['correct'])['p_value']:.2g}"
        lines.append(f"| {row['label']} | {row['budget']} | {row['lr']:g} | {row['accuracy']:.3f} ({low:.3f}–{high:.3f}) "
                     f"| {diff} | {p} | {row['trainable_parameters']:,} | {row['train_s']:.0f} |")
        group = (row["label"], row["budget"])
        if group not in best or row["accuracy"] > best[group]["accuracy"]:
            best[group] = row
    lines += ["", "Best learning rate per method and budget (one seed; neighbouring rates within the intervals "
              "are as good on this evidence):", ""]
    lines += [f"- {label} at {budget}: lr {row['lr']:g} → {row['accuracy']:.3f}" for (label, budget), row in best.items()]
    if base:
        lines += ["", f"Majority class on these {base['n']} reviews: {base['majority']:.3f}. "
                  f"Settings: {json.dumps(SETTINGS)}, seed 0, "
                  f"{next((r['threads'] for r in rows.values() if 'threads' in r), '?')} torch threads. "
                  "`train s` is wall time on a shared machine (other jobs ran beside the sweep): not a timing."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only print the table from the results file")
    parser.add_argument("--only", help="run only the grid rows whose 'label budget' contains this text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "lr_sweep.jsonl"))
    args = parser.parse_args(argv)
    path = Path(args.out)
    rows = load_rows(path)
    if not args.report:
        if run_key("zero-shot", "-", 0.0, args.seed) not in rows:
            rows[run_key("zero-shot", "-", 0.0, args.seed)] = zero_shot(args.seed)
            save_rows(path, rows)
        for label, method, metric, budget, lrs in GRID:
            if args.only and args.only not in f"{label} {budget}":
                continue
            for lr in lrs:
                key = run_key(label, budget, lr, args.seed)
                if key in rows:
                    continue
                rows[key] = one_run(label, method, metric, budget, lr, args.seed)
                save_rows(path, rows)
                print(f"{key}: {rows[key]['accuracy']:.3f} in {rows[key]['wall_s']:.0f} s", flush=True)
    text = table(rows)
    print(text)
    atomic_write_text(path.with_suffix(".md"), text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
