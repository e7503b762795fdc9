"""The Dashboard composed end to end: score → heatmap → picker/budget → Launch, headless.

First with the fakes of ``test_notebook_fakes`` (the real tuner applies the selections), then with
rowsft's real verbs when scoring, selection, memory and training exist.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from test_notebook_fakes import (
    fake_lora_parity,
    fake_predict,
    fake_score,
    fake_select,
    fake_train,
    random_batches,
    tiny_llama,
)

from rowsft import notebook as nb
from rowsft.explore.budgets import budget_label
from rowsft.layers import tuner


def fake_dashboard(model, **kwargs):
    cfg = nb.settings(fast=True, rows=4, steps=3, calibration_batches=2, lr=1e-2)
    return nb.Dashboard(model, random_batches(4), settings=cfg, score_fn=fake_score, select_fn=fake_select,
                        predict_fn=fake_predict, lora_parity_fn=fake_lora_parity, train_fn=fake_train, **kwargs)


def marks(dash, panel):
    t = [t for t in dash.heatmap.data if t.name == f"selected:{panel}"]
    return sorted(zip(t[0].x, t[0].y)) if t else None


def heat(dash, panel):
    return np.asarray([t for t in dash.heatmap.data if t.name == f"scores:{panel}"][0].z, dtype=float)


def test_dashboard_scores_selects_marks_and_trains_in_place():
    model = tiny_llama()
    dash = fake_dashboard(model, eval_fn=lambda m: 0.5)
    assert dash.scores is not None and dash.scores.metric == "magnitude"
    q0 = "model.layers.0.self_attn.q_proj"
    top4 = sorted(torch.topk(dash.scores[q0], 4).indices.tolist())
    assert dash.selection[q0].tolist() == top4
    assert [(x, y) for x, y in marks(dash, "q_proj") if y == 0] == [(i, 0) for i in top4]

    dash.budget.rows.value = 6                              # budget → selection → marks
    assert all(v.numel() == 6 for v in dash.selection.values())
    assert len(marks(dash, "up_proj")) == 2 * 6

    before = heat(dash, "up_proj")
    dash.chooser.metric.value = "random"
    dash.chooser.button.click()                             # re-score → new heatmap, same marks count
    assert dash.scores.metric == "random" and not np.allclose(heat(dash, "up_proj"), before)
    up0 = "model.layers.0.mlp.up_proj"
    assert dash.selection[up0].tolist() == sorted(torch.topk(dash.scores[up0], 6).indices.tolist())

    dash.launcher.launch_button.click()                     # Launch applies the selection, trains
    history = dash.wait(60)
    assert dash.launcher.error is None, dash.launcher.status.message
    assert len(history.steps) == 3
    on_model = tuner.current_selection(model)
    assert set(on_model) == set(dash.selection) and all(on_model[n].equal(dash.selection[n]) for n in on_model)
    assert dash.curves.points("row-sparse", "loss")[0] == [1, 2, 3]

    dash.launcher.launch()                                  # same selection: continue training
    dash.wait(60)
    assert "continuing" in dash.launcher.status.message or dash.launcher.status.kind == "success"
    trained = {n: layer.delta.detach().clone() for n, layer in tuner.sparse_layers(model).items()}
    assert any(bool(d.abs().sum() > 0) for d in trained.values())

    dash.budget.rows.value = 2                              # another selection: merge, then apply anew
    weight_before = model.get_submodule(up0).base_layer.weight.detach().clone()
    expected_merge = weight_before.clone()
    expected_merge[tuner.sparse_layers(model)[up0].indices] += trained[up0]
    dash.launcher.launch()
    dash.wait(60)
    assert all(v.numel() == 2 for v in tuner.current_selection(model).values())
    # the first run's learning was kept: the new base weight is the old one plus the merged update
    assert torch.allclose(model.get_submodule(up0).base_layer.weight, expected_merge, atol=1e-6)


def test_widgets_outside_a_live_kernel_show_a_one_line_note():
    """nbconvert's HTML, GitHub and nbviewer show a widget's text/plain: a note, not the widget tree."""
    dash = fake_dashboard(tiny_llama(), eval_fn=lambda m: 0.5)
    for shown in (dash, dash.budget, dash.launcher):
        bundle = shown._repr_mimebundle_()
        data = bundle[0] if isinstance(bundle, tuple) else bundle
        assert "application/vnd.jupyter.widget-view+json" in data          # JupyterLab still draws the widget
        note = data["text/plain"]
        assert "\n" not in note and "Jupyter kernel runs" in note and type(shown).__name__ in note
        assert "children=" not in note


def test_dashboard_error_cases_show_messages_and_stay_usable():
    model = tiny_llama()
    dash = fake_dashboard(model)
    dash.budget.picker.none_button.click()
    assert dash.selection is None and dash.budget.status.kind == "error"
    dash.launcher.launch_button.click()
    assert dash.launcher.status.kind == "error" and "no layer picked" in dash.launcher.status.message
    assert not tuner.sparse_layers(model)
    dash.budget.picker.all_mlp.click()
    dash.budget.rows.value = 1000                           # over every layer's size
    assert dash.budget.status.kind == "error" and "more than" in dash.budget.status.message
    dash.budget.rows.value = 3
    assert dash.selection is not None and dash.budget.status.kind is None
    dash.chooser.metric.value, dash.chooser.unit.value = "activation", "element"
    dash.chooser.button.click()                             # unavailable metric for the unit
    assert dash.chooser.status.kind == "error" and dash.scores.metric == "magnitude"
    dash.heatmap_type.value = "down_proj"               # one panel only, marks kept
    assert [t.name for t in dash.heatmap.data] == ["scores:down_proj", "selected:down_proj"]
    assert len(marks(dash, "down_proj")) == 2 * 3
    dash.heatmap_order.value = "sorted"
    assert np.all(np.diff(heat(dash, "down_proj"), axis=1) <= 1e-6)
    with pytest.raises(ValueError, match="tokenizer"):
        nb.as_batches([{"text": "hello", "label": 1}], None, 2, 16)


REAL = all(importlib.util.find_spec(f"rowsft.{m}") for m in ("scoring", "selection", "memory", "training"))


@pytest.mark.skipif(not REAL, reason="rowsft.scoring / selection / memory / training not written yet")
def test_dashboard_with_the_real_verbs_on_tiny_llama():
    model = tiny_llama()
    cfg = nb.settings(fast=True, rows=4, steps=3, calibration_batches=2, lr=1e-2, lora_rank=2)
    dash = nb.Dashboard(model, random_batches(4), settings=cfg, metric="taylor")
    assert dash.chooser.status.kind == "success", dash.chooser.status.message
    assert dash.budget.status.kind is None, dash.budget.status.message
    assert dash.selection is not None and all(v.numel() == 4 for v in dash.selection.values())
    assert set(dash.budget.memory) == {"row-sparse", "LoRA r=2", "full"}
    assert dash.budget.memory["row-sparse"].total < dash.budget.memory["full"].total
    dash.budget.mode.value = "lora"
    assert dash.budget.status.kind is None, dash.budget.status.message
    dash.chooser.unit.value = "element"
    dash.chooser.metric.value = "activation"              # rowsft.scoring refuses this pair
    assert dash.chooser.status.kind == "error" and "not available per element" in dash.chooser.status.message
    dash.chooser.button.click()
    assert dash.scores.metric == "taylor" and dash.scores.unit == "row"
    dash.chooser.unit.value, dash.chooser.metric.value = "group", "magnitude"
    dash.chooser.button.click()                            # coupled neurons: heads and MLP neurons
    assert dash.scores.unit == "group", dash.chooser.status.message
    dash.budget.picker.all_mlp.click()
    dash.budget.mode.value = "rows"
    dash.budget.rows.value = 5
    assert dash.budget.status.kind is None, dash.budget.status.message
    mlp = [t for t in dash.heatmap.data if t.name == "selected:mlp"][0]
    assert len(mlp.x) == 2 * 5                             # 5 neurons marked in each block's MLP
    assert {"gate_proj", "up_proj", "down_proj"} == {n.split(".")[-1] for n in dash.selection}
    dash.budget.picker.all_attention.click()               # group kinds: "attention" = whole heads
    dash.budget.rows.value = 1
    assert dash.budget.status.kind is None, dash.budget.status.message
    assert {n.split(".")[-1] for n in dash.selection} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    dash.budget.picker.all_button.click()
    dash.budget.rows.value = 3                             # attention groups have only 2 key/value heads
    assert dash.budget.status.kind == "error" and "(2)" in dash.budget.status.message
    dash.budget.mode.value = "lora"
    dash.launcher.launch()
    history = dash.wait(120)
    assert dash.launcher.error is None, dash.launcher.status.message
    assert len(history.steps) == 3 and dash.curves.points("row-sparse", "loss")[0] == [1, 2, 3]
    assert set(tuner.current_selection(model)) == set(dash.selection)


@pytest.mark.assets
@pytest.mark.skipif(not REAL, reason="rowsft.scoring / selection / memory / training not written yet")
def test_dashboard_from_raw_data_and_tokenizer_reports_accuracy():
    import rowsft
    from rowsft.data.assets import MissingAssetError
    try:
        model, tokenizer = rowsft.load_model("tiny-llama")
        data = rowsft.load_dataset("boolq", max_train=16, max_validation=8)
    except MissingAssetError as e:
        pytest.skip(str(e))
    cfg = nb.settings(fast=True, rows=2, steps=2, batch_size=2, max_length=48, calibration_batches=1, eval_examples=8)
    dash = nb.Dashboard(model, data, tokenizer, settings=cfg)
    assert dash.seq_len <= 48 and dash.selection is not None, dash.budget.status.message
    dash.launcher.launch()
    dash.wait(120)
    summary = dash.launcher.summary
    assert dash.launcher.error is None, dash.launcher.status.message
    assert summary.steps == 2 and 0.0 <= summary.accuracy_before <= 1.0 and 0.0 <= summary.accuracy_after <= 1.0
    assert "→" in dash.launcher.summary_html.value


def _explorer_record(method, metric, budget, seed, answers):
    questions = [{"index": i, "label": 0, "predicted": 0 if ok else 1, "correct": bool(ok), "scores": [0.0, 0.0]}
                 for i, ok in enumerate(answers)]
    return {"method": method, "metric": metric, "budget": budget, "seed": seed, "trainable_parameters": 100,
            "task": "rotten_tomatoes", "steps": 3,
            "predicted_peak_bytes": 2 ** 20, "final_loss": 0.5,
            "evaluation": {"accuracy": sum(answers) / len(answers), "n": len(answers), "per_question": questions,
                           "majority": {"accuracy": 0.5}}}


def fake_explore(calls):
    """An explore_budgets stand-in: one zero-shot point, then taylor and random per budget and seed."""
    def explore(cfg, progress, stop):
        calls.append(cfg)
        points = [_explorer_record("zero-shot", None, None, 0, [1, 0] * 5)]
        for budget in cfg.budgets:
            for seed in cfg.seeds:
                points += [_explorer_record("row", "taylor", budget_label(budget), seed, [1] * 8 + [0] * 2),
                           _explorer_record("row", "random", budget_label(budget), seed, [1] * 6 + [0] * 4)]
        for done, record in enumerate(points, 1):
            if stop():
                break
            progress(done, len(points), record)
        return points
    return explore


def test_dashboard_explorer_panel_plots_points_with_intervals_and_paired_tests():
    calls = []
    dash = fake_dashboard(tiny_llama(), background=False, explore_fn=fake_explore(calls))
    panel = dash.explorer
    assert panel.config.model == "tiny-llama" and panel.budgets.value.startswith("1, 2, 4, lora:")
    panel.budgets.value, panel.seeds.value = "1, 4", 2
    assert panel.explore()
    (cfg,) = calls
    assert [budget_label(b) for b in cfg.budgets] == ["1", "4"] and cfg.seeds == [0, 1]
    assert panel.progress.value == panel.progress.max == 1 + 2 * 2 * 2, panel.status.message
    names = {t.name for t in panel.figure.data}
    assert {"row · taylor", "row · random"} <= names
    assert any(t.error_y is not None and t.error_y.array is not None for t in panel.figure.data)
    assert "row · taylor minus row · random" in panel.summary.value and "majority class" in panel.summary.value
    assert panel.status.kind == "success"


def test_explorer_refuses_bad_budgets_and_waits_for_training():
    calls = []
    dash = fake_dashboard(tiny_llama(), background=False, explore_fn=fake_explore(calls))
    dash.explorer.budgets.value = "1, lots"
    assert not dash.explorer.explore() and dash.explorer.status.kind == "error"
    assert "not understood" in dash.explorer.status.message or "lots" in dash.explorer.status.message
    dash.explorer.budgets.value = "  "
    assert not dash.explorer.explore() and "at least one budget" in dash.explorer.status.message
    dash.explorer.budgets.value = "2"
    dash.explorer.busy_fn = lambda: "a run is training this model"
    assert not dash.explorer.explore() and "training" in dash.explorer.status.message
    assert calls == []


def test_launch_is_refused_while_the_explorer_runs():
    import threading
    release, started = threading.Event(), threading.Event()

    def slow_explore(cfg, progress, stop):
        started.set()
        release.wait(10)
        return []

    dash = fake_dashboard(tiny_llama(), explore_fn=slow_explore)
    assert dash.explorer.explore() and started.wait(5)
    assert not dash.launcher.launch()
    assert "budget explorer is running" in dash.launcher.status.message
    release.set()
    dash.explorer.wait(5)
    assert not dash.explorer.running
