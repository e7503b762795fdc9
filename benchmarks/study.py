"""The study (issue 8): accuracy, memory and time of every method on every task, resumable.

Each run is one `rowsft.cli.job.run_job` (same code as the CLI and the tutorials): fine-tune under
the same step budget, evaluate on the task's validation split, record accuracy, trainable
parameters, analytic and measured peak training memory, median step time and wall time. One JSON
line per run in ``benchmarks/results/study-<mode>.jsonl``; the file is rewritten atomically after
every run, so an interrupted study resumes where it stopped and never leaves a half-written file.

    .venv/bin/python benchmarks/study.py --mode reduced            # CPU, one process
    .venv/bin/python benchmarks/study.py --mode full --device cuda # a GPU run: more steps, lr sweep
    .venv/bin/python benchmarks/study.py --mode reduced --report   # only rebuild table and figures
    .venv/bin/python benchmarks/study.py --mode reduced --workers 2   # two processes of one thread on 2 cores

Methods: row-sparse with taylor / hessian / zo-taylor / magnitude / random selection, column-sparse
with taylor, the SPEFT static gradient mask, LoRA and DoRA through peft at parameter parity
(LoRA rank 8 ⇔ rows at ``lora:8``), full fine-tuning. Tasks: BoolQ, PIQA, SIQA, OpenBookQA,
CommonsenseQA with SmolLM2-135M (choice log-likelihood); Rotten Tomatoes with all-MiniLM-L6-v2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

LM_TASKS = ("boolq", "piqa", "siqa", "openbookqa", "commonsenseqa")
# (label, method, metric): the rows of the study
METHODS = (
    ("row taylor", "rowsft", "taylor"), ("row hessian", "rowsft", "hessian"), ("row zo-taylor", "rowsft", "zo-taylor"),
    ("row magnitude", "rowsft", "magnitude"), ("row random", "rowsft", "random"), ("column taylor", "column", "taylor"),
    ("SPEFT gradient (static)", "element", "gradient"), ("LoRA", "lora", "-"), ("DoRA", "dora", "-"),
    ("full fine-tuning", "full", "-"),
)
MULTI_SEED = ("row taylor", "row random", "LoRA")


@dataclass
class Mode:
    steps: int
    seeds: int
    lrs: dict            # method → list of learning rates swept
    max_length: int
    batch_size: int
    eval_examples: int
    max_train: int
    calibration_batches: int
    zo_perturbations: int = 64   # row zo-taylor: SPSA perturbations (each = 2 forward passes per calibration batch)

    def fingerprint(self) -> str:
        """Short hash of the settings that change a run's result; rows from other settings are kept but not mixed in."""
        import hashlib
        settings = {k: v for k, v in asdict(self).items() if k not in ("seeds", "lrs")}
        return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


MODES = {
    "reduced": Mode(steps=16, seeds=3, max_length=128, batch_size=4, eval_examples=100, max_train=400,
                    calibration_batches=2, zo_perturbations=16,
                    lrs={"rowsft": [5e-4], "column": [5e-4], "element": [5e-4], "lora": [5e-4], "dora": [5e-4], "full": [2e-5]}),
    "full": Mode(steps=500, seeds=3, max_length=256, batch_size=16, eval_examples=1000, max_train=None,
                 calibration_batches=8,
                 lrs={"rowsft": [1e-4, 3e-4, 1e-3], "column": [1e-4, 3e-4, 1e-3], "element": [1e-4, 3e-4, 1e-3],
                      "lora": [1e-4, 3e-4, 1e-3], "dora": [1e-4, 3e-4, 1e-3], "full": [1e-5, 3e-5, 1e-4]}),
}


def plan(mode: Mode, tasks) -> list[dict]:
    runs, fp = [], mode.fingerprint()
    for task in tasks:
        model = "minilm-l6" if task == "rotten_tomatoes" else "smollm2-135m"
        runs.append({"task": task, "label": "zero-shot", "method": "none", "metric": "-", "seed": 0, "lr": 0.0, "model": model,
                     "mode": fp})
        for label, method, metric in METHODS:
            seeds = range(mode.seeds if label in MULTI_SEED else 1)
            for lr in mode.lrs[method]:
                for seed in seeds:
                    runs.append({"task": task, "label": label, "method": method, "metric": metric, "seed": seed, "lr": lr,
                                 "model": model, "mode": fp})
    return runs


