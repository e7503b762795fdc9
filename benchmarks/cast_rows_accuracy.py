"""Does training rows in the kept bf16 cast (the default under autocast) learn as the usual row update does?

Under bf16 autocast rowsft's row layers write ``bf16(W0[idx] + delta)`` into their kept bf16 copy of the weight
(``apply(train_in_cast=True)``, the default, `rowsft.layers.in_weight`): the arithmetic of mixed-precision full
fine-tuning, where an update smaller than half a bf16 step of its weight does not reach the forward until it has
grown. The usual update (``train_in_cast=False``) adds ``x deltaᵀ`` in bf16 on its own. This benchmark trains
both, under bf16 autocast, in the study's setting (`benchmarks/study.py`: SmolLM2-135M-Instruct, Rotten Tomatoes as
an LM task, rows by Taylor importance at LoRA-rank-8 parity, 80 steps of 8 × 96 tokens, the tuned row rate),
each seed with the same selection and batches for both, and evaluates both in float32 on the same 400 held-out
questions. It reports every accuracy with its Wilson interval, the majority class, per seed an exact McNemar test
and a paired bootstrap interval of the difference, and over seeds the t-interval of the mean difference, with a
verdict: the two match when that interval lies within ±2 points (the study's margin). The study's float32 runs of
the same points (`explorer-points.jsonl`) are paired with both, question by question. Accuracy moves by whole
questions; the held-out choice loss (``−log p(label)`` over the choices, per question) is paired too, a finer measure
of whether one arm learnt less.

    .venv/bin/python benchmarks/cast_rows_accuracy.py --arms cast --seeds 0 1 2 3 4 5 &   # one process per arm:
    .venv/bin/python benchmarks/cast_rows_accuracy.py --arms usual --seeds 0 1 2 3 4 5    # ~8 min a run on 2 cores
    .venv/bin/python benchmarks/cast_rows_accuracy.py --report                            # the report only
    .venv/bin/python benchmarks/cast_rows_accuracy.py --fast                              # tiny model, seconds

Training runs as rowsft's own loop runs it under autocast (``rowsft.train(..., autocast="bf16")``, as transformers'
Trainer with ``bf16=True``): forward and loss under autocast, backward and AdamW outside it (`RECIPE`). Session 15's
runs wrapped the whole ``train`` call in ``torch.autocast`` (backward and the optimizer step too); their records stay
in the results file, without a ``recipe``, and are not reported.

Results: ``benchmarks/results/cast-rows-accuracy.jsonl`` (one record per run, merged under a lock so that two
processes, e.g. one per arm, can share it; a finished run is not run again) and ``cast-rows-accuracy.md``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from rowsft import apply, evaluate, train
from rowsft.evaluation.choices import choice_loss
from rowsft.evaluation.stats import correctness, exact_mcnemar, paired_bootstrap, paired_over_seeds
from rowsft.explore.budgets import point_selection, prepared_point, read_cache, write_cache
from rowsft.io_utils import atomic_write_text
from rowsft.training.learning_rates import default_learning_rate

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {"cast": "rows in the bf16 cast (train_in_cast=True, the default)",
        "usual": "the usual row update (train_in_cast=False)"}
SETTINGS = {"standard": dict(model="smollm2-135m", task="rotten_tomatoes", budget="lora:8", metric="taylor", steps=80,
                             batch_size=8, max_length=96, eval_examples=400, max_train=2000, calibration_batches=4),
            "fast": dict(model="tiny-llama", task="rotten_tomatoes", budget="lora:1", metric="taylor", steps=2,
                         batch_size=2, max_length=32, eval_examples=8, max_train=16, calibration_batches=1)}
MARGIN = 0.02          # "match": the mean paired difference over seeds lies within ±2 points (95% t-interval)
RECIPE = "train-autocast"    # rowsft.train(..., autocast="bf16"): forward and loss under autocast, backward outside


def run_key(setting: str, arm: str, seed: int) -> str:
    return f"{setting}/{RECIPE}/{arm}/seed{seed}"


def run_one(setting: str, arm: str, seed: int) -> dict:
    """One bf16-autocast fine-tune of the setting's rows, evaluated in float32; a JSON-ready record."""
    s = SETTINGS[setting]
    point = {**s, "method": "row", "seed": seed}              # made as the study's runs are (`rowsft.explore.budgets`)
    model, tokenizer, data, batches = prepared_point(point)
    selection = point_selection(point, model, batches)
    apply(model, selection, train_in_cast=arm == "cast")
    lr = default_learning_rate("row")
    started = time.perf_counter()
    history = train(model, batches, steps=s["steps"], lr=lr, seed=seed, progress=False, autocast="bf16")
    train_seconds = time.perf_counter() - started
    result = evaluate(model, tokenizer, data["validation"], max_length=s["max_length"],
                      max_examples=s["eval_examples"], progress=False)           # float32, no autocast
    return {"key": run_key(setting, arm, seed), "setting": setting, "recipe": RECIPE, "arm": arm, "seed": seed,
            "lr": lr, **s,
            "trainable_parameters": selection.trainable_parameters, "final_loss": history.steps[-1]["loss"],
            "train_seconds": train_seconds, "threads": torch.get_num_threads(), "accuracy": result["accuracy"],
            "interval": list(result["interval"]), "majority": result["majority"],
            "correct": correctness(result).astype(int).tolist(), "choice_loss": result["choice_loss"],
            "choice_losses": [round(choice_loss(q["scores"], q["label"]), 6) for q in result["per_question"]]}


