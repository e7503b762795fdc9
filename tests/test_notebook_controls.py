"""Layer picker, budget control, metric chooser, status area and FAST settings, driven headless.

Controls get the fakes of ``test_notebook_fakes`` as their verbs, so the expected selection,
marks and memory are computed here from the fakes' simple rules (top-k rows, 4-byte parameters).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_notebook_fakes import (
    fake_lora_parity,
    fake_predict,
    fake_score,
    fake_select,
    parity_rows,
    random_batches,
    tiny_llama,
)

import rowsft
import rowsft.viz.style
from rowsft import notebook as nb
from rowsft import viz

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def scores(model):
    return fake_score(model, random_batches(2), num_batches=2)


def budget_control(model, scores, **kwargs):
    heatmap = viz.as_widget(viz.importance_heatmap(scores))
    control = nb.BudgetControl(model, scores, heatmap=heatmap, select_fn=fake_select, predict_fn=fake_predict,
                               lora_parity_fn=fake_lora_parity, **kwargs)
    return control, heatmap


def marks(heatmap, panel):
    t = [t for t in heatmap.data if t.name == f"selected:{panel}"][0]
    return sorted(zip(t.x, t.y))


def top_rows(scores, name, k):
    return sorted(torch.topk(scores[name], k).indices.tolist())


# ------------------------------------------------------------------ layer picker
def test_layer_picker_shortcuts_and_product(model):
    picker = nb.LayerPicker.from_model(model)
    assert picker.module_types == ATTENTION + MLP and picker.layers == [0, 1]
    assert picker.select_kwargs() == {"module_types": None, "layers": None}
    seen = []
    picker.observe(lambda p: seen.append(list(p.module_types)))
    picker.all_mlp.click()
    assert picker.module_types == MLP and seen[-1] == MLP
    picker.block_buttons[0].value = False
    assert picker.names == [f"model.layers.1.mlp.{t}" for t in MLP]
    assert picker.select_kwargs() == {"module_types": MLP, "layers": [1]}
    picker.none_button.click()
    assert picker.names == [] and picker.status.kind == "error" and "no layer picked" in picker.status.message
    picker.all_attention.click()                         # nothing was picked: all blocks come back
    assert picker.module_types == ATTENTION and picker.layers == [0, 1]
    picker.pick(types=["bogus"])
    assert picker.status.kind == "error" and "bogus" in picker.status.message
    assert picker.module_types == ATTENTION               # unchanged, still usable
    with pytest.raises(ValueError, match="at least one"):
        nb.LayerPicker([])


def test_layer_picker_families_from_names_alone():
    gpt2 = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    picker = nb.LayerPicker(gpt2)
    picker.all_attention.click()
    assert picker.module_types == ["c_attn", "attn.c_proj"]   # GPT-2's two c_proj layers stay apart
    picker.all_mlp.click()
    assert picker.module_types == ["c_fc", "mlp.c_proj"]


# ------------------------------------------------------------------ budget control
def test_budget_rows_change_selection_marks_and_memory(model, scores):
    control, heatmap = budget_control(model, scores, rows=4, rank=2)
    q0, up1 = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"
    assert control.status.kind is None
    assert control.selection[q0].tolist() == top_rows(scores, q0, 4)
    assert marks(heatmap, "q_proj") == sorted(
        [(i, 0) for i in top_rows(scores, q0, 4)] + [(i, 1) for i in top_rows(scores, "model.layers.1.self_attn.q_proj", 4)])
    control.rows.value = 9
    assert control.selection[up1].tolist() == top_rows(scores, up1, 9)
    assert len(marks(heatmap, "up_proj")) == 2 * 9
    # predicted memory: 4 bytes per trainable parameter, ×2 gradients+weights... (fake_predict's rule)
    d_in = {n: scores.shapes[n][1] for n in scores}
    trainable = sum(9 * d_in[n] for n in scores)
    assert control.selection.trainable_parameters == trainable
    row = control.memory["row-sparse"]
    assert (row.trainable, row.gradients, row.optimizer) == (4 * trainable, 4 * trainable, 8 * trainable)
    assert set(control.memory) == {"row-sparse", "LoRA r=2", "full"}
    assert f"{trainable:,}" in control.figures.value
    bars = {t.name: list(t.y) for t in control.memory_figure.data if t.type == "bar"}
    assert bars["trainable"] == [4 * trainable, control.memory["LoRA r=2"].trainable, control.memory["full"].trainable]
    lora = 2 * sum(sum(scores.shapes[n]) for n in scores)            # rank * (d_out + d_in) per layer, by hand
    labels = control.memory_figure.layout.xaxis.ticktext              # the budgets differ: each bar names its own
    assert [label.split("<br>")[1] for label in labels] == [
        f"{rowsft.viz.style.compact_count(c)} trainable" for c in (trainable, lora, control.total_parameters)]


def test_budget_ratio_and_lora_parity_modes(model, scores):
    control, _ = budget_control(model, scores, rows=4, rank=2)
    down = "model.layers.0.mlp.down_proj"
    control.mode.value = "ratio"
    control.ratio.value = 0.25
    assert control.selection[down].numel() == round(0.25 * scores[down].numel())
    control.mode.value = "lora"
    control.rank.value = 4
    for name in scores:
        assert control.selection[name].numel() == parity_rows(4, scores.shapes[name])
    assert "LoRA r=4" in control.memory


def test_budget_follows_the_layer_picker(model, scores):
    control, heatmap = budget_control(model, scores, rows=4)
    control.picker.all_attention.click()
    assert sorted({n.split(".")[-1] for n in control.selection}) == sorted(ATTENTION)
    assert marks(heatmap, "up_proj") == []            # marks left MLP panels
    control.picker.block_buttons[1].value = False
    assert all(".layers.0." in n for n in control.selection)


def test_budget_errors_show_a_message_and_keep_the_control_usable(model, scores):
    control, heatmap = budget_control(model, scores, rows=4)
    control.rows.value = 100                               # q_proj has 64 rows, up_proj 128
    assert control.status.kind == "error"
    assert "100 rows per layer is more than" in control.status.message and "(64)" in control.status.message
    assert control.selection is None
    control.picker.pick(types=["gate_proj", "up_proj"])    # these have 128 rows: now fine
    assert control.status.kind is None and control.selection is not None
    control.picker.none_button.click()
    assert control.status.kind == "error" and "no layer picked" in control.status.message
    assert control.selection is None
    control.picker.all_button.click()
    control.rows.value = 3
    assert control.status.kind is None and control.selection[next(iter(scores))].numel() == 3

    def broken_predict(model, what, *args, **kwargs):
        if what == "lora":
            raise RuntimeError("LoRA estimate needs peft")
        return fake_predict(model, what, *args, **kwargs)
    control.predict_fn = broken_predict
    control.rows.value = 2
    assert control.status.kind == "error" and "LoRA estimate needs peft" in control.status.message
    assert control.selection is not None and "full" in control.memory


# ------------------------------------------------------------------ metric chooser
def test_metric_chooser_scores_on_click_with_progress(model):
    drawn = []
    batches = random_batches(6)

    def counting_score(model, batches, **kwargs):
        result = fake_score(model, batches, **kwargs)
        drawn.append(kwargs)
        return result
    chooser = nb.MetricChooser(model, batches, metric="magnitude", num_batches=3, score_fn=counting_score,
                               metrics=["magnitude", "random", "activation"], units=["row", "column", "element"])
    got = []
    chooser.observe(got.append)
    chooser.metric.value = "random"                        # no scoring on a change...
    chooser.unit.value = "column"
    assert drawn == [] and chooser.scores is None
    chooser.button.click()                                 # ...only on the button
    assert drawn == [{"metric": "random", "unit": "column", "targets": "all-linear", "num_batches": 3}]
    assert chooser.scores is got[0] and chooser.scores.unit == "column"
    assert chooser.progress.value == chooser.progress.max == 3
    assert chooser.status.kind == "success"
    previous = chooser.scores
    chooser.metric.value, chooser.unit.value = "activation", "element"
    chooser.button.click()
    assert chooser.status.kind == "error" and "not single weights" in chooser.status.message
    assert chooser.scores is previous and chooser.button.disabled is False


def test_metric_chooser_flags_an_impossible_pair_before_scoring(model):
    calls = []
    chooser = nb.MetricChooser(model, random_batches(2), score_fn=lambda *a, **k: calls.append(k),
                               allowed_fn=lambda unit: ["magnitude"] if unit == "element" else ["magnitude", "activation"],
                               metrics=["magnitude", "activation"], units=["row", "element"])
    chooser.metric.value = "activation"
    assert chooser.status.kind is None
    chooser.unit.value = "element"                        # reported at once, before any click
    assert chooser.status.kind == "error" and "activation is not available per element" in chooser.status.message
    chooser.button.click()
    assert calls == [] and chooser.scores is None
    chooser.metric.value = "magnitude"
    assert chooser.status.kind is None


def test_counting_batches_counts_what_is_drawn():
    counts = []
    wrapped = nb.CountingBatches([1, 2, 3], counts.append)
    assert list(wrapped) == [1, 2, 3] and counts == [1, 2, 3] and len(wrapped) == 3


# ------------------------------------------------------------------ status area, settings
def test_status_guard_turns_exceptions_into_one_red_line():
    status = nb.StatusArea()

    @status.guard("Could not do it")
    def fails():
        raise KeyError("no layer 'x'")
    assert fails() is None
    assert status.kind == "error" and status.message == "Could not do it: no layer 'x'"
    assert "fdecea" in status.value and "Traceback" not in status.value
    status.success("ok <b>")
    assert "&lt;b&gt;" in status.value


def test_fast_mode_and_settings(monkeypatch):
    monkeypatch.setenv("ROWSFT_FAST", "true")
    assert nb.fast_mode() and nb.settings().model == "tiny-llama" and nb.settings().fast
    monkeypatch.setenv("ROWSFT_FAST", "1")
    assert nb.settings(steps=3).steps == 3
    monkeypatch.setenv("ROWSFT_FAST", "0")
    assert not nb.fast_mode() and nb.settings().model == "smollm2-135m"
    monkeypatch.delenv("ROWSFT_FAST")
    assert not nb.fast_mode()
    assert nb.settings(fast=True).steps < nb.settings().steps
    with pytest.raises(TypeError, match="unknown setting"):
        nb.settings(step=3)
    np.testing.assert_equal(nb.FAST_SETTINGS.rows <= nb.FULL_SETTINGS.rows, True)