def key(run: dict) -> str:
    return f"{run.get('mode')}|{run['task']}|{run['label']}|{run['seed']}|{run['lr']}"


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Merge ``rows`` into the results file under a lock and return what the file now holds.

    Several study processes (e.g. one per task group, one thread each on a multi-core machine) can
    share one file: each save re-reads it, adds the rows it lacks and replaces it atomically.
    """
    import fcntl
    from rowsft.io_utils import atomic_write_text
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = load_rows(path)
        known = {key(r) for r in merged}
        merged += [r for r in rows if key(r) not in known]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in merged))
    return merged


def execute(run: dict, mode: Mode, device: str | None) -> dict:
    from rowsft import data as zoo
    from rowsft.evaluation import evaluate
    from rowsft.cli.job import JobConfig, run_job
    import torch
    t0 = time.perf_counter()
    if run["method"] == "none":
        model, tokenizer = zoo.load_model(run["model"])
        data = zoo.load_dataset(run["task"], max_train=mode.max_train, seed=0)
        acc = evaluate(model, tokenizer, data["validation"], max_length=mode.max_length, max_examples=mode.eval_examples,
                       progress=False)["accuracy"]
        return {**run, "accuracy": acc, "trainable_parameters": 0, "wall_s": time.perf_counter() - t0,
                "threads": torch.get_num_threads()}
    cfg = JobConfig(model=run["model"], task=run["task"], method=run["method"],
                    metric=run["metric"] if run["metric"] != "-" else "taylor", budget="lora:8", lora_rank=8,
                    steps=mode.steps, lr=run["lr"], batch_size=mode.batch_size, max_length=mode.max_length,
                    calibration_batches=mode.calibration_batches, max_train=mode.max_train,
                    eval_examples=mode.eval_examples, eval_before=False, seed=run["seed"], device=device,
                    zo_perturbations=mode.zo_perturbations, progress=False, measure_peak=run["seed"] == 0)
    result = run_job(cfg, log=lambda *_: None)
    return {**run, "accuracy": result.accuracy_after, "trainable_parameters": result.trainable_parameters,
            "analytic_total_bytes": result.memory.get("total"), "measured_peak_bytes": result.memory.get("measured_peak"),
            "median_step_s": result.median_step_seconds, "train_s": result.train_seconds, "final_loss": result.final_loss,
            "wall_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (task, label): best lr by mean accuracy over seeds, with mean, spread and costs."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["label"], r["lr"]), []).append(r)
    best: dict = {}
    for (task, label, lr), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        entry = {"task": task, "label": label, "lr": lr, "n": len(rs), "mean": statistics.mean(accs),
                 "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                 "trainable": rs[0]["trainable_parameters"],
                 "peak": next((r.get("measured_peak_bytes") for r in rs if r.get("measured_peak_bytes")), None),
                 "step_s": statistics.median([r["median_step_s"] for r in rs if r.get("median_step_s")] or [0.0])}
        if (task, label) not in best or entry["mean"] > best[(task, label)]["mean"]:
            best[(task, label)] = entry
    return list(best.values())


def markdown(agg: list[dict], tasks) -> str:
    labels = ["zero-shot"] + [m[0] for m in METHODS]
    by = {(a["task"], a["label"]): a for a in agg}
    head = "| method | " + " | ".join(tasks) + " | LM-task mean | trainable | peak MiB (boolq) | step s (boolq) |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for label in labels:
        cells, lm = [], []
        for t in tasks:
            a = by.get((t, label))
            if a is None:
                cells.append("–")
                continue
            cells.append(f"{100 * a['mean']:.1f}" + (f" ± {100 * a['std']:.1f}" if a["n"] > 1 else ""))
            if t in LM_TASKS:
                lm.append(a["mean"])
        ref = by.get(("boolq", label)) or {}
        peak = f"{ref['peak'] / 2**20:.0f}" if ref.get("peak") else "–"
        step = f"{ref['step_s']:.2f}" if ref.get("step_s") else "–"
        mean = f"{100 * statistics.mean(lm):.1f}" if lm else "–"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} | {ref.get('trainable', 0):,} | {peak} | {step} |")
    return "\n".join(lines)


def claims(agg: list[dict], tasks) -> list[str]:
    """The papers' claims checked on these results: PASS / MISS lines with the numbers."""
    by = {(a["task"], a["label"]): a for a in agg}
    lm = [t for t in tasks if t in LM_TASKS]

    def mean_acc(label):
        accs = [by[(t, label)]["mean"] for t in lm if (t, label) in by]
        return 100 * statistics.mean(accs) if accs and len(accs) == len(lm) else None

    lines = []
    taylor, lora, random_ = mean_acc("row taylor"), mean_acc("LoRA"), mean_acc("row random")
    speft = mean_acc("SPEFT gradient (static)")
    if None not in (taylor, lora):
        lines.append(f"{'PASS' if taylor >= lora - 1 else 'MISS'}  row taylor within 1 point of LoRA (mean over "
                     f"{len(lm)} LM tasks): {taylor:.1f} vs {lora:.1f} ({taylor - lora:+.1f})")
    if None not in (taylor, random_):
        lines.append(f"{'PASS' if taylor > random_ else 'MISS'}  row taylor above row random: {taylor:.1f} vs {random_:.1f} "
                     f"({taylor - random_:+.1f})")
    if None not in (speft, lora):
        lines.append(f"{'PASS' if speft >= lora else 'MISS'}  SPEFT static gradient matches or beats LoRA: {speft:.1f} vs "
                     f"{lora:.1f} ({speft - lora:+.1f})")
    peaks = {label: (by.get(("boolq", label)) or {}).get("peak") for label in ("row taylor", "LoRA")}
    if all(peaks.values()):
        ratio = peaks["row taylor"] / peaks["LoRA"]
        lines.append(f"{'PASS' if ratio <= 1 else 'MISS'}  row peak memory ≤ LoRA's (BoolQ step): {ratio:.3f} × LoRA "
                     f"({peaks['row taylor'] / 2**20:.0f} vs {peaks['LoRA'] / 2**20:.0f} MiB)")
    return lines


