"""rowsft.viz: every builder returns the traces and numbers its input implies.

Expected values are computed here independently (plain loops over the input), never read back
from the code under test.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from rowsft import viz
from rowsft.scoring.scores import Scores
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import GroupMember, NeuronGroup
from rowsft.training.history import History

LAYERS = 3
WIDE, NARROW = 600, 64          # 600 neurons > 256 columns: bins of ceil(600/256) = 3


def make_scores(seed: int = 0) -> Scores:
    g = torch.Generator().manual_seed(seed)
    values, shapes = {}, {}
    for layer in range(LAYERS):
        up, q = f"model.layers.{layer}.mlp.up_proj", f"model.layers.{layer}.self_attn.q_proj"
        values[up], shapes[up] = torch.rand(WIDE, generator=g), (WIDE, 32)
        values[q], shapes[q] = torch.rand(NARROW, generator=g), (NARROW, 32)
    return Scores(values, "magnitude", "row", "none", shapes)


def expected_bins(v: np.ndarray, size: int, how: str) -> list[float]:
    out = []
    for start in range(0, len(v), size):
        chunk = [float(x) for x in v[start:start + size]]
        out.append(max(chunk) if how == "max" else sum(chunk) / len(chunk))
    return out


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


# ------------------------------------------------------------------ heatmap
@pytest.mark.parametrize("how", ["max", "mean"])
def test_heatmap_z_matches_independent_binning(how):
    scores = make_scores()
    fig = viz.importance_heatmap(scores, reduce=how)
    assert isinstance(fig, go.Figure)
    assert [t.name for t in fig.data] == ["scores:up_proj", "selected:up_proj",
                                          "scores:q_proj", "selected:q_proj"]
    heat = trace(fig, "scores:up_proj")
    z = np.asarray(heat.z, dtype=np.float64)
    assert z.shape == (LAYERS, math.ceil(WIDE / 3)) and z.shape[1] <= 256
    for layer in range(LAYERS):
        v = scores[f"model.layers.{layer}.mlp.up_proj"].numpy()
        np.testing.assert_allclose(z[layer], expected_bins(v, 3, how), rtol=1e-3)
    assert list(heat.x) == list(range(0, WIDE, 3))        # x = first neuron of each bin
    assert list(heat.y) == list(range(LAYERS))
    narrow = np.asarray(trace(fig, "scores:q_proj").z, dtype=np.float64)
    assert narrow.shape == (LAYERS, NARROW)                # narrow enough: not binned
    np.testing.assert_allclose(narrow[1], scores["model.layers.1.self_attn.q_proj"].numpy(), rtol=1e-3)


def test_bin_neurons_keeps_a_partial_last_bin():
    m = np.arange(10, dtype=float).reshape(1, 10)
    binned, size = viz.bin_neurons(m, max_columns=4, reduce="mean")
    assert size == 3 and binned.tolist() == [[1.0, 4.0, 7.0, 9.0]]


def test_heatmap_sorted_order_and_module_type_filter():
    scores = make_scores()
    fig = viz.importance_heatmap(scores, module_type="q_proj", order="sorted")
    assert [t.name for t in fig.data] == ["scores:q_proj", "selected:q_proj"]
    z = np.asarray(fig.data[0].z, dtype=np.float64)
    for layer in range(LAYERS):
        v = scores[f"model.layers.{layer}.self_attn.q_proj"].tolist()
        np.testing.assert_allclose(z[layer], sorted(v, reverse=True), rtol=1e-3)
    with pytest.raises(ValueError, match="no scores of module type"):
        viz.importance_heatmap(scores, module_type="nope")
    with pytest.raises(ValueError, match="order"):
        viz.importance_heatmap(scores, order="random")


def test_heatmap_marks_selected_rows_in_binned_and_plain_panels():
    scores = make_scores()
    up0, q2 = "model.layers.0.mlp.up_proj", "model.layers.2.self_attn.q_proj"
    selection = Selection({up0: LayerChoice("row", torch.tensor([0, 1, 2, 7, 599]), (WIDE, 32)),
                           q2: LayerChoice("row", torch.tensor([5, 9]), (NARROW, 32))})
    fig = viz.importance_heatmap(scores, selection=selection)
    marks = trace(fig, "selected:up_proj")
    # neurons 0,1,2 share bin 0; 7 is in bin 2 (starts at 6); 599 in the last bin (starts at 597)
    assert sorted(zip(marks.x, marks.y)) == [(0, 0), (6, 0), (597, 0)]
    assert sorted(zip(marks.x, marks.customdata)) == [(0, 3), (6, 1), (597, 1)]     # chosen per bin
    q_marks = trace(fig, "selected:q_proj")
    assert sorted(zip(q_marks.x, q_marks.y)) == [(5, 2), (9, 2)]


def test_mark_selection_moves_marks_on_a_figure_widget():
    scores = make_scores()
    q0 = "model.layers.0.self_attn.q_proj"
    widget = viz.as_widget(viz.importance_heatmap(scores))
    assert isinstance(widget, go.FigureWidget)
    assert len(trace(widget, "selected:q_proj").x) == 0
    viz.mark_selection(widget, scores, {q0: torch.tensor([3, 4])})
    assert list(trace(widget, "selected:q_proj").x) == [3, 4]
    viz.mark_selection(widget, scores, None)
    assert len(trace(widget, "selected:q_proj").x) == 0
    with pytest.raises(ValueError, match="importance_heatmap"):
        viz.mark_selection(go.Figure(), scores, None)


def test_sorted_marks_follow_the_rank_of_the_chosen_neuron():
    v = torch.tensor([0.1, 0.9, 0.5, 0.3])
    scores = {"model.layers.0.mlp.up_proj": v}
    fig = viz.importance_heatmap(scores, order="sorted", selection={"model.layers.0.mlp.up_proj": torch.tensor([2])})
    marks = trace(fig, "selected:up_proj")
    assert list(marks.x) == [1] and list(marks.customdata) == [2]   # 0.5 is the second largest; neuron 2


def test_group_scores_are_marked_from_a_member_selection():
    group = NeuronGroup("model.layers.0.self_attn", "attention", 4, (
        GroupMember("model.layers.0.self_attn.q_proj", "row", 8), GroupMember("model.layers.0.self_attn.o_proj", "column", 8)))
    scores = Scores({group.name: torch.tensor([0.4, 0.3, 0.2, 0.1])}, "taylor", "group", "none",
                    {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.o_proj": (32, 32)},
                    groups={group.name: group})
    rows_of_heads_1_and_3 = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    selection = Selection({"model.layers.0.self_attn.q_proj": LayerChoice("row", rows_of_heads_1_and_3, (32, 32))})
    fig = viz.importance_heatmap(scores, selection=selection)
    assert list(trace(fig, "selected:self_attn").x) == [1, 3]


def test_tidy_frame_element_scores_and_plain_dicts_are_accepted():
    scores = make_scores()
    from_frame = viz.importance_heatmap(scores.tidy())
    from_scores = viz.importance_heatmap(scores)
    for a, b in zip(from_frame.data, from_scores.data):
        assert a.name == b.name
        if a.type == "heatmap":
            np.testing.assert_array_equal(np.asarray(a.z), np.asarray(b.z))
    element = {"model.layers.0.mlp.up_proj": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
    z = np.asarray(viz.importance_heatmap(element).data[0].z)
    np.testing.assert_allclose(z[0], [1.5, 5.5, 9.5])       # mean of each row's 4 weights
    with pytest.raises(ValueError, match="empty"):
        viz.importance_heatmap({})
    with pytest.raises(ValueError, match="columns"):
        viz.importance_heatmap(pd.DataFrame({"layer": ["a"]}))


def test_rounding_and_figure_size_stay_small_for_a_smollm2_sized_model():
    x = viz.round_significant([123456.0, 0.000123456, -2.5e-9, 0.0, float("nan")])
    assert x.dtype == np.float32
    np.testing.assert_allclose(x[:4], [123500.0, 0.0001235, -2.5e-9, 0.0], rtol=1e-6)
    assert np.isnan(x[4])
    g = torch.Generator().manual_seed(1)
    big = {f"model.layers.{i}.mlp.{t}": torch.rand(1536, generator=g) for i in range(30) for t in ("up_proj", "gate_proj")}
    fig = viz.importance_heatmap(big)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (30, 256)
    assert len(fig.to_json()) < 250_000                   # 2 × 30 × 256 float32 values, base64


def test_saved_html_is_standalone(tmp_path):
    path = tmp_path / "heat.html"
    viz.importance_heatmap(make_scores()).write_html(path, include_plotlyjs=False)
    assert "scores:up_proj" in path.read_text()


# ------------------------------------------------------------------ distributions and overlaps
def test_score_distributions_use_each_layers_quartiles():
    scores = make_scores()
    fig = viz.score_distributions(scores)
    assert [t.type for t in fig.data] == ["box", "box"]
    box = [t for t in fig.data if t.name == "up_proj"][0]
    assert list(box.x) == list(range(LAYERS))
    for layer in range(LAYERS):
        v = sorted(scores[f"model.layers.{layer}.mlp.up_proj"].tolist())
        n = len(v)
        median = (v[n // 2 - 1] + v[n // 2]) / 2                # n even
        assert box.median[layer] == pytest.approx(median, rel=1e-3)
        assert box.lowerfence[layer] == pytest.approx(v[0], rel=1e-3)
        assert box.upperfence[layer] == pytest.approx(v[-1], rel=1e-3)
        assert box.mean[layer] == pytest.approx(sum(v) / n, rel=1e-3)


def test_metric_overlap_counts_shared_top_k_and_rank_correlation():
    a = {"model.layers.0.mlp.up_proj": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]),
         "model.layers.1.mlp.up_proj": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])}
    b = {"model.layers.0.mlp.up_proj": torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]),     # same order
         "model.layers.1.mlp.up_proj": torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])}     # reversed
    rows = {r["layer"]: r for r in viz.overlap_table(a, b, k=2)}
    assert rows["model.layers.0.mlp.up_proj"]["overlap"] == 1.0
    assert rows["model.layers.1.mlp.up_proj"]["overlap"] == 0.0          # {0,1} vs {3,4}
    assert rows["model.layers.0.mlp.up_proj"]["spearman"] == pytest.approx(1.0)
    assert rows["model.layers.1.mlp.up_proj"]["spearman"] == pytest.approx(-1.0)
    assert rows["model.layers.0.mlp.up_proj"]["random"] == pytest.approx(2 / 5)
    fig = viz.metric_overlap(a, b, k=2, labels=("taylor", "magnitude"))
    bars = [t for t in fig.data if t.type == "bar"]
    assert len(bars) == 1 and list(bars[0].y) == [1.0, 0.0]
    assert any(t.name == "random (k/n)" for t in fig.data)
    # k as a ratio: 0.4 of 5 neurons = 2
    assert viz.overlap_table(a, b, k=0.4)[1]["k"] == 2


def test_spearman_matches_pearson_of_ranks_with_ties():
    a, b = [1.0, 2.0, 2.0, 3.0], [10.0, 30.0, 20.0, 40.0]
    ra, rb = [0, 1.5, 1.5, 3], [0, 2, 1, 3]
    ma, mb = sum(ra) / 4, sum(rb) / 4
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    expected = cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    assert viz.spearman(a, b) == pytest.approx(expected)


def test_overlap_matrix_is_symmetric_with_unit_diagonal():
    s1, s2, s3 = make_scores(0), make_scores(0), make_scores(1)
    fig = viz.overlap_matrix({"a": s1, "b": s2, "c": s3}, k=10)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (3, 3) and np.allclose(z, z.T) and np.allclose(np.diag(z), 1)
    assert z[0, 1] == pytest.approx(1.0) and z[0, 2] < 1.0
    with pytest.raises(ValueError, match="two"):
        viz.overlap_matrix({"a": s1})


# ------------------------------------------------------------------ memory
class Report:
    """A MemoryReport-like object: fields in bytes, as_dict(), .method, .total."""

    def __init__(self, method, **bytes_):
        self.method, self.fields = method, bytes_

    @property
    def total(self):
        return sum(self.fields.values())

    def as_dict(self):
        return {**self.fields, "total": self.total, "method": self.method}


def test_memory_breakdown_stacks_the_input_bytes_per_method():
    row = Report("rowsft", weights=500, trainable=10, gradients=10, optimizer=20, activations=300, indices=2)
    full = Report("full", weights=0, trainable=500, gradients=500, optimizer=1000, activations=300, indices=0)
    fig = viz.memory_breakdown([row, full], measured={"rowsft": 900})
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == [c for c in viz.COMPONENTS if c != "transient"]   # no transient: no bar
    assert fig.layout.barmode == "stack"
    for t in bars:
        assert list(t.x) == ["rowsft", "full"]
        assert list(t.y) == [row.fields[t.name], full.fields[t.name]]
    stacked = [sum(t.y[i] for t in bars) for i in range(2)]
    assert stacked == [row.total, full.total]
    peak = trace(fig, "measured peak")
    assert list(peak.x) == ["rowsft"] and list(peak.y) == [900]
    as_dicts = viz.memory_breakdown({"a": row.as_dict(), "b": full.fields})
    assert [list(t.x) for t in as_dicts.data if t.type == "bar"][0] == ["a", "b"]
    with pytest.raises(ValueError, match="no report"):
        viz.memory_breakdown([row], measured={"lora": 1})


def test_memory_breakdown_never_counts_trainable_twice_for_rowsft_reports():
    memory = pytest.importorskip("rowsft.memory")
    report = memory.MemoryReport(weights=1000, trainable=100, gradients=100, optimizer=200, activations=50,
                                 indices=8, transient=30, method="rowsft-row")
    fig = viz.memory_breakdown([report])
    heights = {t.name: t.y[0] for t in fig.data if t.type == "bar"}
    assert heights["weights"] == 900 and heights["trainable"] == 100 and heights["transient"] == 30
    assert sum(heights.values()) == report.total == 1000 + 100 + 200 + 50 + 8 + 30


# ------------------------------------------------------------------ curves
def test_training_curves_overlay_runs_per_metric():
    h = History(steps=[{"step": i, "loss": 3.0 - i / 10, "lr": 1e-3, "memory_peak": i * 2 ** 20} for i in range(1, 6)],
                evals=[{"step": 5, "accuracy": 0.75}])
    lora = [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.1}]
    fig = viz.training_curves({"row-sparse": h, "LoRA": lora, "full": h.to_dict()},
                              metrics=("loss", "memory", "accuracy"))
    assert len(fig.data) == 9
    by = {(t.meta["run"], t.meta["metric"]): t for t in fig.data}
    assert list(by[("row-sparse", "loss")].x) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(by[("row-sparse", "loss")].y, [2.9, 2.8, 2.7, 2.6, 2.5], rtol=1e-4)
    np.testing.assert_allclose(by[("full", "memory")].y, [1, 2, 3, 4, 5])          # MiB
    assert list(by[("row-sparse", "accuracy")].y) == [0.75]
    assert len(by[("LoRA", "memory")].x) == 0 and len(by[("LoRA", "accuracy")].x) == 0
    colors = {t.meta["run"]: t.line.color for t in fig.data}
    assert len(set(colors.values())) == 3                 # one colour per run, same in every panel
    assert all(t.line.color == colors[t.meta["run"]] for t in fig.data)
    with pytest.raises(ValueError, match="metric"):
        viz.training_curves({"a": lora}, metrics=())
    with pytest.raises(TypeError, match="History"):
        viz.training_curves({"a": 3})


def test_figures_use_the_small_template():
    fig = viz.training_curves({"a": [{"step": 1, "loss": 1.0}]})
    assert len(json.dumps(fig.layout.template.to_plotly_json())) < 1500
