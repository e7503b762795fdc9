"""The study: what row selection by importance buys, and how rows, columns, SPEFT and LoRA compare.

Each run is one point of the budget explorer (`rowsft.explore_budgets`): a short fine-tune of the
bundled SmolLM2-135M-Instruct from its pretrained weights, on a task where it learns (Rotten
Tomatoes as an LM task), evaluated on the same held-out questions, so that any two runs can be
compared question by question. Methods: rows selected by Taylor importance and at random (the
control), columns by Taylor, SPEFT's static gradient mask (single weights), and peft's LoRA, each
at its tuned learning rate (`rowsft.training.learning_rates`, from `benchmarks/lr_sweep.py`), at
two budgets of trainable parameters: parity with LoRA rank 1 (tight) and rank 8; several seeds
(batch order, random rows, initialisation). The report gives every accuracy with its interval,
the majority class, and paired tests for the papers' claims, written as shown or not shown.

    .venv/bin/python benchmarks/study.py                       # standard mode: about 31 runs, ~2 h on 2 cores
    .venv/bin/python benchmarks/study.py --workers 2           # two one-thread processes sharing the runs
    .venv/bin/python benchmarks/study.py --report              # only the report from the results file
    .venv/bin/python benchmarks/study.py --mode fast           # tiny model, seconds (tests)

Results: ``benchmarks/results/explorer-points.jsonl`` (the explorer's cache, shared with the
tutorials: one JSON record per run, rewritten atomically after each, so an interrupted study
resumes; other modes: ``study-<mode>.jsonl``), ``study-<mode>.md`` (the report)
and ``study-<mode>.fig.json`` (accuracy and memory against trainable parameters). The tight budget
runs first, seed by seed, so a study stopped early has its first claims complete.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rowsft.evaluation.stats import paired_over_seeds
from rowsft.explore.budgets import ExploreConfig, explore_budgets, point_key, read_cache
from rowsft.explore.summary import compare, point_rows
from rowsft.io_utils import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
UNITS = (("row", ("taylor", "random")), ("column", ("taylor",)), ("element", ("gradient",)))
# the standard study's runs are explorer points on the bundled model and default task: the tutorials'
# explorers read (and add to) the same file, so a point any of them ran is never run again
CACHES = {"standard": "explorer-points.jsonl"}
SERIES = ("row · taylor", "row · random", "column · taylor", "element · gradient", "LoRA (peft)")


@dataclass(frozen=True)
class StudyMode:
    model: str
    task: str
    budgets: tuple            # LoRA-parity budgets, so that every method has LoRA at exactly its size
    seeds: tuple
    steps: int
    batch_size: int
    max_length: int
    eval_examples: int
    max_train: int
    calibration_batches: int


MODES = {
    "standard": StudyMode(model="smollm2-135m", task="rotten_tomatoes", budgets=("lora:1", "lora:8"), seeds=(0, 1, 2),
                          steps=80, batch_size=8, max_length=96, eval_examples=400, max_train=2000,
                          calibration_batches=4),
    "fast": StudyMode(model="tiny-llama", task="rotten_tomatoes", budgets=("lora:1",), seeds=(0, 1), steps=2,
                      batch_size=2, max_length=32, eval_examples=8, max_train=16, calibration_batches=1),
}


def configs(mode: StudyMode, cache: Path, seed: int, budget: str) -> list[ExploreConfig]:
    """One explorer config per unit for one seed and budget (LoRA and zero-shot points come with the first)."""
    common = dict(model=mode.model, task=mode.task, budgets=[budget], steps=mode.steps,
                  batch_size=mode.batch_size, max_length=mode.max_length, eval_examples=mode.eval_examples,
                  max_train=mode.max_train, calibration_batches=mode.calibration_batches, seeds=[seed], cache=str(cache))
    return [ExploreConfig(unit=unit, metrics=list(metrics), **common) for unit, metrics in UNITS]


def run(mode: StudyMode, cache: Path, max_runs: int | None = None, worker: tuple[int, int] = (0, 1),
        only: tuple[str, ...] | None = None) -> None:
    """Every point not yet in ``cache``, seed by seed; ``max_runs`` new runs at most (resume later).
    ``worker=(k, n)``: only the points whose key falls to worker ``k`` of ``n`` (the others' share the cache).
    ``only``: only these methods' points (``row``, ``column``, ``element``, ``lora``; zero-shot always)."""
    runs_left = [max_runs]
    k, n = worker

    def mine(point: dict) -> bool:
        wanted = only is None or point["method"] in (*only, "zero-shot")
        return wanted and int(point_key(point), 16) % n == k

    def stop() -> bool:
        if runs_left[0] is None:
            return False
        runs_left[0] -= 1
        return runs_left[0] < 0

    for budget_label in mode.budgets:                # the tight budget first, over every seed: its claims first
        for seed in mode.seeds:
            for cfg in configs(mode, cache, seed, budget_label):
                explore_budgets(cfg, progress=n == 1, stop=stop, keep=mine)


def records_of(mode: StudyMode, cache: Path) -> list[dict]:
    """The runs of this mode in ``cache`` (points of other settings or budgets, e.g. a tutorial's, are ignored)."""
    keep = {"model": mode.model, "task": mode.task, "steps": mode.steps, "batch_size": mode.batch_size,
            "max_length": mode.max_length, "eval_examples": mode.eval_examples, "max_train": mode.max_train}
    return [r for r in read_cache(cache).values() if all(r.get(k) == v for k, v in keep.items())
            and (r["method"] == "zero-shot" or r.get("budget") in mode.budgets)]     # not the tutorials' other budgets


def table(records: list[dict]) -> str:
    """Per method and budget: trainable parameters, predicted peak, accuracy per seed and the mean's interval."""
    rows = point_rows(records)
    lines = ["| method | budget | trainable | peak MiB | accuracy per seed (95% Wilson) | mean over seeds (95% t) |",
             "|---|---|---|---|---|---|"]
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["series"], row["budget"]), []).append(row)
    order = ["zero-shot", *SERIES]
    for (name, budget), group in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), str(kv[0][1]))):
        per_seed = "; ".join(f"{r['accuracy']:.3f} ({r['low']:.3f}–{r['high']:.3f})" for r in sorted(group, key=lambda r: r["seed"]))
        mean = statistics.mean(r["accuracy"] for r in group)
        if len(group) >= 2:
            over = paired_over_seeds([r["accuracy"] for r in group])           # the t-interval of the mean itself
            spread = f"{mean:.3f} ({over['low']:.3f}–{over['high']:.3f}), n={len(group)}"
        else:
            spread = f"{mean:.3f} (one seed)"
        peak = "–" if group[0]["peak_mib"] is None else f"{group[0]['peak_mib']:.0f}"
        lines.append(f"| {name} | {budget} | {group[0]['trainable']:,} | {peak} | {per_seed} | {spread} |")
    majority = next((r["majority"] for r in rows if r["majority"] is not None), None)
    if majority is not None:
        lines.append(f"\nMajority class on these questions: {majority:.3f}.")
    return "\n".join(lines)


