"""SPEFT accuracy (issue 5): static gradient mask vs random element mask vs dynamic mask on BoolQ.

Every variant trains single weights (the ``element`` unit) of all linear layers of SmolLM2-135M at
the same budget (parity with LoRA rank 8: ``rowsft.selection.lora_parity(8)``) for the same number of
steps, with the same data order per seed, and is scored by BoolQ choice log-likelihood accuracy:

- ``static gradient``: SPEFT's gradient salience ``|G|`` on the calibration batches, chosen once;
- ``random``: a seeded random mask of the same size (a different mask per seed);
- ``dynamic gradient``: as static, re-chosen every ``--every`` steps by `rowsft.training.dynamic.DynamicMask`
  (updates folded into the weights, kept entries keep their AdamW moments, new ones start at zero).

Several seeds; the table gives mean, standard deviation, min and max accuracy per variant. Results
go to ``benchmarks/results/<name>.json`` (rewritten atomically after every run, ``complete`` set at
the end) through ``harness.write_results``.

Cost of the defaults (3 seeds × 3 variants, 6 steps of 4 × 128 tokens, one reselection at step 3,
100 validation examples), measured on the shared 2-core machine under load: element step ≈ 7.7 s,
scoring + selection ≈ 28 s, a reselection ≈ 30 s, evaluation ≈ 0.33 s per example → ≈ 19 min.
``--max-minutes`` (default 20) starts no seed that would end later; each seed runs every variant.
These few steps only smoke-test the comparison; the flags make the real one.

    .venv/bin/python benchmarks/speft_accuracy.py                  # defaults: within 20 min on 2 CPU cores
    .venv/bin/python benchmarks/speft_accuracy.py --steps 300 --every 50 --seeds 5 --max-length 256 \\
        --batch-size 16 --eval-examples 1000 --calibration-batches 8 --device cuda --name speft_accuracy_full
    .venv/bin/python benchmarks/speft_accuracy.py --model tiny-llama --steps 4 --every 2 --seeds 2 \\
        --eval-examples 8 --max-length 64 --name smoke_speft          # end-to-end smoke test

Each run mirrors `rowsft.cli.job.run_job` (its `JobConfig` carries the shared settings, its
`parse_budget` reads the budget) but is written out here: ``run_job`` does not pass the seed to
random scoring (every seed would get the same random mask) and builds its calibration batches
inside, where a DynamicMask cannot reach them. The helpers below are shared with
``benchmarks/selection_quality.py``.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# On a small shared CPU machine OpenMP threads that spin while waiting made every small tensor op
# about 100x slower and a SmolLM2 element-sparse step 5x slower (42 s vs 7.8 s, measured); passive
# waiting costs nothing on an idle machine. Must be set before torch loads (harness imports torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """One line of the table: how the trained entries are chosen."""
    label: str
    unit: str              # row | column | element
    metric: str            # a rowsft.score metric
    dynamic: bool = False  # re-chosen every `every` steps by rowsft.training.dynamic.DynamicMask


SPEFT_VARIANTS = (Variant("static gradient", "element", "gradient"), Variant("random", "element", "random"),
                  Variant("dynamic gradient", "element", "gradient", dynamic=True))


# ---------------------------------------------------------------- shared with selection_quality.py
def add_common_arguments(ap: argparse.ArgumentParser, name: str, strategy: str, steps: int) -> None:
    """The flags both accuracy benchmarks take; defaults fit 20 minutes on 2 CPU cores."""
    ap.add_argument("--model", default="smollm2-135m", help="bundled name or path (tiny-llama for a smoke test)")
    ap.add_argument("--task", default="boolq")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (data order and random masks)")
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps per run (equal for every variant)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--calibration-batches", type=int, default=2, help="batches scored to choose the mask")
    ap.add_argument("--eval-examples", type=int, default=100, help="validation examples for accuracy")
    ap.add_argument("--max-train", type=int, default=None, help="cap on training rows")
    ap.add_argument("--budget", default="lora:8", help="'lora:8' (LoRA rank-8 parity), rows per layer, ratio, 'params:N'")
    ap.add_argument("--strategy", default=strategy, choices=("per-layer", "global"))
    ap.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    ap.add_argument("--no-zero-shot", action="store_true", help="skip the accuracy of the untuned model")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    ap.add_argument("--max-minutes", type=float, default=20.0,
                    help="start no further seed that would end past this (0: no limit); every seed runs all variants")
    ap.add_argument("--name", default=name, help="results file benchmarks/results/<name>.json")


def job_config(args, seed: int, variant: Variant):
    """The run's settings as a `rowsft.cli.job.JobConfig` (validated there)."""
    from rowsft.cli.job import JobConfig
    method = {"row": "rowsft", "column": "column", "element": "element"}[variant.unit]
    return JobConfig(model=args.model, task=args.task, method=method, metric=variant.metric, budget=args.budget,
                     strategy=args.strategy, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                     max_length=args.max_length, calibration_batches=args.calibration_batches,
                     max_train=args.max_train, eval_examples=args.eval_examples, eval_before=False, seed=seed,
                     device=args.device, progress=args.progress).validate()


