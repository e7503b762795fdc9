"""Default learning rates per method, and where each comes from.

Sparse rows, columns and single weights update few parameters each by a lot, LoRA updates a
low-rank product whose scale depends on its rank and alpha, and full fine-tuning moves every
weight: one rate does not fit all. The rates below were chosen from the measured sweep in
``benchmarks/lr_sweep.py`` (results: ``benchmarks/results/lr_sweep.md``) on the bundled
SmolLM2-135M-Instruct and Rotten Tomatoes as an LM task, 80 AdamW steps of 8 reviews, three rates a
factor of about 3 apart per method, one seed, 400 held-out reviews; the best of the three is taken.
Where the best is the lowest rate tried (columns, elements, LoRA) a lower one might be better still;
neighbouring rates are within each other's intervals. Other models, tasks or run
lengths may want other rates: :func:`rowsft.lr_range_test` (or a short sweep) finds one.
Full fine-tuning was not swept; its rate is the usual order for a model of this size.
"""
from __future__ import annotations

# method (as rowsft.cli.job.JobConfig names it) -> peak learning rate
DEFAULT_LEARNING_RATES = {
    "rowsft": 1e-3,     # best of 3e-4 / 1e-3 / 3e-3 at 2 rows per layer (0.830 / 0.875 / 0.855) and at LoRA-8 parity
    "column": 3e-4,     # 0.840 / 0.835 / 0.580 at 3e-4 / 1e-3 / 3e-3 (3e-3 collapsed to the majority class); 1e-4,
                        # run later, scored 0.873 on the same seed, within the intervals: kept at 3e-4, the rate of
                        # the study, until a sweep over seeds settles it
    "element": 3e-4,    # SPEFT static gradient mask: 0.855 / 0.853 / 0.580; 1e-4, run later, 0.875 (within the
                        # intervals): kept at 3e-4, the study's rate, as for columns
    "lora": 3e-4,       # peft LoRA r=8: 0.875 / 0.865 / 0.855; 1e-4 scored 0.845, so 3e-4 is bracketed
    "dora": 3e-4,       # DoRA was not swept: LoRA's rate
    "full": 2e-5,       # not swept: the usual order for a model of this size
}
UNIT_METHODS = {"row": "rowsft", "column": "column", "element": "element", "group": "rowsft"}


def default_learning_rate(method: str) -> float:
    """The tuned default rate of ``method`` (``rowsft``, ``column``, ``element``, ``lora``, ``dora``,
    ``full``; the units ``row``/``group`` read as ``rowsft``)."""
    key = UNIT_METHODS.get(method, method)
    if key not in DEFAULT_LEARNING_RATES:
        raise ValueError(f"no default learning rate for method {method!r}; choose one of "
                         f"{sorted(DEFAULT_LEARNING_RATES)} or give lr explicitly")
    return DEFAULT_LEARNING_RATES[key]