def float32_runs(setting: str) -> dict[int, dict]:
    """The study's float32 runs of the same points (row · taylor at the same budget), by seed."""
    s = SETTINGS[setting]
    out = {}
    for record in read_cache(RESULTS / "explorer-points.jsonl").values():
        if (record["method"] == "row" and record["metric"] == s["metric"] and record.get("budget") == s["budget"]
                and all(record.get(k) == s[k] for k in ("model", "task", "steps", "batch_size", "max_length",
                                                        "eval_examples", "max_train"))):
            questions = record["evaluation"]["per_question"]
            out[record["seed"]] = {"accuracy": record["evaluation"]["accuracy"],
                                   "choice_loss": record["evaluation"]["choice_loss"],
                                   "correct": correctness(record["evaluation"]).astype(int).tolist(),
                                   "choice_losses": [choice_loss(q["scores"], q["label"]) for q in questions]}
    return out


def verdict(over: dict | None) -> str:
    if over is None:
        return "not shown (one seed)"
    if over["low"] >= -MARGIN and over["high"] <= MARGIN:
        return f"shown: they match within {100 * MARGIN:.0f} points"
    if over["high"] < -MARGIN or over["low"] > MARGIN:
        return f"contradicted: the difference exceeds {100 * MARGIN:.0f} points"
    return f"not shown: the interval is too wide to tell (it must lie within ±{100 * MARGIN:.0f} points)"


def comparison(name_a: str, runs_a: dict, name_b: str, runs_b: dict) -> list[str]:
    """``b − a`` per seed (McNemar, paired bootstrap) and over seeds (t-interval), in words."""
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        return [f"- {name_b} − {name_a}: no seed has both runs yet"]
    lines, differences = [], []
    for seed in seeds:
        a, b = runs_a[seed]["correct"], runs_b[seed]["correct"]
        test, band = exact_mcnemar(a, b), paired_bootstrap(a, b, seed=seed)
        differences.append(band["difference"])
        lines.append(f"  - seed {seed}: {100 * band['difference']:+.2f} points [{100 * band['low']:+.1f}, "
                     f"{100 * band['high']:+.1f}] (paired bootstrap, 95%); only {name_b} right on {test['b_only']}, "
                     f"only {name_a} on {test['a_only']}; McNemar p = {test['p_value']:.2g}")
    over = paired_over_seeds(differences) if len(differences) >= 2 else None
    head = (f"- **{name_b} − {name_a}, accuracy**: mean {100 * statistics.mean(differences):+.2f} points"
            + ("" if over is None else f", 95% t-interval over {over['n']} seeds [{100 * over['low']:+.1f}, "
                                       f"{100 * over['high']:+.1f}]") + f". **{verdict(over)}**")
    return [head, *lines, *loss_comparison(name_a, runs_a, name_b, runs_b, seeds)]