MARGIN = 0.02          # "matches": the mean paired difference lies within ±2 points (95% t-interval)


def claim_verdict(kind: str, over: dict | None, row: dict) -> str:
    """Words for one claim: ``better`` (the candidate beats the baseline), ``match`` (within ±MARGIN) or
    ``at_least`` (the candidate is no worse than the baseline by more than MARGIN)."""
    if over is None:
        return "not shown (one seed)"
    low, high = over["low"], over["high"]
    if kind == "better":
        return ("shown: the candidate is better" if low > 0 else
                "contradicted: the baseline is better" if high < 0 else "not shown: the interval includes no difference")
    if low >= -MARGIN and (kind == "at_least" or high <= MARGIN):
        return f"shown: within {100 * MARGIN:.0f} points" + ("" if kind == "match" else " or better")
    if high < -MARGIN or (kind == "match" and low > MARGIN):
        return f"contradicted: the difference exceeds {100 * MARGIN:.0f} points"
    return f"not shown: the interval is too wide to tell (it must lie within ±{100 * MARGIN:.0f} points)"


def claim_lines(records: list[dict]) -> list[str]:
    """The papers' claims, each per budget: the paired difference and whether it is shown."""
    claims = (("row · random", "row · taylor", "better", "rows chosen by Taylor importance beat random rows"),
              ("LoRA (peft)", "row · taylor", "match", "Taylor rows match LoRA at equal trainable parameters"),
              ("LoRA (peft)", "column · taylor", "match", "Taylor columns match LoRA at equal trainable parameters"),
              ("LoRA (peft)", "element · gradient", "at_least", "SPEFT's static gradient mask matches or beats LoRA"),
              ("zero-shot", "row · taylor", "better", "fine-tuning Taylor rows beats the zero-shot model"))
    lines = []
    for baseline, candidate, kind, claim in claims:
        for row in compare(records, baseline, candidate):
            over = row["over_seeds"]
            per_seed = ", ".join(f"{p:.2g}" for p in row["mcnemar_p"])
            interval = "" if over is None else \
                f", 95% t-interval over {over['n']} seeds {100 * over['low']:+.1f} to {100 * over['high']:+.1f}"
            lines.append(f"- {claim} ({row['budget']}): {candidate} minus {baseline} = {100 * row['difference']:+.1f} "
                         f"points{interval}; McNemar p per seed {per_seed}. **{claim_verdict(kind, over, row)}**")
    return lines