def held_out(model, tokenizer, data, cfg) -> dict:
    """``rowsft.evaluate`` on the validation split: accuracy and choice loss (held-out cross-entropy)."""
    from rowsft.evaluation import evaluate
    return evaluate(model, tokenizer, data["validation"], batch_size=max(8, cfg.batch_size), max_length=cfg.max_length,
                    max_examples=cfg.eval_examples, progress=cfg.progress)


def zero_shot(args) -> dict:
    """Accuracy and choice loss of the untuned model (same evaluation as every run)."""
    import torch
    from rowsft import data as zoo
    cfg = job_config(args, 0, Variant("zero-shot", "element", "random"))
    model, tokenizer = zoo.load_model(cfg.model)
    model.to(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return held_out(model, tokenizer, zoo.load_dataset(cfg.task, max_train=cfg.max_train, seed=cfg.split_seed), cfg)


def run_once(cfg, variant: Variant, every: int | None = None) -> dict:
    """Load, score, select, apply, train (with a DynamicMask for dynamic variants), evaluate."""
    import torch
    from rowsft import scoring
    from rowsft.selection import strategies as sel
    from rowsft.layers import tuner
    from rowsft import data as zoo
    from rowsft.training.dynamic import DynamicMask
    from rowsft.selection.budgets import parse_budget
    from rowsft.training import train
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = zoo.load_model(cfg.model)
    model.to(device)
    data = zoo.load_dataset(cfg.task, max_train=cfg.max_train, seed=cfg.split_seed)   # zero_shot's questions
    batches = zoo.batches(data["train"], tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed)
    calibration = list(itertools.islice(batches.iter_epoch(0), cfg.calibration_batches))  # what run_job scores
    budget = parse_budget(cfg.budget)
    load_s = time.perf_counter() - t0
    scores = scoring.score(model, calibration, metric=variant.metric, unit=variant.unit, targets=cfg.targets,
                           num_batches=len(calibration), seed=cfg.seed)
    selection = sel.select(scores, budget, strategy=cfg.strategy)
    tuner.apply(model, selection)
    callbacks = []
    if variant.dynamic:
        callbacks.append(DynamicMask(calibration, metric=variant.metric, budget=budget, strategy=cfg.strategy,
                                     every=every, num_batches=len(calibration), score_options={"seed": cfg.seed}))
    t_train = time.perf_counter()
    score_s = t_train - t0 - load_s
    history = train(model, batches, steps=cfg.steps, lr=cfg.lr, seed=cfg.seed, progress=cfg.progress,
                    callbacks=callbacks)
    train_s = time.perf_counter() - t_train
    result = held_out(model, tokenizer, data, cfg)
    row = {"variant": variant.label, "unit": variant.unit, "metric": variant.metric, "dynamic": variant.dynamic,
           "seed": cfg.seed, "accuracy": result["accuracy"], "choice_loss": result["choice_loss"],
           "trainable_parameters": tuner.trainable_parameters(model)[0], "final_loss": history.final_loss,
           "mean_loss_last_quarter": statistics.mean(history.losses[-max(1, len(history.losses) // 4):]),
           "load_s": load_s, "score_s": score_s, "train_s": train_s,
           "eval_s": time.perf_counter() - t_train - train_s, "wall_s": time.perf_counter() - t0}
    if variant.dynamic:
        row["reselections"] = [{k: v for k, v in r.items() if k != "per_layer"} for r in callbacks[0].reselections]
    return row


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict], variants) -> list[dict]:
    """Per variant: accuracy and choice loss, mean, standard deviation (sample), min, max over seeds, and costs.

    Every variant after the first also gets its differences to the first one, seed by seed (the
    same data order, calibration batches and questions): ``paired_acc`` and ``paired_loss`` (mean
    and standard deviation of ``variant - first``) and ``first_better`` (in how many seeds the
    first variant had the higher accuracy / the lower choice loss). Runs without a choice loss
    (files written before it was recorded) are left out of the loss columns.
    """
    out, first = [], {}
    for v in variants:
        rs = [r for r in rows if r["variant"] == v.label]
        if not rs:
            continue
        accs = [r["accuracy"] for r in rs]
        losses = [r["choice_loss"] for r in rs if "choice_loss" in r]
        entry = {"variant": v.label, "n": len(rs), "mean": statistics.mean(accs),
                 "std": _std(accs), "min": min(accs), "max": max(accs),
                 "loss_mean": statistics.mean(losses) if losses else None, "loss_std": _std(losses) if losses else None,
                 "final_loss": statistics.mean(r["final_loss"] for r in rs),
                 "trainable": rs[0]["trainable_parameters"], "wall_s": statistics.mean(r["wall_s"] for r in rs)}
        jaccards = [x["jaccard"] for r in rs for x in r.get("reselections", [])]
        if jaccards:
            entry["mean_jaccard"] = statistics.mean(jaccards)
        by_seed = {r["seed"]: r for r in rs}
        if not first:
            first = by_seed
        else:
            seeds = sorted(set(first) & set(by_seed))
            acc_d = [by_seed[s]["accuracy"] - first[s]["accuracy"] for s in seeds]
            loss_d = [by_seed[s]["choice_loss"] - first[s]["choice_loss"] for s in seeds
                      if "choice_loss" in by_seed[s] and "choice_loss" in first[s]]
            if acc_d:
                entry["paired_acc"] = (statistics.mean(acc_d), _std(acc_d))
                entry["first_better_acc"] = f"{sum(d < 0 for d in acc_d)}/{len(acc_d)}"
            if loss_d:
                entry["paired_loss"] = (statistics.mean(loss_d), _std(loss_d))
                entry["first_better_loss"] = f"{sum(d > 0 for d in loss_d)}/{len(loss_d)}"
        out.append(entry)
    return out


def table(summary: list[dict], zero_shot: dict | None) -> str:
    """Accuracy (%) and held-out choice loss per variant, then the paired differences to the first variant."""
    head = (f"{'variant':<20}{'seeds':>6}{'acc mean':>10}{'± std':>8}{'min':>8}{'max':>8}{'held-out':>10}{'± std':>8}"
            f"{'train':>8}{'trainable':>12}{'run s':>8}{'jaccard':>9}")
    lines = [head, "-" * len(head)]
    if zero_shot is not None:
        lines.append(f"{'zero-shot':<20}{'-':>6}{100 * zero_shot['accuracy']:>10.1f}{'':>24}{zero_shot['choice_loss']:>10.4f}")
    for s in summary:
        jac = f"{s['mean_jaccard']:>9.3f}" if "mean_jaccard" in s else f"{'-':>9}"
        loss = (f"{s['loss_mean']:>10.4f}{s['loss_std']:>8.4f}" if s.get("loss_mean") is not None else f"{'-':>10}{'':>8}")
        lines.append(f"{s['variant']:<20}{s['n']:>6}{100 * s['mean']:>10.1f}{100 * s['std']:>8.1f}{100 * s['min']:>8.1f}"
                     f"{100 * s['max']:>8.1f}{loss}{s['final_loss']:>8.3f}{s['trainable']:>12,}{s['wall_s']:>8.0f}{jac}")
    paired = [s for s in summary if "paired_acc" in s]
    if paired:
        lines += ["", f"paired with '{summary[0]['variant']}', seed by seed (variant - {summary[0]['variant']}):"]
        for s in paired:
            acc = s["paired_acc"]
            line = f"  {s['variant']:<18} accuracy {100 * acc[0]:+.1f} ± {100 * acc[1]:.1f}"
            line += f" ({summary[0]['variant']} higher in {s['first_better_acc']} seeds)"
            if "paired_loss" in s:
                line += (f"; held-out choice loss {s['paired_loss'][0]:+.4f} ± {s['paired_loss'][1]:.4f}"
                         f" ({summary[0]['variant']} lower in {s['first_better_loss']} seeds)")
            lines.append(line)
    return "\n".join(lines)


def run_benchmark(args, variants, extra: dict | None = None) -> dict:
    """Every variant × seed, results written after each run; prints the table and returns the payload."""
    settings = {k: v for k, v in vars(args).items() if k != "name"}
    payload = {"settings": settings, "variants": [asdict(v) for v in variants], "runs": [], "summary": [],
               "zero_shot_accuracy": None, "zero_shot_choice_loss": None, "complete": False, **(extra or {})}
    t0 = time.perf_counter()
    untuned = None
    if not args.no_zero_shot:
        untuned = zero_shot(args)
        payload["zero_shot_accuracy"], payload["zero_shot_choice_loss"] = untuned["accuracy"], untuned["choice_loss"]
        print(f"zero-shot accuracy: {100 * untuned['accuracy']:.1f}%, choice loss {untuned['choice_loss']:.4f}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    seed_seconds: list[float] = []
    for seed in range(args.seeds):
        elapsed = time.perf_counter() - t0
        if args.max_minutes and seed_seconds and elapsed + statistics.mean(seed_seconds) > 60 * args.max_minutes:
            payload["stopped_early"] = (f"{seed} of {args.seeds} seeds: another seed (~{statistics.mean(seed_seconds):.0f} s) "
                                        f"would pass --max-minutes {args.max_minutes:g}")
            print(f"stopping after {payload['stopped_early']}", flush=True)
            break
        seed_start = time.perf_counter()
        for variant in variants:
            row = run_once(job_config(args, seed, variant), variant, every=getattr(args, "every", None))
            payload["runs"].append(row)
            payload["summary"] = summarize(payload["runs"], variants)
            harness.write_results(args.name, payload)
            print(f"seed {seed} {variant.label:<20} accuracy {100 * row['accuracy']:.1f}%  held-out {row['choice_loss']:.4f}"
                  f"  train loss {row['final_loss']:.3f}"
                  f"  ({row['wall_s']:.0f} s, total {time.perf_counter() - t0:.0f} s)", flush=True)
        seed_seconds.append(time.perf_counter() - seed_start)
    payload["complete"], payload["total_s"] = True, time.perf_counter() - t0
    path = harness.write_results(args.name, payload)
    print()
    print(table(payload["summary"], untuned))
    print(f"\nresults: {path}  ({payload['total_s']:.0f} s)")
    return payload


def check_args(ap: argparse.ArgumentParser, args) -> None:
    for name in ("seeds", "steps", "batch_size", "max_length", "calibration_batches", "eval_examples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, name="speft_accuracy", strategy="per-layer", steps=6)
    ap.add_argument("--every", type=int, default=3, help="dynamic variant: steps between reselections")
    ap.add_argument("--variants", nargs="+", default=[v.label for v in SPEFT_VARIANTS],
                    choices=[v.label for v in SPEFT_VARIANTS], help="subset of the variants to run")
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.every < 1:
        ap.error("--every must be at least 1")
    if args.every >= args.steps:
        print(f"note: --every {args.every} >= --steps {args.steps}: the dynamic variant never reselects", flush=True)
    variants = [v for v in SPEFT_VARIANTS if v.label in args.variants]
    run_benchmark(args, variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
