"""Scoring benchmark (issue 4): time and peak memory of computing row importance.

On the bundled SmolLM2-135M over ``--batches`` calibration batches of BoolQ (batch × seq tokens):
- streaming Taylor row scores (`rowsft.score`, hooks, no weight gradients, each block's activations
  recomputed in backward), and the same without recomputation,
- the plain way: every weight requires grad, ``loss.backward()`` over the whole model per batch,
  then ``Σ_j |W ⊙ G|`` from the accumulated ``.grad`` tensors,
- zeroth-order Taylor (forward passes only),
- inference alone (forward passes under ``no_grad``), the floor for zo-taylor.
Peak = the model's weights + the peak bytes allocated above them during the region (CPU: the
profiler's memory events; CUDA: ``max_memory_allocated``). Targets: streaming ≤ 0.6 × plain;
zo-taylor ≤ inference + 10%.

    .venv/bin/python benchmarks/scoring.py [--batches 8] [--batch 4] [--seq 256] [--perturbations 4]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--perturbations", type=int, default=4, help="SPSA perturbations per batch for zo-taylor")
    ap.add_argument("--only", nargs="*", help="run only these rows (substrings of their names)")
    args = ap.parse_args(argv)

    import rowsft
    from rowsft.memory.measure import region_peak, unique_storage_bytes
    from rowsft.lean_loss import training_loss
    from rowsft.targets import find_targets, is_transposed

    model, tokenizer = rowsft.load_model(args.model)
    data = rowsft.load_dataset("boolq")
    batches = list(rowsft.batches(data["train"], tokenizer, batch_size=args.batch, max_length=args.seq, seed=0))[: args.batches]
    weights = unique_storage_bytes(list(model.parameters()) + list(model.buffers()))
    device = next(model.parameters()).device

    def plain_taylor(lean=False):
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        for b in batches:
            training_loss(model, b, lean=lean).backward()   # lean=False: model(**b).loss, logits at every position
        # Σ_j |W_ij G_ij| per output row; Conv1D stores (d_in, d_out), so its rows are summed over dim 0
        out = {n: (m.weight * m.weight.grad).abs().sum(dim=0 if is_transposed(m) else 1)
               for n, m in find_targets(model).items()}
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(False)
        return out

    def inference():
        model.eval()
        with torch.no_grad():
            for b in batches:
                model(**b)

    runs = {
        "streaming taylor (rowsft)": lambda: rowsft.score(model, batches, metric="taylor", unit="row", num_batches=len(batches)),
        "same, blocks not recomputed": lambda: rowsft.score(model, batches, metric="taylor", unit="row",
                                                             num_batches=len(batches), recompute=False),
        "plain loss.backward() taylor": plain_taylor,
        "same, lean logits": lambda: plain_taylor(lean=True),
        "zo-taylor (rowsft)": lambda: rowsft.score(model, batches, metric="zo-taylor", unit="row", num_batches=len(batches),
                                                   num_perturbations=args.perturbations),
        "inference only": inference,
    }
    for p in model.parameters():
        p.requires_grad_(False)
    if args.only:
        runs = {n: f for n, f in runs.items() if any(o in n for o in args.only)}
    rows = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        measured = region_peak(fn, device)
        rows[name] = {"seconds": time.perf_counter() - t0, "peak_bytes": weights + measured["peak_delta"],
                      "peak_above_weights": measured["peak_delta"]}
    print(f"\n{args.model}: {len(batches)} calibration batches of {args.batch} × ≤{args.seq} tokens (BoolQ)")
    print(f"{'':<32}{'seconds':>10}{'peak MiB':>11}{'above weights MiB':>19}")
    for name, r in rows.items():
        print(f"{name:<32}{r['seconds']:>10.1f}{r['peak_bytes'] / 2**20:>11.1f}{r['peak_above_weights'] / 2**20:>19.1f}")

    def ratio(a, b):
        return rows[a]["peak_bytes"] / rows[b]["peak_bytes"] if a in rows and b in rows else None
    stream, norecompute = "streaming taylor (rowsft)", "same, blocks not recomputed"
    plain, lean_plain = "plain loss.backward() taylor", "same, lean logits"
    for a, b, what in [(stream, lean_plain, "streaming / plain with lean logits (the LM-head saving taken out)"),
                       (norecompute, plain, "streaming without recomputation / plain"),
                       (stream, norecompute, "recomputation's own saving")]:
        if ratio(a, b) is not None:
            print(f"{what}: {ratio(a, b):.3f}")
    checks = {label: (ratio(a, b), limit) for label, a, b, limit in [
        ("streaming peak ≤ 0.6 × plain peak", stream, plain, 0.6),
        ("zo-taylor peak ≤ 1.1 × inference peak", "zo-taylor (rowsft)", "inference only", 1.1)]
        if ratio(a, b) is not None}
    print()
    for label, (value, limit) in checks.items():
        print(f"{'PASS' if value <= limit else 'MISS'}  {label}: {value:.3f} (target ≤ {limit})")
    path = harness.write_results("scoring" if not args.only else "scoring-partial", {"args": vars(args), "results": rows,
                                             "checks": {k: {"value": v, "target": t} for k, (v, t) in checks.items()}})
    print(f"\nwritten {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