def figures(agg: list[dict], out: Path) -> None:
    try:
        import plotly.graph_objects as go
    except ImportError:
        return
    for x_key, title, fname in (("trainable", "trainable parameters", "acc_vs_params"), ("peak", "peak training memory (MiB)", "acc_vs_memory")):
        fig = go.Figure()
        for label in sorted({a["label"] for a in agg if a["label"] != "zero-shot"}):
            pts = [a for a in agg if a["label"] == label and a["task"] in LM_TASKS and a.get(x_key)]
            if not pts:
                continue
            x = statistics.mean(a[x_key] for a in pts) / (2**20 if x_key == "peak" else 1)
            fig.add_scatter(x=[x], y=[100 * statistics.mean(a["mean"] for a in pts)], mode="markers+text", text=[label],
                            textposition="top center", name=label)
        fig.update_layout(title=f"mean accuracy over the LM tasks vs {title}", xaxis_title=title, yaxis_title="accuracy (%)",
                          xaxis_type="log" if x_key == "trainable" else "linear", showlegend=False)
        fig.write_json(out.parent / f"{out.stem}-{fname}.fig.json")


def run_workers(args) -> None:
    """Run the study in ``args.workers`` child processes, tasks dealt round-robin, threads split evenly."""
    import os
    import subprocess
    groups = [args.tasks[i::args.workers] for i in range(args.workers) if args.tasks[i::args.workers]]
    threads = max(1, (os.cpu_count() or 1) // len(groups))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    children = []
    for position, tasks in enumerate(groups):
        command = [sys.executable, __file__, "--mode", args.mode, "--tasks", *tasks, "--position", str(position)]
        if args.device:
            command += ["--device", args.device]
        if args.max_runs is not None:
            command += ["--max-runs", str(args.max_runs)]
        children.append(subprocess.Popen(command, env=env))
    failed = [c.args for c in children if c.wait() != 0]
    if failed:
        raise SystemExit(f"{len(failed)} study worker(s) failed; what they finished is saved, run again to resume")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=tuple(MODES), default="reduced")
    ap.add_argument("--tasks", nargs="+", default=[*LM_TASKS, "rotten_tomatoes"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--report", action="store_true", help="only rebuild the table and figures from the results file")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (resume later)")
    ap.add_argument("--workers", type=int, default=1, help="study processes sharing the results file, the tasks "
                    "split between them, torch threads split evenly (2 on a 2-core CPU)")
    ap.add_argument("--position", type=int, default=0, help=argparse.SUPPRESS)   # progress-bar row of a worker
    args = ap.parse_args(argv)
    if args.workers > 1 and not args.report:
        run_workers(args)
        args.report = True                                     # the workers ran everything: only the report is left

    import torch
    from tqdm.auto import tqdm
    mode = MODES[args.mode]
    out = harness.RESULTS / f"study-{args.mode}.jsonl"
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    rows = load_rows(out)
    done = {key(r) for r in rows}
    todo = [r for r in plan(mode, args.tasks) if key(r) not in done]
    if not args.report:
        print(f"{len(done)} runs done, {len(todo)} to go → {out}")
        for i, run in enumerate(tqdm(todo, desc=f"study {' '.join(args.tasks)}", unit="run", position=args.position)):
            if args.max_runs is not None and i >= args.max_runs:
                break
            torch.manual_seed(run["seed"])
            if key(run) in {key(r) for r in load_rows(out)}:    # another study process did it meanwhile
                continue
            rows = save_rows(out, [*rows, execute(run, mode, args.device)])
    rows = load_rows(out)                                      # with the rows of any other study process
    current = [r for r in rows if r.get("mode") == mode.fingerprint() and r["task"] in args.tasks]
    if len(current) < len(rows):
        print(f"{len(rows) - len(current)} rows in {out.name} come from other settings or tasks: kept, not reported")
    agg = aggregate(current)
    table = markdown(agg, args.tasks)
    from rowsft.io_utils import atomic_write_text
    total_min = sum(r.get("wall_s", 0.0) for r in current) / 60
    checks = claims(agg, args.tasks)
    machine = {k: v for k, v in harness.machine().items() if k != "threads"}   # threads: per run, in the rows
    atomic_write_text(out.with_suffix(".md"), f"Mode `{args.mode}` ({asdict(mode)}), machine {machine}, "
                      f"{len(current)} runs, {total_min:.0f} min of run time in all\n\n{table}\n\n"
                      + "".join(f"- {c}\n" for c in checks))
    figures(agg, out)
    print(table)
    print("\n".join(["", *checks]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
