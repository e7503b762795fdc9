"""Methods benchmark (issues 5 and 10): memory and step time of every method at LoRA-rank parity.

For each (tokens per batch, LoRA-rank budget) point, on the bundled SmolLM2-135M, in one run:
row-sparse (inputs rebuilt in backward where the frozen graph allows, `rowsft.layers.rebuild`, the default),
the same rows keeping their inputs (``row-kept``, ``rebuild_inputs=False``), column-sparse, the lean
unit choice (per module type the unit that saves fewer activations), SPEFT element masks (ours:
recompute, no dense copy kept), the dense-scatter element reference (a dense weight copy per forward,
as SPEFT's code does), LoRA through peft at that rank, full fine-tuning, and the floor: the frozen
model's own forward and backward through every block (`frozen_floor`), which every method that trains
all blocks pays before its update costs anything; the step-time ratios no method can beat follow from
it and are printed. Row and column selections
use ``random`` scores: which rows are chosen changes neither memory nor time. Element masks use SPEFT's
recommended static mask, ``gradient`` salience (global top-k) on the measured batch; an element layer
keeps no input copy where it is rebuilt, else its touched input columns when they are at most half.
Writes ``benchmarks/results/<name>.json`` and a plotly figure ``<name>.fig.json``.

    .venv/bin/python benchmarks/methods.py                      # the headline: batch 4 × 256, rank 8
    .venv/bin/python benchmarks/methods.py --seqs 128 256 512 1024 --ranks 8 --name sweep_tokens
    .venv/bin/python benchmarks/methods.py --seqs 256 --ranks 4 8 16 32 64 --name sweep_budget
    .venv/bin/python benchmarks/methods.py --methods row lean lora --compile --name compiled
    .venv/bin/python benchmarks/methods.py --autocast bf16 --name methods-bf16   # every method under autocast
    .venv/bin/python benchmarks/methods.py --seqs 64 128 256 512 1024 --methods element dense-scatter \
        --update benchmarks/results/sweep_tokens.json     # re-measure some methods of an existing sweep
    .venv/bin/python benchmarks/methods.py --methods floor row lora --steps 1 --profile 20 --name profiled
                                                          # also print each method's top 20 operators of one step

``--profile N`` (issue 23): after the timed steps, each method is built again, takes one untimed step, and one
more step runs under ``torch.profiler``; the N operators with the most self CPU time are printed per method
(and kept in the results file under ``profiles``), so where a method's time goes can be read next to its step time.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import paired_ratio  # noqa: E402

ALL = ("row", "row-in-weight", "row-usual", "row-recast", "row-kept", "row-ungrouped", "column", "lean", "element", "dense-scatter", "lora", "full", "floor")
COLORS = {"row": "#1f77b4", "row-in-weight": "#08306b", "row-usual": "#8c564b", "row-recast": "#9ecae1", "row-kept": "#aec7e8", "row-ungrouped": "#6baed6", "column": "#17becf", "lean": "#2ca02c", "element": "#ff7f0e",
          "dense-scatter": "#d62728", "lora": "#9467bd", "full": "#7f7f7f", "floor": "#bcbd22"}


def frozen_floor(model):
    """Everything frozen except the first block's first norm weight (a few hundred parameters).

    The backward must still run down through every block, computing each frozen layer's input gradient
    and keeping what those need, as every method that trains all blocks must: this is the time and
    memory no such method can go below (before the cost of its own update). Returns ``model``."""
    for p in model.parameters():
        p.requires_grad_(False)
    first = next((p for n, p in model.named_parameters()
                  if p.dim() == 1 and re.search(r"\.0\.(?:\w+\.)?(?:input_layernorm|ln_1|norm1?)\.weight$", n)), None)
    if first is None:
        raise ValueError("no norm weight found in the first block; the floor needs a model with pre-norm blocks")
    first.requires_grad_(True)
    return model


def above_floor(result, floor) -> float:
    """A method's own time above the floor: the median over rounds of its step minus the floor's step of the same
    round (steps are interleaved, so a slow spell of the machine falls on both and cancels; a difference of
    medians does not cancel it)."""
    return above_floor_interval(result, floor)["median"]


def above_floor_interval(result, floor) -> dict:
    """`above_floor` with its distribution-free 95 % interval (`rowsft.evaluation.stats.median_interval`:
    ``{"n", "median", "low", "high", "coverage"}``): how far the round-to-round noise leaves the median open."""
    from rowsft.evaluation.stats import median_interval
    return median_interval([t - f for t, f in zip(result.step_times_s, floor.step_times_s)])


def ratio_verdict(band: dict, reference: dict, target: float) -> tuple[str, float, float]:
    """Whether ``band`` (a method's time above the floor, `above_floor_interval`) is at most ``target`` × ``reference``
    (LoRA's) with the noise taken into account: ``("PASS", low, high)`` when even the far ends of the two intervals give
    a ratio ``high = band.high / reference.low`` ≤ target, ``"MISS"`` when even the near ends give ``low =
    band.low / reference.high`` > target, else ``"OPEN"`` (the intervals straddle the target: not shown either way).
    ``high`` is infinite when the reference's interval reaches zero."""
    low = band["low"] / reference["high"] if reference["high"] > 0 else math.inf
    high = band["high"] / reference["low"] if reference["low"] > 0 else math.inf
    verdict = "PASS" if high <= target else "MISS" if low > target else "OPEN"
    return verdict, low, high


def build_methods(model_name: str, batch: dict, rank: int, methods):
    import rowsft
    from rowsft import baselines
    from rowsft import scoring
    from rowsft.selection import strategies as sel
    from rowsft.layers import tuner

    def fresh():
        return rowsft.load_model(model_name)[0]

    probe = fresh()
    score = {u: scoring.score(probe, [batch], metric="gradient" if u == "element" else "random", unit=u,
                              num_batches=1)
             for u in ("row", "column", "element")
             if any(m == u or m.startswith(u + "-") or m in ("lean", "dense-scatter") for m in methods)}
    budget = sel.lora_parity(rank)
    selections = {}
    if any(m in methods for m in ("row", "row-in-weight", "row-usual", "row-recast", "row-kept", "row-ungrouped")):
        selections["row"] = sel.select(score["row"], budget)
    if "column" in methods:
        selections["column"] = sel.select(score["column"], budget)
    if "lean" in methods:
        selections["lean"] = sel.select({"row": score["row"], "column": score["column"]}, budget, unit_policy="lean")
    if "element" in methods or "dense-scatter" in methods:
        selections["element"] = sel.select(score["element"], budget, strategy="global")
    del probe

    def sparse(kind, rebuild_inputs=True, group_updates=True, train_in_weight=False, keep_cast_weights=True,
               train_in_cast=True, lend_rows=True):
        def build():
            m = fresh()
            tuner.apply(m, selections[kind], rebuild_inputs=rebuild_inputs, group_updates=group_updates,
                        train_in_weight=train_in_weight, keep_cast_weights=keep_cast_weights,
                        train_in_cast=train_in_cast, lend_rows=lend_rows)
            return m
        return build

    builders = {}
    for m in methods:
        if m in ("row", "column", "lean", "element"):
            builders[m] = (f"{m}", sparse(m))
        elif m == "row-in-weight":
            builders[m] = ("row, trained in the weight (train_in_weight=True)", sparse("row", train_in_weight=True))
        elif m == "row-usual":
            builders[m] = ("row, the usual update (lend_rows=False; under autocast train_in_cast=False)",
                           sparse("row", train_in_cast=False, lend_rows=False))
        elif m == "row-recast":
            builders[m] = ("row, weights cast every step (keep_cast_weights=False)",
                           sparse("row", keep_cast_weights=False))
        elif m == "row-kept":
            builders[m] = ("row, inputs kept (rebuild_inputs=False)", sparse("row", rebuild_inputs=False))
        elif m == "row-ungrouped":
            builders[m] = ("row, one product per layer (group_updates=False)", sparse("row", group_updates=False))
        elif m == "dense-scatter":
            builders[m] = ("element, dense scatter (SPEFT-style)",
                           lambda: baselines.dense_scatter_reference(fresh(), selections["element"]))
        elif m == "lora":
            builders[m] = (f"LoRA r={rank} (peft)", lambda: baselines.lora(fresh(), rank=rank))
        elif m == "full":
            builders[m] = ("full fine-tuning", lambda: baselines.full_finetune(fresh()))
        elif m == "floor":
            builders[m] = ("floor: frozen forward + backward", lambda: frozen_floor(fresh()))
    meta = {k: {"trainable": s.trainable_parameters, "unit_choice": s.meta.get("unit_choice")} for k, s in selections.items()}
    return builders, meta


def profile_step(build, batch: dict, autocast: str | None, top: int) -> list[dict]:
    """One step of a freshly built method under ``torch.profiler`` (after one untimed step): its ``top`` operators
    by self CPU time, each ``{"name", "self_cpu_ms", "calls", "cpu_total_ms"}``, the step's own time as ``step``."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    stepper = harness._Stepper(build(), batch, autocast=autocast)
    stepper.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        seconds = stepper.step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    rows = [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
             "cpu_total_ms": e.cpu_time_total / 1e3} for e in events]
    return [{"name": "step", "self_cpu_ms": seconds * 1e3, "calls": 1, "cpu_total_ms": seconds * 1e3}] + rows


def profile_table(rows: list[dict]) -> str:
    """`profile_step`'s rows as text; each operator's share of the profiled step's time."""
    step = rows[0]["self_cpu_ms"]
    lines = [f"{'operator':<48}{'self ms':>10}{'share':>8}{'calls':>8}{'total ms':>10}", "-" * 84]
    for r in rows[1:]:
        lines.append(f"{r['name'][:47]:<48}{r['self_cpu_ms']:>10.1f}{r['self_cpu_ms'] / step:>8.1%}{r['calls']:>8}"
                     f"{r['cpu_total_ms']:>10.1f}")
    lines.append(f"{'(profiled step, wall)':<48}{step:>10.1f}")
    return "\n".join(lines)


def figure(points: list[dict], path: Path) -> None:
    """Peak memory and step time against tokens per batch or trainable parameters."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:  # the benchmark itself needs no plotly
        return
    fig = make_subplots(rows=1, cols=2, subplot_titles=("peak step memory", "median step time"))
    methods = sorted({p["method"] for p in points}, key=lambda m: ALL.index(m) if m in ALL else 99)
    x_key = "tokens" if len({p["tokens"] for p in points}) > 1 else "trainable_parameters"
    for m in methods:
        pts = sorted((p for p in points if p["method"] == m), key=lambda p: p[x_key])
        xs = [p[x_key] for p in pts]
        line = {"color": COLORS.get(m, "#7f7f7f")}              # one colour per method in both panels
        fig.add_scatter(x=xs, y=[p["peak_bytes"] / 2**20 for p in pts], name=m, legendgroup=m, line=line, row=1, col=1)
        fig.add_scatter(x=xs, y=[p["median_step_s"] for p in pts], name=m, legendgroup=m, showlegend=False, line=line,
                        row=1, col=2)
    fig.update_xaxes(title_text="tokens per batch" if x_key == "tokens" else "trainable parameters")
    fig.update_yaxes(title_text="MiB", row=1, col=1)
    fig.update_yaxes(title_text="seconds", row=1, col=2)
    fig.write_json(path)  # plotly JSON (small); the tutorials load it with plotly.io.read_json


def slopes(points: list[dict]) -> dict:
    """Least-squares MiB per 1k tokens of each method's peak, over the token sweep."""
    out = {}
    for m in {p["method"] for p in points}:
        pts = [(p["tokens"], p["peak_bytes"]) for p in points if p["method"] == m]
        if len({t for t, _ in pts}) < 2:
            continue
        n = len(pts)
        mx = sum(t for t, _ in pts) / n
        my = sum(b for _, b in pts) / n
        cov = sum((t - mx) * (b - my) for t, b in pts)
        var = sum((t - mx) ** 2 for t, _ in pts)
        out[m] = cov / var * 1000 / 2**20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqs", type=int, nargs="+", default=[256])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8])
    ap.add_argument("--methods", nargs="+", default=list(ALL), choices=ALL)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--name", default="methods")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model (inductor); reports the first "
                    "step, which compiles, apart")
    ap.add_argument("--autocast", choices=("bf16", "fp16"), help="run every method's steps under torch.autocast "
                    "to this dtype (weights stay float32, as do rowsft's updates and LoRA's adapters)")
    ap.add_argument("--profile", type=int, nargs="?", const=15, default=0, metavar="N",
                    help="after the timed steps, profile one step per method and print its top N operators by self "
                    "CPU time (default 15 with no N)")
    ap.add_argument("--replot", type=Path, help="only redraw the figure of an existing results file")
    ap.add_argument("--update", type=Path, help="an existing results file whose points of the measured methods "
                    "(same tokens and rank) are replaced by this run's; the file records which were re-measured when")
    args = ap.parse_args(argv)
    if args.replot:
        figure(json.loads(args.replot.read_text())["points"], args.replot.with_suffix(".fig.json"))
        return 0

    import rowsft
    _, tokenizer = rowsft.load_model(args.model)
    points, profiles, ratio_tests = [], {}, []
    for seq in args.seqs:
        batch = harness.real_batch(tokenizer, args.batch, seq)
        for rank in args.ranks:
            builders, meta = build_methods(args.model, batch, rank, args.methods)
            results = harness.measure_methods([(label, build) for label, build in builders.values()], batch,
                                              args.steps, extras=[{"key": key} for key in builders],
                                              compile_model=args.compile, autocast=args.autocast)
            ref = next((r.method for r in results if r.extra["key"] == "lora"), None)
            print(f"\n{args.model}: batch {args.batch} × {seq} tokens, LoRA-rank-{rank} parity"
                  + (f", autocast {args.autocast}" if args.autocast else ""))
            print(harness.table(results, reference=ref))
            for r in results:
                points.append({"method": r.extra["key"], "label": r.method, "tokens": args.batch * seq, "seq": seq,
                               "rank": rank, "trainable_parameters": r.trainable_parameters, "peak_bytes": r.peak_bytes,
                               "median_step_s": r.median_step_s, "step_times_s": r.step_times_s, "analytic": r.analytic,
                               "first_step_s": r.extra.get("first_step_s"), "compiled": args.compile,
                               "positions": r.extra.get("positions"),
                               "autocast": args.autocast,
                               "unit_choice": meta.get(r.extra["key"], {}).get("unit_choice")})
            if args.profile:
                for key, (label, build) in builders.items():
                    top = profile_step(build, batch, args.autocast, args.profile)
                    profiles[f"{key} {args.batch}x{seq} r{rank}"] = top
                    print(f"\n{label}: top {args.profile} operators by self CPU time, one step")
                    print(profile_table(top))
            by = {r.extra["key"]: r for r in results}
            if {"lora", "full"} <= by.keys():
                best = min((by[k] for k in ("row", "column", "lean") if k in by), key=lambda r: r.peak_bytes, default=None)
                if best:
                    lora, full = by["lora"], by["full"]
                    print(f"\nbest rowsft form: {best.method}")
                    for label, value, limit in (
                            ("peak ≤ 0.90 × LoRA", best.peak_bytes / lora.peak_bytes, 0.90),
                            ("step ≤ 0.80 × LoRA", best.median_step_s / lora.median_step_s, 0.80),
                            ("step ≤ 0.65 × full", best.median_step_s / full.median_step_s, 0.65)):
                        print(f"{'PASS' if value <= limit else 'MISS'}  {label}: {value:.3f}")
                    if "floor" in by:   # what no method that trains every block can beat, before its own update
                        floor = by["floor"]
                        print(f"floor (frozen forward + backward): step {floor.median_step_s / lora.median_step_s:.3f} × LoRA, "
                              f"{floor.median_step_s / full.median_step_s:.3f} × full; peak "
                              f"{floor.peak_bytes / lora.peak_bytes:.3f} × LoRA. {best.method}'s own update costs "
                              f"{best.median_step_s - floor.median_step_s:+.3f} s, LoRA's "
                              f"{lora.median_step_s - floor.median_step_s:+.3f} s")
            if {"floor", "lora"} <= by.keys():   # issue 23: each update's own time above the frozen floor
                floor, lora = by["floor"], by["lora"]
                lora_band = above_floor_interval(lora, floor)
                lora_extra = lora_band["median"]
                print(f"times above the floor: the median over {lora_band['n']} rounds of (step − the floor's step "
                      f"in the same round), [a distribution-free interval covering {lora_band['coverage']:.1%}]")
                for key in ("row", "row-in-weight", "row-usual", "row-recast", "row-ungrouped", "row-kept", "column", "lean", "element"):
                    if key in by and lora_extra > 0:
                        band = above_floor_interval(by[key], floor)
                        extra = band["median"]
                        aimed = key in ("row", "row-in-weight")
                        verdict, low, high = ratio_verdict(band, lora_band, 0.30)
                        print(f"{verdict if aimed else '    '}  above the floor: {key} {extra:+.3f} s [{band['low']:+.3f}, "
                              f"{band['high']:+.3f}], LoRA {lora_extra:+.3f} s [{lora_band['low']:+.3f}, "
                              f"{lora_band['high']:+.3f}], ratio {extra / lora_extra:.3f} [{low:.3f}, {high:.3f}]"
                              + (" (target ≤ 0.30: PASS when the far end is under it, OPEN when the ends straddle it)"
                                 if aimed else "")
                              + f"  [difference of medians: {by[key].median_step_s - floor.median_step_s:+.3f} s, "
                                f"LoRA {lora.median_step_s - floor.median_step_s:+.3f} s]")
                        if aimed or key in ("row-usual", "row-recast"):    # the verdict that pairs the rounds (`paired_ratio`)
                            test = paired_ratio.paired_ratio(by[key].step_times_s, lora.step_times_s,
                                                             floor.step_times_s, target=0.30)
                            ratio_tests.append({"method": key, "tokens": args.batch * seq, "rank": rank, **test})
                            print(paired_ratio.describe(test))
            for other, what in (("row-usual", "rows lent (float32) or in the cast (autocast)"),
                                ("row-recast", "kept casts and rows in them")):
                if {"row", other} <= by.keys():    # what the default's autocast paths buy, paired round by round
                    band = above_floor_interval(by["row"], by[other])
                    print(f"{what}: row − {other} {band['median']:+.3f} s a step [{band['low']:+.3f}, "
                          f"{band['high']:+.3f}] (median over {band['n']} rounds, {band['coverage']:.1%} interval)")
            if {"element", "dense-scatter"} <= by.keys():
                v = by["element"].peak_bytes / by["dense-scatter"].peak_bytes
                print(f"{'PASS' if v <= 0.7 else 'MISS'}  element peak ≤ 0.7 × dense-scatter peak: {v:.3f}")
    payload = {"args": vars(args), "points": points}
    if ratio_tests:
        payload["ratio_tests"] = ratio_tests
    if profiles:
        payload["profiles"] = profiles
    if args.update:
        payload = json.loads(args.update.read_text())
        payload.setdefault("first_run", {k: payload.get(k) for k in ("machine", "command", "date")})
        fresh = {(p["method"], p["tokens"], p["rank"]) for p in points}
        payload["points"] = [p for p in payload["points"] if (p["method"], p["tokens"], p["rank"]) not in fresh] + points
        touched = {(t, r) for _, t, r in fresh}      # a verdict pairs a point's rounds: stale once any method is re-run
        payload["ratio_tests"] = [t for t in payload.get("ratio_tests", [])
                                  if (t["tokens"], t["rank"]) not in touched] + ratio_tests
        payload.setdefault("updates", []).append({"date": time.strftime("%Y-%m-%d %H:%M"), "methods": args.methods,
                                                  "seqs": args.seqs, "ranks": args.ranks, "machine": harness.machine()})
        points = payload["points"]
    slope = slopes(points)
    if slope:
        print("\npeak memory growth, MiB per 1k tokens: " + ", ".join(f"{m} {s:.1f}" for m, s in sorted(slope.items())))
    payload["slopes_mib_per_1k_tokens"] = slope
    name = args.update.stem if args.update else args.name
    path = harness.write_results(name, {k: v for k, v in payload.items()
                                        if k not in ("benchmark", "machine", "command", "date")}, path=args.update)
    figure(points, path.with_suffix(".fig.json"))
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
