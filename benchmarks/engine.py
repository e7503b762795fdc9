"""Engine benchmark (issue 3): peak training-step memory and step time of row-sparse vs LoRA vs full.

On the bundled SmolLM2-135M with one real BoolQ batch of 4 × 256 tokens, in one run:
row-sparse at 64 rows per layer (all linear layers), LoRA through peft at the rank whose trainable
parameters are closest to that selection, and full fine-tuning. Prints the table and the ratios
against the targets, writes ``benchmarks/results/engine.json``.

    .venv/bin/python benchmarks/engine.py [--model smollm2-135m] [--batch 4] [--seq 256] [--rows 64] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--name", default="engine")
    args = ap.parse_args(argv)

    import rowsft
    from rowsft import baselines
    from rowsft import scoring
    from rowsft.selection import strategies as sel
    from rowsft.layers import tuner

    _, tokenizer = rowsft.load_model(args.model)
    batch = harness.real_batch(tokenizer, args.batch, args.seq)

    def fresh():
        model, _ = rowsft.load_model(args.model)
        return model

    probe = fresh()
    scores = scoring.score(probe, [batch], metric="random", unit="row", num_batches=1)
    selection = sel.select(scores, args.rows)
    rank = baselines.lora_parity_rank(probe, selection)
    del probe

    def row_sparse():
        m = fresh()
        tuner.apply(m, selection)
        return m

    results = harness.measure_methods([
        (f"row-sparse ({args.rows} rows)", row_sparse),
        (f"LoRA r={rank} (peft)", lambda: baselines.lora(fresh(), rank=rank)),
        ("full fine-tuning", lambda: baselines.full_finetune(fresh())),
    ], batch, args.steps)
    row, lora, full = results
    print(f"\n{args.model}, batch {args.batch} × {args.seq} tokens, {harness.machine()['threads']} threads")
    print(harness.table(results, reference=lora.method))
    checks = {
        "row peak ≤ LoRA peak": (row.peak_bytes / lora.peak_bytes, 1.0),
        "row step ≤ 1.1 × LoRA step": (row.median_step_s / lora.median_step_s, 1.1),
        "row step ≤ 0.75 × full step": (row.median_step_s / full.median_step_s, 0.75),
        "row measured within 15% of analytic": (abs(row.peak_bytes / row.analytic["total"] - 1), 0.15),
    }
    print()
    for label, (value, limit) in checks.items():
        print(f"{'PASS' if value <= limit else 'MISS'}  {label}: {value:.3f} (target ≤ {limit})")
    path = harness.write_results(args.name, {"args": vars(args), "lora_rank": rank, "results": results,
                                             "checks": {k: {"value": v, "target": t} for k, (v, t) in checks.items()}})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
