"""What an exploration shows, in numbers: per point accuracy with its interval, and paired comparisons.

The records of :func:`rowsft.explore.budgets.explore_budgets` are short fine-tunes evaluated on the
same held-out questions, so two of them can be compared question by question. This module turns
them into table rows (``point_rows``), compares two series budget by budget (``compare``: an
exact McNemar test per seed, and over seeds a t-interval and sign test of the accuracy
differences), and prints both as text (``summary_text``) for the command line and the dashboard.
"""
from __future__ import annotations

from rowsft.evaluation.stats import correctness, exact_mcnemar, paired_over_seeds, wilson_interval

MIB = 2 ** 20


def series(record: dict) -> str:
    """``row · taylor``, ``LoRA (peft)``, ``zero-shot``: the line a record belongs to."""
    if record["method"] in ("zero-shot", "lora"):
        return {"zero-shot": "zero-shot", "lora": "LoRA (peft)"}[record["method"]]
    return f"{record['method']} · {record['metric']}"


def accuracy_interval(record: dict) -> tuple[float, float, float]:
    """``(accuracy, low, high)`` of a record; the interval is Wilson's 95% on the evaluated questions."""
    result = record["evaluation"]
    n, accuracy = int(result["n"]), float(result["accuracy"])
    low, high = result.get("interval") or wilson_interval(round(accuracy * n), n)
    return accuracy, float(low), float(high)


def point_rows(records: list[dict]) -> list[dict]:
    """One row per record: ``series, budget, seed, trainable, peak_mib, accuracy, low, high, majority``."""
    rows = []
    for r in records:
        result = r["evaluation"]
        _, low, high = accuracy_interval(r)
        peak = r.get("predicted_peak_bytes")
        rows.append({"series": series(r), "budget": r.get("budget") or "–", "seed": r["seed"],
                     "trainable": r["trainable_parameters"], "peak_mib": None if peak is None else peak / MIB,
                     "accuracy": result["accuracy"], "low": low, "high": high,
                     "majority": (result.get("majority") or {}).get("accuracy")})
    return rows


def compare(records: list[dict], baseline: str = "row · random", candidate: str = "row · taylor") -> list[dict]:
    """Per budget both series have: ``candidate`` minus ``baseline`` accuracy on the same questions.

    Each row: ``budget``, ``seeds``, ``difference`` (mean over seeds), ``mcnemar_p`` (one exact
    McNemar p-value per seed, pairing the two runs of that seed), and with two or more seeds
    ``over_seeds`` (:func:`rowsft.evaluation.stats.paired_over_seeds` of the per-seed differences).
    A zero-shot ``baseline`` pairs every candidate run with the one zero-shot evaluation.
    """
    def runs(name):
        out: dict = {}
        for r in records:
            if series(r) == name:
                out.setdefault(r.get("budget"), {})[r["seed"]] = r
        return out

    first, second = runs(baseline), runs(candidate)
    if baseline == "zero-shot":
        base = next(iter(next(iter(first.values())).values()), None) if first else None
        first = {budget: {seed: base for seed in seeds} for budget, seeds in second.items()} if base else {}
    rows = []
    for budget, by_seed in second.items():
        seeds = sorted(set(by_seed) & set(first.get(budget, {})))
        if not seeds:
            continue
        pairs = [(first[budget][s]["evaluation"], by_seed[s]["evaluation"]) for s in seeds]
        differences = [float(correctness(b).mean() - correctness(a).mean()) for a, b in pairs]
        row = {"budget": budget, "seeds": seeds, "difference": sum(differences) / len(differences),
               "mcnemar_p": [exact_mcnemar(a, b)["p_value"] for a, b in pairs], "over_seeds": None}
        if len(seeds) >= 2:
            row["over_seeds"] = paired_over_seeds(differences)
        rows.append(row)
    return rows


def verdict(row: dict) -> str:
    """Plain words for one comparison row: shown better, shown worse, or not shown."""
    over = row["over_seeds"]
    if over is not None:
        shown = over["low"] > 0 or over["high"] < 0
        p_text = f"t-test over {over['n']} seeds p = {over['t_p_value']:.2g}"
    else:
        shown = row["mcnemar_p"][0] < 0.05
        p_text = f"McNemar p = {row['mcnemar_p'][0]:.2g} (one seed)"
    if not shown:
        return f"not shown ({p_text})"
    return f"{'better' if row['difference'] > 0 else 'worse'}, {p_text}"


def summary_text(records: list[dict], comparisons=(("row · random", "row · taylor"), ("zero-shot", "row · taylor"))) -> str:
    """The exploration as a text table, then each comparison budget by budget."""
    rows = point_rows(records)
    lines = [f"{'series':<16} {'budget':<9} {'seed':>4} {'trainable':>11} {'peak MiB':>9}  accuracy (95% CI)"]
    for row in rows:
        peak = "–" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        lines.append(f"{row['series']:<16} {str(row['budget']):<9} {row['seed']:>4} {row['trainable']:>11,} {peak:>9}  "
                     f"{row['accuracy']:.3f} ({row['low']:.3f}–{row['high']:.3f})")
    majority = next((row["majority"] for row in rows if row["majority"] is not None), None)
    if majority is not None:
        lines.append(f"majority class: {majority:.3f}")
    for baseline, candidate in comparisons:
        found = compare(records, baseline, candidate)
        if found:
            lines.append(f"\n{candidate} minus {baseline}, same questions:")
            lines += [f"  {str(row['budget']):<9} {100 * row['difference']:+.1f} points  {verdict(row)}" for row in found]
    return "\n".join(lines)
