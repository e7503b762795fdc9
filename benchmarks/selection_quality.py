"""Selection quality (issue 4): rows chosen by Taylor importance vs random rows, fine-tuned on BoolQ.

Both variants train whole rows (output neurons) of every linear layer of SmolLM2-135M at the same
budget (parity with LoRA rank 8: ``rowsft.selection.lora_parity(8)``, i.e. ``round(8 (d_in + d_out)
/ d_in)`` rows per layer) for the same number of steps with the same data order per seed; only
*which* rows differs:

- ``taylor``: first-order Taylor importance ``Σ_j |W_ij G_ij|`` on the calibration batches;
- ``random``: seeded random rows (a different choice per seed).

Several seeds; the table gives mean, standard deviation, min and max of BoolQ accuracy (choice
log-likelihood) and of the held-out choice loss, then each variant's seed-by-seed difference to the first. Results go to ``benchmarks/results/<name>.json`` via ``harness.write_results``
(rewritten after every run). Same machinery and limits as ``benchmarks/speft_accuracy.py``.

Cost of the defaults (3 seeds × 2 variants, 16 steps of 4 × 128 tokens, 100 validation examples),
measured on the shared 2-core machine under load: row step ≈ 5 s, scoring ≈ 10 s, evaluation ≈
0.33 s per example → ≈ 14 min; ``--max-minutes`` (default 20) guards the rest.

    .venv/bin/python benchmarks/selection_quality.py               # defaults: within 20 min on 2 CPU cores
    .venv/bin/python benchmarks/selection_quality.py --budget 1 --steps 40 --seeds 3 --calibration-batches 4 \
        --eval-examples 400 --max-minutes 70 --name selection_quality_1row   # the README's tight budget (19 min)
    .venv/bin/python benchmarks/selection_quality.py --steps 300 --seeds 5 --max-length 256 --batch-size 16 \\
        --eval-examples 1000 --calibration-batches 8 --device cuda --name selection_quality_full
    .venv/bin/python benchmarks/selection_quality.py --metrics taylor hessian magnitude random   # more rows
    .venv/bin/python benchmarks/selection_quality.py --model tiny-llama --steps 4 --seeds 2 \\
        --eval-examples 8 --max-length 64 --name smoke_selection      # end-to-end smoke test
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speft_accuracy import Variant, add_common_arguments, check_args, run_benchmark  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(ap, name="selection_quality", strategy="per-layer", steps=16)
    ap.add_argument("--unit", default="row", choices=("row", "column"), help="what is selected")
    ap.add_argument("--metrics", nargs="+", default=["taylor", "random"],
                    help="importance metrics compared (any rowsft.score metric for the unit)")
    args = ap.parse_args(argv)
    check_args(ap, args)
    from rowsft.scoring import ALIASES, allowed_metrics
    unknown = [m for m in args.metrics if ALIASES.get(m, (m,))[0] not in allowed_metrics(args.unit)]
    if unknown:
        ap.error(f"metrics {unknown} cannot score {args.unit}s; choose from {list(allowed_metrics(args.unit))}")
    variants = [Variant(metric, args.unit, metric) for metric in args.metrics]
    run_benchmark(args, variants)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
