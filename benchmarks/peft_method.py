"""rowsft through peft against rowsft.apply (issue 20): the same rows, the same peak memory and step time?

On the bundled SmolLM2-135M with one real BoolQ batch of 4 × 256 tokens, at LoRA-rank-8 parity, the same
row selection (drawn at random: memory and time do not depend on which rows) is put into a fresh model twice:
by ``rowsft.apply`` and by ``peft.get_peft_model(model, rowsft.RowSFTConfig.from_selection(selection))``.
Timed steps are interleaved round-robin and the peak of one more step of each is measured with
``rowsft.memory.measure_peak`` (CPU: the profiler's memory events; never RSS), through ``benchmarks/harness.py``.

Target: the peft path peaks within 0.5% of ``rowsft.apply``'s peak. Prints the table and writes
``benchmarks/results/peft_method.json`` and ``.md``.

    .venv/bin/python benchmarks/peft_method.py [--model smollm2-135m] [--batch 4] [--seq 256] [--rank 8] [--steps 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

TARGET = 0.005          # |peft peak / apply peak - 1|


def random_parity_selection(model, rank: int, seed: int = 0):
    """Rows at LoRA-rank parity in every linear layer, drawn at random (seeded)."""
    import torch

    from rowsft.selection.choice import LayerChoice, Selection
    from rowsft.targets import find_targets, linear_shape
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model).items():
        d_out, d_in = linear_shape(module)
        k = max(1, min(d_out, round(rank * (d_in + d_out) / d_in)))          # LoRA's r (d_in + d_out), in rows
        layers[name] = LayerChoice("row", torch.randperm(d_out, generator=gen)[:k].sort().values, (d_out, d_in))
    return Selection(layers, {"metric": "random", "budget": f"lora:{rank}"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--name", default="peft_method")
    args = parser.parse_args(argv)

    import rowsft
    from peft import get_peft_model

    template, tokenizer = rowsft.load_model(args.model)
    selection = random_parity_selection(template, args.rank)
    del template
    batch = harness.real_batch(tokenizer, args.batch, args.seq)

    def via_apply():
        model = rowsft.load_model(args.model)[0]
        rowsft.apply(model, selection)
        return model

    def via_peft():
        model = rowsft.load_model(args.model)[0]
        return get_peft_model(model, rowsft.RowSFTConfig.from_selection(selection))

    results = harness.measure_methods([("rowsft.apply", via_apply), ("peft RowSFTConfig", via_peft)], batch, args.steps)
    print(harness.table(results, reference="rowsft.apply"))
    apply_peak, peft_peak = (r.peak_bytes for r in results)
    ratio = peft_peak / apply_peak
    met = abs(ratio - 1) <= TARGET
    verdict = f"peft / apply peak = {ratio:.4f}: {'met' if met else 'missed'} (target within {100 * TARGET:.1f}%)"
    print(verdict)
    lines = ["# rowsft through peft against rowsft.apply", "",
             f"{args.model}, {args.batch} × {args.seq} tokens, rows at LoRA-{args.rank} parity (random, same for both), "
             f"{args.steps} timed steps each (interleaved), {harness.machine()['threads']} threads.", "",
             "| path | trainable | peak MiB | median step s |", "|---|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.trainable_parameters:,} | {r.peak_bytes / 2**20:.1f} | {r.median_step_s:.3f} |"
              for r in results]
    lines += ["", verdict, ""]
    path = harness.write_results(args.name, {"args": vars(args), "results": results, "peak_ratio": ratio,
                                             "target_met": met})
    path.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
