"""Quantized-base benchmark (issue 21): rows on a 4-bit frozen base against QLoRA and the float32 methods.

On the bundled SmolLM2-135M with one real BoolQ batch of 4 × 256 tokens, at LoRA-rank-8 parity, one run
each: rows on an nf4 base, QLoRA (peft LoRA r=8 on the same nf4 base), rows on the float32 model, LoRA r=8
on the float32 model. The timed steps are interleaved round-robin and the peak of one more step of each is
measured with ``rowsft.memory.measure_peak`` (CPU: the profiler's memory events; CUDA:
``max_memory_allocated``; never RSS), all through ``benchmarks/harness.py``. The memory predictor
(``rowsft.memory.predict``) is shown beside each measurement. The row selection is drawn at random
(memory and time do not depend on which rows), the same for both bases.

Targets: rows on nf4 peak at ≤ 0.85 × QLoRA's peak and ≤ 0.65 × float32 LoRA's. Prints the table and
writes ``benchmarks/results/<name>.json`` and ``.md`` (``--device cuda`` when a GPU is there: the same
benchmark on CUDA, results named ``quantized-cuda`` by default).

    .venv/bin/python benchmarks/quantized.py [--model smollm2-135m] [--batch 4] [--seq 256] [--rank 8] [--steps 3]
    .venv/bin/python benchmarks/quantized.py --double-quant        # both nf4 bases with QLoRA's double quantization
                                                                   # (8-bit absmax), results named quantized-dq
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

TARGETS = {"rows nf4 / QLoRA": 0.85, "rows nf4 / LoRA float32": 0.65}


def build_methods(model_name: str, batch: dict, rank: int, device: str, double_quant: bool = False):
    """``[(label, builder)]`` of the four methods, and the row selection's trainable-parameter count."""
    import rowsft
    from rowsft import baselines
    from rowsft.layers import tuner
    from rowsft.scoring import score
    from rowsft.selection import strategies as sel

    def fresh(quantization=None):
        nested = {"double_quant": double_quant} if quantization is not None else {}
        return rowsft.load_model(model_name, quantization=quantization, device=device, **nested)[0]

    probe = fresh()
    selection = sel.select(score(probe, [batch], metric="random", unit="row", num_batches=1), sel.lora_parity(rank))
    del probe

    def rows(quantization):
        def build():
            model = fresh(quantization)
            tuner.apply(model, selection)
            return model
        return build

    nf4 = "nf4 + double quant" if double_quant else "nf4"
    builders = [(f"rows on {nf4}", rows("nf4")),
                (f"QLoRA r={rank} (peft, {nf4})", lambda: baselines.qlora(fresh("nf4"), rank=rank)),
                ("rows on float32", rows(None)),
                (f"LoRA r={rank} (peft, float32)", lambda: baselines.lora(fresh(), rank=rank))]
    specs = [selection, ("lora", rank), selection, ("lora", rank)]
    return builders, specs, selection.trainable_parameters


def with_predictions(builders, specs, batch: dict, predicted: list[int]):
    """The builders, each also putting ``rowsft.memory.predict`` of the model it built into ``predicted``."""
    from rowsft.lean_loss import logit_positions
    from rowsft.memory import predict
    b, t = batch["input_ids"].shape

    def wrapped(build, spec):
        def build_and_predict():
            model = build()
            predicted.append(int(predict(model, spec, b, t, logit_positions=logit_positions(batch)).total))
            return model
        return build_and_predict
    return [(label, wrapped(build, spec)) for (label, build), spec in zip(builders, specs)]


def markdown(results, predicted, ratios, args) -> str:
    lines = [f"SmolLM2-135M ({args.model}), one BoolQ batch of {args.batch} × {args.seq} tokens, LoRA-rank-{args.rank} "
             f"parity, {args.steps} timed steps each (interleaved), {harness.machine()['threads']} threads, "
             f"device {args.device}{', nf4 with double quantization' if args.double_quant else ''}.", "",
             "| method | trainable | peak MiB (measured) | predicted MiB | median step s | peak × QLoRA "
             "| peak × LoRA fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    qlora, lora = results[1], results[3]
    for r, p in zip(results, predicted):
        lines.append(f"| {r.method} | {r.trainable_parameters:,} | {r.peak_bytes / 2**20:.1f} | {p / 2**20:.1f} | "
                     f"{r.median_step_s:.3f} | {r.peak_bytes / qlora.peak_bytes:.3f} | "
                     f"{r.peak_bytes / lora.peak_bytes:.3f} |")
    lines.append("")
    for label, (value, target) in ratios.items():
        lines.append(f"- {'met' if value <= target else 'missed'}: {label} = {value:.3f} (target ≤ {target})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--double-quant", action="store_true",
                    help="quantize the nf4 bases' absmax statistics too (QLoRA's double quantization)")
    ap.add_argument("--name", default=None, help="results file name (default: quantized, or quantized-cuda)")
    args = ap.parse_args(argv)
    args.name = args.name or ("quantized" + ("-dq" if args.double_quant else "")
                              + ("" if args.device == "cpu" else f"-{args.device.split(':')[0]}"))

    import rowsft
    from rowsft.data.batching import to_device
    from rowsft.io_utils import atomic_write_text

    _, tokenizer = rowsft.load_model(args.model)
    batch = to_device(harness.real_batch(tokenizer, args.batch, args.seq), args.device)
    builders, specs, trainable = build_methods(args.model, batch, args.rank, args.device, args.double_quant)
    predicted: list[int] = []
    results = harness.measure_methods(with_predictions(builders, specs, batch, predicted), batch, args.steps)
    rows_nf4, qlora, _, lora = results
    ratios = {"rows nf4 / QLoRA": (rows_nf4.peak_bytes / qlora.peak_bytes, TARGETS["rows nf4 / QLoRA"]),
              "rows nf4 / LoRA float32": (rows_nf4.peak_bytes / lora.peak_bytes, TARGETS["rows nf4 / LoRA float32"])}

    print(f"\n{args.model}: batch {args.batch} × {args.seq} tokens, LoRA-rank-{args.rank} parity "
          f"({trainable:,} row parameters), device {args.device}")
    print(harness.table(results, reference=qlora.method))
    print(f"\n{'method':<40}{'predicted MiB':>15}{'measured MiB':>14}{'predicted/measured':>20}")
    for r, p in zip(results, predicted):
        print(f"{r.method:<40}{p / 2**20:>15.1f}{r.peak_bytes / 2**20:>14.1f}{p / r.peak_bytes:>20.3f}")
    print()
    for label, (value, target) in ratios.items():
        print(f"{'PASS' if value <= target else 'MISS'}  {label}: {value:.3f} (target ≤ {target})")

    for r, p in zip(results, predicted):
        r.extra["predicted_bytes"] = p
    path = harness.write_results(args.name, {"args": vars(args), "row_trainable_parameters": trainable,
                                             "results": results,
                                             "checks": {k: {"value": v, "target": t} for k, (v, t) in ratios.items()}})
    atomic_write_text(path.with_suffix(".md"), markdown(results, predicted, ratios, args))
    print(f"\nwritten {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