def report(mode_name: str, mode: StudyMode, cache: Path) -> str:
    records = records_of(mode, cache)
    if not records:
        return f"no runs of mode {mode_name!r} in {cache} yet"
    seconds = sum(r.get("train_seconds") or 0.0 for r in records)
    text = "\n".join([f"# Study, mode `{mode_name}`", "", f"Settings: `{json.dumps(asdict(mode))}`; {len(records)} runs, "
                      f"{seconds / 60:.0f} min of training in all. Learning rates: "
                      + ", ".join(sorted({f"{r['method']} {r['lr']:g}" for r in records if r['method'] != 'zero-shot'})),
                      "", table(records), "", "## The claims, paired on the same questions", "", *claim_lines(records)])
    return text + "\n"


def run_workers(args) -> None:
    """``args.workers`` child processes of this script, each running its share of the points."""
    import os
    import subprocess
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    base = [sys.executable, __file__, "--mode", args.mode, "--results", args.results]
    if args.max_runs is not None:
        base += ["--max-runs", str(args.max_runs)]
    if args.only:
        base += ["--only", *args.only]
    children = [subprocess.Popen([*base, "--worker", f"{k}/{args.workers}"], env=env) for k in range(args.workers)]
    failed = [c.args for c in children if c.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} study worker(s) failed; what they finished is saved: run again to resume")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=tuple(MODES), default="standard")
    parser.add_argument("--report", action="store_true", help="only write the report from the results file")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resume later)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the runs (and the CPU threads "
                        "evenly); 2 one-thread processes on a 2-core CPU")
    parser.add_argument("--only", nargs="+", choices=("row", "column", "element", "lora"),
                        help="run only these methods' points (e.g. while another method's learning rate is being swept)")
    parser.add_argument("--worker", default="0/1", help=argparse.SUPPRESS)        # k/n: set for the child processes
    args = parser.parse_args(argv)
    mode = MODES[args.mode]
    cache = Path(args.results) / CACHES.get(args.mode, f"study-{args.mode}.jsonl")
    report_path = Path(args.results) / f"study-{args.mode}.md"
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not args.report and args.workers > 1:
        run_workers(args)
    elif not args.report:
        k, n = (int(part) for part in args.worker.split("/"))
        run(mode, cache, args.max_runs, worker=(k, n), only=tuple(args.only) if args.only else None)
    text = report(args.mode, mode, cache)
    atomic_write_text(report_path, text)
    records = records_of(mode, cache)
    if records:
        from rowsft.viz import budget_explorer
        atomic_write_text(report_path.with_suffix(".fig.json"), budget_explorer(records).to_json())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