def loss_comparison(name_a: str, runs_a: dict, name_b: str, runs_b: dict, seeds: list[int]) -> list[str]:
    """``b − a`` in held-out choice loss (nats a question, lower is better), paired question by question: a finer
    measure than accuracy of whether one arm learnt less. Per seed the t-interval over questions, over seeds the
    t-interval of the per-seed means."""
    seeds = [s for s in seeds if "choice_losses" in runs_a[s] and "choice_losses" in runs_b[s]]
    if not seeds:
        return []
    means, lines = [], []
    for seed in seeds:
        per_question = [b - a for a, b in zip(runs_a[seed]["choice_losses"], runs_b[seed]["choice_losses"])]
        band = paired_over_seeds(per_question)                 # a one-sample t-interval, here over questions
        means.append(band["mean"])
        lines.append(f"  - seed {seed}: {band['mean']:+.4f} nats [{band['low']:+.4f}, {band['high']:+.4f}] "
                     f"(95% t over {band['n']} questions); {name_b} lower on {band['negative']}, higher on "
                     f"{band['positive']}")
    if len(means) >= 2:
        over = paired_over_seeds(means)
        words = ("shown: higher" if over["low"] > 0 else "shown: lower" if over["high"] < 0 else
                 "not shown: the interval includes no difference")
        head = (f"- **{name_b} − {name_a}, held-out choice loss**: mean {statistics.mean(means):+.4f} nats a question, "
                f"95% t-interval over {over['n']} seeds [{over['low']:+.4f}, {over['high']:+.4f}]. **{words}**")
    else:
        head = f"- **{name_b} − {name_a}, held-out choice loss**: {means[0]:+.4f} nats a question (one seed)"
    return [head, *lines]


def report(setting: str, path: Path) -> str:
    records = [r for r in read_cache(path).values() if r["setting"] == setting and r.get("recipe") == RECIPE]
    if not records:
        return f"no runs of setting {setting!r} in {path} yet"
    by_arm = {arm: {r["seed"]: r for r in records if r["arm"] == arm} for arm in ARMS}
    lines = [f"# Rows in the bf16 cast against the usual row update, setting `{setting}`", "",
             "Written by `benchmarks/cast_rows_accuracy.py`.", "",
             f"Settings: `{json.dumps(SETTINGS[setting])}`; rate {records[0]['lr']:g}; trained with "
             f"`rowsft.train(..., autocast=\"bf16\")` (forward and loss under bf16 autocast, backward and AdamW "
             f"outside it), evaluated in float32 on the same {records[0]['eval_examples']} questions.", "",
             "| arm | seed | accuracy (95% Wilson) | held-out choice loss | last batch's loss | train s |",
             "|---|---|---|---|---|---|"]
    for arm, runs in by_arm.items():
        for seed, r in sorted(runs.items()):
            loss = f"{r['choice_loss']:.4f}" if "choice_loss" in r else "–"
            lines.append(f"| {ARMS[arm]} | {seed} | {r['accuracy']:.4f} ({r['interval'][0]:.3f}–{r['interval'][1]:.3f}) "
                         f"| {loss} | {r['final_loss']:.4f} | {r['train_seconds']:.0f} |")
    reference = float32_runs(setting)
    for seed, r in sorted(reference.items()):
        lines.append(f"| the study's float32 run (usual update, no autocast) | {seed} | {r['accuracy']:.4f} | "
                     f"{r['choice_loss']:.4f} | – | – |")
    majority = records[0]["majority"]
    lines += ["", f"Majority class on these questions: {majority['accuracy']:.3f} "
                  f"({majority['interval'][0]:.3f}–{majority['interval'][1]:.3f}).", "",
              "## Paired on the same questions", ""]
    lines += comparison("usual", by_arm["usual"], "cast", by_arm["cast"])
    if reference:
        lines += comparison("float32", reference, "cast", by_arm["cast"])
        lines += comparison("float32", reference, "usual", by_arm["usual"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", choices=tuple(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fast", action="store_true", help="the tiny model and a few steps (a smoke run)")
    parser.add_argument("--report", action="store_true", help="only write the report from the results file")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    args = parser.parse_args(argv)
    setting = "fast" if args.fast else "standard"
    name = "cast-rows-accuracy" + ("-fast" if args.fast else "")
    path = Path(args.results) / f"{name}.jsonl"
    if not args.report:
        for seed, arm in itertools.product(args.seeds, args.arms):
            if run_key(setting, arm, seed) in read_cache(path):
                continue
            record = run_one(setting, arm, seed)
            write_cache(path, [record])
            print(f"{record['key']}: accuracy {record['accuracy']:.4f}, {record['train_seconds']:.0f} s", flush=True)
    text = report(setting, path)
    atomic_write_text(path.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
