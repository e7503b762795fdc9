"""rowsft.viz: every builder returns the traces and numbers its input implies.

Expected values are computed here independently (plain loops over the input), never read back
from the code under test.
"""
from __future__ import annotations

import base64
import json
import math
import os
import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from rowsft import viz
from rowsft.viz import export
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


def test_bin_neurons_merges_the_remainder_into_the_last_bin():
    m = np.arange(10, dtype=float).reshape(1, 10)
    binned, size = viz.bin_neurons(m, max_columns=4, reduce="mean")
    assert size == 3 and binned.tolist() == [[1.0, 4.0, 7.5]]              # 0-2, 3-5, 6-9: no lone neuron 9
    binned, _ = viz.bin_neurons(m, max_columns=4, reduce="max")
    assert binned.tolist() == [[2.0, 5.0, 9.0]]


def test_a_576_wide_layer_has_no_one_neuron_bin_and_says_its_bin_size():
    v = torch.rand(576, generator=torch.Generator().manual_seed(3))
    fig = viz.importance_heatmap({"model.layers.0.mlp.down_proj": v}, max_columns=128)
    z = np.asarray(fig.data[0].z, dtype=float)[0]
    assert len(z) == 576 // 5 == 115                                       # ceil(576/128) = 5; 576 = 115·5 + 1
    assert z[-1] == pytest.approx(max(v[570:].tolist()), rel=1e-3)         # the last bin holds 6 neurons
    assert z[-2] == pytest.approx(max(v[565:570].tolist()), rel=1e-3)
    title = fig.layout.xaxis.title.text
    assert "bins of 5" in title and "last holds 6" in title


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


def shown_values(scores, types, log=False, order="original", size_of=None):
    """Independent binning (plain loops) of every layer of ``types``, optionally log10 and sorted."""
    out = []
    for name in scores:
        t = name.rsplit(".", 1)[-1]
        if t not in types:
            continue
        v = scores[name].numpy().astype(float)
        if order == "sorted":
            v = np.sort(v)[::-1]
        bins = expected_bins(v, size_of(len(v)), "max")
        out.extend(math.log10(b) if log else b for b in bins if not log or b > 0)
    return np.asarray(out)


def panel_pixels(fig, axis: str) -> float:
    """Height in px of the panel whose y axis is ``axis`` (``yaxis``, ``yaxis2``, ...)."""
    plot = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    lo, hi = fig.layout[axis].domain
    return (hi - lo) * plot


def test_colour_range_is_clipped_to_the_1st_and_99th_percentile():
    scores = make_scores()
    scores["model.layers.1.mlp.up_proj"][7] = 500.0                       # one outlier must not set the scale
    fig = viz.importance_heatmap(scores)
    size_of = lambda width: 3 if width == WIDE else 1                     # noqa: E731
    expected = np.percentile(shown_values(scores, {"up_proj", "q_proj"}, size_of=size_of), [1, 99])
    axis = fig.layout.coloraxis
    assert (axis.cmin, axis.cmax) == pytest.approx(tuple(expected), rel=1e-3)
    assert axis.cmax < 2                                                   # not stretched to 500
    assert "1st–99th" in axis.colorbar.title.text and "clipped" in axis.colorbar.title.text
    assert all(t.coloraxis == "coloraxis" for t in fig.data if t.type == "heatmap")
    logged = viz.importance_heatmap(scores, log=True, clip=(5, 95))
    expected = np.percentile(shown_values(scores, {"up_proj", "q_proj"}, log=True, size_of=size_of), [5, 95])
    assert (logged.layout.coloraxis.cmin, logged.layout.coloraxis.cmax) == pytest.approx(tuple(expected), rel=1e-3)
    assert "5th–95th" in logged.layout.coloraxis.colorbar.title.text
    full = viz.importance_heatmap(scores, clip=None).layout.coloraxis
    assert full.cmax == pytest.approx(500.0, rel=1e-3)
    fixed = viz.importance_heatmap(scores, zrange=(0.0, 2.0)).layout.coloraxis
    assert (fixed.cmin, fixed.cmax) == (0.0, 2.0)
    with pytest.raises(ValueError, match="percentiles"):
        viz.importance_heatmap(scores, clip=(99, 1))


def test_heatmap_rows_touch_and_axes_name_the_bin_size():
    fig = viz.importance_heatmap(make_scores())
    assert all(t.ygap == 0 and t.xgap == 0 for t in fig.data if t.type == "heatmap")
    titles = {a.title.text for a in (fig.layout.xaxis, fig.layout.xaxis2)}
    assert titles == {"neuron (bins of 3; max shown)", "neuron"}
    sorted_fig = viz.importance_heatmap(make_scores(), order="sorted", reduce="mean", module_type="up_proj")
    assert sorted_fig.layout.xaxis.title.text == "neuron rank (bins of 3; mean shown)"


def test_marks_are_thin_ticks_inside_their_block_row():
    g = torch.Generator().manual_seed(5)
    scores = {f"model.layers.{b}.mlp.up_proj": torch.rand(1536, generator=g) for b in range(30)}
    selection = {name: torch.topk(v, 16).indices for name, v in scores.items()}
    fig = viz.importance_heatmap(scores, selection=selection)
    marks = trace(fig, "selected:up_proj")
    heat = trace(fig, "scores:up_proj")
    assert set(marks.y) <= set(heat.y) and max(marks.y) == 29
    row_px = panel_pixels(fig, "yaxis") / 30
    assert marks.marker.size <= row_px                                     # never taller than one block row
    assert marks.marker.line.width <= 2
    top, bottom = fig.layout.yaxis.range                                  # reversed: block 0 at the top
    assert (top, bottom) == (29.5, -0.5)                                   # marks cannot widen the panel
    x0, x1 = fig.layout.xaxis.range
    assert x0 <= min(heat.x) and x1 >= max(heat.x) and x1 - max(heat.x) <= 6


def test_block_axes_tick_at_whole_blocks_only():
    def ticks(axis, n):
        assert axis.tickmode == "linear" and float(axis.tick0).is_integer() and float(axis.dtick).is_integer()
        values = [axis.tick0 + i * axis.dtick for i in range(n)]
        return values
    two = {f"model.layers.{b}.mlp.up_proj": torch.rand(8) for b in range(2)}
    fig = viz.importance_heatmap(two)
    assert ticks(fig.layout.yaxis, 3)[:2] == [0, 1]                        # not -0.5, 0, 0.5, ...
    thirty = {f"model.layers.{b}.mlp.up_proj": torch.rand(8) for b in range(30)}
    assert viz.importance_heatmap(thirty).layout.yaxis.dtick == 5
    dist = viz.score_distributions(two)
    assert ticks(dist.layout.xaxis, 2) == [0, 1] and dist.layout.xaxis.title.text == "block"
    overlap = viz.metric_overlap(two, {k: v.flip(0) for k, v in two.items()}, k=2)
    assert ticks(overlap.layout.xaxis2, 2) == [0, 1]


def test_panel_titles_clear_the_tick_labels_of_the_panel_above():
    scores = make_scores()
    fig = viz.importance_heatmap(scores)
    plot = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    gap_px = (fig.layout.yaxis.domain[0] - fig.layout.yaxis2.domain[1]) * plot
    assert gap_px >= 80             # tick labels (~15 px) + axis title (~20 px) + panel title (~20 px) and air
    assert fig.layout.xaxis.domain == fig.layout.xaxis2.domain             # panel edges line up


def test_metric_heatmaps_share_one_colour_range():
    g = torch.Generator().manual_seed(2)
    small = {f"model.layers.{b}.mlp.up_proj": torch.rand(40, generator=g) for b in range(3)}
    big = {name: 10 * torch.rand(40, generator=g) for name in small}
    fig = viz.metric_heatmaps({"taylor": small, "random": big}, module_type="up_proj")
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert [t.name for t in heats] == ["scores:taylor · up_proj", "scores:random · up_proj"]
    assert all(t.coloraxis == "coloraxis" for t in heats)
    pooled = np.concatenate([np.sort(v.numpy().astype(float))[::-1] for d in (small, big) for v in d.values()])
    expected = np.percentile(pooled, [1, 99])
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == pytest.approx(tuple(expected), rel=1e-3)
    for heat, source in zip(heats, (small, big)):                          # sorted by decreasing score
        z = np.asarray(heat.z, dtype=float)
        np.testing.assert_allclose(z[1], sorted(source["model.layers.1.mlp.up_proj"].tolist(), reverse=True), rtol=1e-3)
    assert [a.text for a in fig.layout.annotations][:2] == ["taylor", "random"]
    with pytest.raises(ValueError, match="module type"):
        viz.metric_heatmaps({"taylor": small}, module_type="q_proj")


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
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert list(bars) == ["top-k overlap", "Spearman ρ"]
    overlap = bars["top-k overlap"]
    assert list(overlap.x) == ["up_proj"] and list(overlap.y) == [0.5]     # mean of the two blocks
    assert list(overlap.error_y.array) == [0.5] and list(overlap.error_y.arrayminus) == [0.5]   # up to 1, down to 0
    assert list(bars["Spearman ρ"].y) == pytest.approx([0.0])              # mean of +1 and -1
    per_block = [t for t in fig.data if t.type == "scatter" and t.name == "top-k overlap"][0]
    assert list(per_block.x) == [0, 1] and list(per_block.y) == [1.0, 0.0]
    random = [t for t in fig.data if t.name == "random picks (k/n)"]
    assert all(list(t.y) == pytest.approx([0.4] * len(t.y)) for t in random)
    # k as a ratio: 0.4 of 5 neurons = 2
    assert viz.overlap_table(a, b, k=0.4)[1]["k"] == 2


def test_metric_overlap_stays_readable_for_30_blocks_of_7_types():
    g = torch.Generator().manual_seed(4)
    types = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    a = {f"model.layers.{b}.x.{t}": torch.rand(64, generator=g) for b in range(30) for t in types}
    b = {name: torch.rand(64, generator=g) for name in a}
    fig = viz.metric_overlap(a, b, k=0.1)
    bar_values = sum(len(t.y) for t in fig.data if t.type == "bar")
    assert bar_values == 2 * len(types)                                    # 14 bars, not 210
    rows = viz.overlap_table(a, b, k=0.1)
    overlap = [t for t in fig.data if t.type == "bar" and t.name == "top-k overlap"][0]
    expected = [sum(r["overlap"] for r in rows if r["type"] == t) / 30 for t in types]
    np.testing.assert_allclose(overlap.y, expected, rtol=1e-3)
    assert not fig.layout.annotations or all(a.yref == "paper" or a.yref.endswith("domain") for a in fig.layout.annotations)


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
    long = viz.overlap_matrix({"magnitude": s1, "zo-taylor": s3}, k=10)
    assert long.layout.margin.l >= 8 * len("magnitude") and long.layout.yaxis.automargin
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
    for t in bars:
        assert list(t.x) == ["rowsft", "full"]
        if t.name != "weights":
            assert list(t.y) == [row.fields[t.name], full.fields[t.name]]
    by = {t.name: t for t in bars}
    # full fine-tuning trains its weights in place: a grey weights segment as tall as its trainable bytes,
    # with the trainable segment drawn over it (same base, same height), not stacked on top
    assert list(by["weights"].y) == [500, 500]
    assert by["trainable"].base[1] == by["weights"].base[1] == 0 and by["trainable"].y[1] == by["weights"].y[1]
    for i, report in enumerate((row, full)):
        level = 0
        for t in bars:
            if t.name == "trainable" and i == 1:
                continue                                            # the overlay: not part of the stack
            assert t.base[i] == level, (t.name, i)
            level += t.y[i]
        assert level == report.total
    assert fig.layout.meta["rowsft"]["totals"] == [row.total, full.total]
    assert fig.layout.meta["rowsft"]["in_place"] == ["full"]
    peak = trace(fig, "measured peak")
    assert list(peak.x) == ["rowsft"] and list(peak.y) == [900]
    as_dicts = viz.memory_breakdown({"a": row.as_dict(), "b": full.fields})
    assert [list(t.x) for t in as_dicts.data if t.type == "bar"][0] == ["a", "b"]
    with pytest.raises(ValueError, match="no report"):
        viz.memory_breakdown([row], measured={"lora": 1})


def test_memory_axis_reads_in_mib_not_si_bytes():
    mib = 2 ** 20
    reports = {"row": {"weights": 513 * mib, "activations": 700 * mib}, "LoRA": {"weights": 513 * mib, "activations": 760 * mib}}
    fig = viz.memory_breakdown(reports)
    axis = fig.layout.yaxis
    assert "MiB" in axis.title.text and axis.tickmode == "array"
    assert not axis.tickformat and not axis.ticksuffix                      # no "1.3GB"
    values = [v / mib for v in axis.tickvals]
    assert [float(t.replace(",", "")) for t in axis.ticktext] == pytest.approx(values)
    steps = np.diff(values)
    assert np.allclose(steps, steps[0]) and values[0] == 0 and values[-1] >= 1273
    texts = [a.text for a in fig.layout.annotations]
    assert texts == ["1,213.0 MiB", "1,273.0 MiB"]


def test_measured_peaks_leave_the_total_labels_clear():
    mib = 2 ** 20
    reports = {"row": {"weights": 500 * mib, "activations": 450 * mib}, "LoRA": {"weights": 500 * mib, "activations": 500 * mib}}
    measured = {"row": 960 * mib, "LoRA": 990 * mib}                        # one above, one below its total
    fig = viz.memory_breakdown(reports, measured=measured)
    peak = trace(fig, "measured peak")
    half_marker = peak.marker.size / 2
    for label, method in zip(fig.layout.annotations, ("row", "LoRA")):
        total = sum(reports[method].values())
        assert label.x == method and label.yanchor == "bottom"
        assert label.y == max(total, measured[method])                      # above whichever is higher ...
        assert label.yshift >= half_marker + 4                              # ... and clear of the diamond
    top = max(label.y for label in fig.layout.annotations)
    assert fig.layout.yaxis.range[1] >= 1.1 * top                          # room for the labels


def test_bar_labels_state_the_trainable_budget_when_it_differs():
    mib = 2 ** 20
    reports = {"rows k=64": {"weights": 500 * mib, "trainable": 12 * mib},
               "LoRA r=8": {"weights": 500 * mib, "trainable": 9 * mib}}
    fig = viz.memory_breakdown(reports, trainable_parameters={"rows k=64": 3_190_000, "LoRA r=8": 2_400_000})
    assert list(fig.layout.xaxis.ticktext) == ["rows k=64<br>3.19 M trainable", "LoRA r=8<br>2.4 M trainable"]
    assert list(fig.layout.xaxis.tickvals) == ["rows k=64", "LoRA r=8"]
    no_counts = viz.memory_breakdown(reports)                               # the trainable bytes instead
    assert list(no_counts.layout.xaxis.ticktext) == ["rows k=64<br>12.0 MiB trainable", "LoRA r=8<br>9.0 MiB trainable"]
    same = viz.memory_breakdown(reports, trainable_parameters={"rows k=64": 10, "LoRA r=8": 10})
    assert list(same.layout.xaxis.ticktext) == ["rows k=64", "LoRA r=8"]   # equal budgets: names only
    counted = {m: {**r, "trainable_parameters": n} for (m, r), n in zip(reports.items(), (5, 7))}
    from_reports = viz.memory_breakdown(counted)
    assert "trainable_parameters" not in {t.name for t in from_reports.data}
    assert list(from_reports.layout.xaxis.ticktext) == ["rows k=64<br>5 trainable", "LoRA r=8<br>7 trainable"]


def test_memory_breakdown_never_counts_trainable_twice_for_rowsft_reports():
    memory = pytest.importorskip("rowsft.memory")
    report = memory.MemoryReport(weights=1000, trainable=100, gradients=100, optimizer=200, activations=50,
                                 indices=8, transient=30, method="rowsft-row")
    fig = viz.memory_breakdown([report])
    heights = {t.name: t.y[0] for t in fig.data if t.type == "bar"}
    assert heights["weights"] == 900 and heights["trainable"] == 100 and heights["transient"] == 30
    assert sum(heights.values()) == report.total == 1000 + 100 + 200 + 50 + 8 + 30
    full = memory.MemoryReport(weights=1000, trainable=1000, gradients=1000, optimizer=2000, method="full")
    fig = viz.memory_breakdown([full])
    heights = {t.name: t.y[0] for t in fig.data if t.type == "bar"}
    assert heights["weights"] == 1000 and heights["trainable"] == 1000       # grey weights, trainable over them
    assert fig.layout.meta["rowsft"]["totals"] == [full.total] and fig.layout.meta["rowsft"]["in_place"] == ["full"]
    both = viz.memory_breakdown({"row": report, "full": full})
    assert both.layout.xaxis.ticktext[1] == "full<br>0.0 MiB trainable<br>(all weights)"


# ------------------------------------------------------------------ curves
def test_training_curves_overlay_runs_per_metric():
    h = History(steps=[{"step": i, "loss": 3.0 - i / 10, "lr": 1e-3, "memory_peak": i * 2 ** 20} for i in range(1, 6)],
                evals=[{"step": 5, "accuracy": 0.75}])
    lora = [{"step": 1, "loss": 3.5}, {"step": 2, "loss": 3.1}]
    fig = viz.training_curves({"row-sparse": h, "LoRA": lora, "full": h.to_dict()},
                              metrics=("loss", "memory", "accuracy"))
    assert len(fig.data) == 9                             # 5 steps: too few for a running mean
    by = {(t.meta["run"], t.meta["metric"]): t for t in fig.data}
    assert list(by[("row-sparse", "loss")].x) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(by[("row-sparse", "loss")].y, [2.9, 2.8, 2.7, 2.6, 2.5], rtol=1e-4)
    np.testing.assert_allclose(by[("full", "memory")].y, [1, 2, 3, 4, 5])          # MiB
    assert list(by[("row-sparse", "accuracy")].y) == [0.75]
    assert len(by[("LoRA", "memory")].x) == 0 and len(by[("LoRA", "accuracy")].x) == 0
    colors = {t.meta["run"]: t.line.color for t in fig.data}
    assert len(set(colors.values())) == 3                 # one colour per run, same in every panel
    assert all(t.line.color == colors[t.meta["run"]] for t in fig.data)
    assert colors["LoRA"] == viz.SERIES_COLORS["lora"] and colors["full"] == viz.SERIES_COLORS["full"]
    assert fig.layout.yaxis2.exponentformat == "none"     # memory in MiB: 1,200 not 1.2k
    with pytest.raises(ValueError, match="metric"):
        viz.training_curves({"a": lora}, metrics=())
    with pytest.raises(TypeError, match="History"):
        viz.training_curves({"a": 3})


def noisy_history(n: int, seed: int = 0, evals=()) -> History:
    rng = np.random.default_rng(seed)
    return History(steps=[{"step": i, "loss": float(2.0 + rng.normal())} for i in range(1, n + 1)], evals=list(evals))


def test_running_mean_is_drawn_over_faint_raw_points():
    h = noisy_history(25)
    losses = np.array(h.losses)
    fig = viz.training_curves({"row": h}, metrics=("loss",), smooth=5)
    raw = [t for t in fig.data if t.meta == {"run": "row", "metric": "loss"}][0]
    mean = [t for t in fig.data if t.meta and t.meta.get("kind") == "mean"][0]
    expected = [losses[max(0, i - 4):i + 1].mean() for i in range(25)]    # the last 5 values, fewer at the start
    np.testing.assert_allclose(mean.y, expected, rtol=1e-3)
    np.testing.assert_allclose(raw.y, losses, rtol=1e-3)
    assert list(mean.x) == list(raw.x) == list(range(1, 26))
    assert raw.mode == "markers" and raw.opacity <= 0.4 and not raw.showlegend
    assert mean.mode == "lines" and mean.showlegend and mean.line.color == raw.marker.color
    assert "running mean" in fig.layout.legend.title.text
    np.testing.assert_allclose(viz.curves.running_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    auto = viz.training_curves({"row": noisy_history(200)}, metrics=("loss",))
    assert [t.meta["window"] for t in auto.data if t.meta.get("kind") == "mean"] == [20]      # 200 // 10
    assert len(viz.training_curves({"row": h}, metrics=("loss",), smooth=None).data) == 1
    with pytest.raises(ValueError, match="smooth"):
        viz.training_curves({"row": h}, smooth="yes")


def test_held_out_loss_is_drawn_where_the_run_evaluated():
    h = noisy_history(30, evals=[{"step": 10, "eval_loss": 1.9, "accuracy": 0.5}, {"step": 30, "eval_loss": 1.4, "accuracy": 0.6}])
    fig = viz.training_curves({"row": h, "lora": noisy_history(30, 1)}, metrics=("loss", "accuracy"))
    held = [t for t in fig.data if t.meta and t.meta.get("kind") == "eval"]
    assert len(held) == 1 and held[0].meta["run"] == "row" and held[0].meta["metric"] == "loss"
    assert list(held[0].x) == [10, 30] and list(held[0].y) == pytest.approx([1.9, 1.4])
    assert held[0].marker.symbol == "diamond"
    assert trace(fig, "held-out (evaluated)").showlegend is not False
    accuracy = [t for t in fig.data if t.meta == {"run": "row", "metric": "accuracy"}][0]
    assert list(accuracy.y) == pytest.approx([0.5, 0.6])


def test_resumed_runs_continue_on_cumulative_steps():
    first, stopped, resumed = noisy_history(12), noisy_history(4, 1), noisy_history(8, 2)
    fig = viz.training_curves({"first run": first, "stopped early": stopped, "resumed": resumed}, metrics=("loss",),
                              smooth=None, continue_from={"resumed": "stopped early"})
    xs = {t.meta["run"]: list(t.x) for t in fig.data if t.meta}
    assert xs["stopped early"] == [1, 2, 3, 4] and xs["resumed"] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert xs["first run"] == list(range(1, 13))
    assert [s.x0 for s in fig.layout.shapes] == [4]                       # where the resumed run starts
    assert "cumulative" in fig.layout.xaxis.title.text
    chained = viz.training_curves({"a": stopped, "b": stopped, "c": resumed}, metrics=("loss",), smooth=None,
                                  continue_from={"b": "a", "c": "b"})
    assert [list(t.x) for t in chained.data if t.meta["run"] == "c"][0][0] == 9          # 4 + 4 + 1
    shifted = viz.training_curves({"late": resumed}, metrics=("loss",), smooth=None, continue_from={"late": 100})
    assert list(shifted.data[0].x)[0] == 101
    with pytest.raises(ValueError, match="not drawn"):
        viz.training_curves({"a": stopped}, continue_from={"a": "nope"})
    with pytest.raises(ValueError, match="circle"):
        viz.training_curves({"a": stopped, "b": stopped}, continue_from={"a": "b", "b": "a"})


def test_series_keep_their_colour_across_figures():
    colors = viz.series_colors(["row · taylor", "row · random", "LoRA (peft)", "rows k=16", "full", "first run"])
    assert colors["row · taylor"] == viz.SERIES_COLORS["taylor"]          # the metric names the colour
    assert colors["row · random"] == viz.SERIES_COLORS["random"]
    assert colors["LoRA (peft)"] == viz.SERIES_COLORS["lora"] and colors["rows k=16"] == viz.SERIES_COLORS["row"]
    assert colors["full"] == viz.SERIES_COLORS["full"]
    assert len(set(colors.values())) == len(colors)                       # distinct within a figure
    assert viz.series_colors(["zo-taylor"])["zo-taylor"] == viz.SERIES_COLORS["zo-taylor"]
    again = viz.series_colors(["column · taylor", "row · taylor"])         # a clash takes the next free colour
    assert again["column · taylor"] == viz.SERIES_COLORS["taylor"] and again["row · taylor"] != again["column · taylor"]


def test_figures_use_the_small_template():
    fig = viz.training_curves({"a": [{"step": 1, "loss": 1.0}]})
    assert len(json.dumps(fig.layout.template.to_plotly_json())) < 1500


# ------------------------------------------------------------------ static export
IN_CI = os.environ.get("CI", "").strip().lower() == "true"


@pytest.fixture
def static_export():
    """Skip where kaleido or Chromium is missing, except under CI=true, where that fails the test."""
    problem = export.static_export_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true, so static figure export must work, but {problem}")
        pytest.skip(f"static figure export cannot run here: {problem}")


@pytest.mark.browser
def test_save_figure_writes_png_and_svg_offline(tmp_path, static_export):
    fig = viz.memory_breakdown({"row": {"weights": 2 ** 20, "activations": 2 ** 21}})
    png = viz.save_figure(fig, tmp_path / "memory.png", scale=1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = viz.save_figure(fig, tmp_path / "memory.svg")
    assert svg.read_text().lstrip().startswith("<svg") and "MiB" in svg.read_text()
    bundle = export.StaticImageRenderer("png").to_mimebundle(fig.to_dict())
    assert base64.b64decode(bundle["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_static_renderer_falls_back_to_interactive_with_one_warning(monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", "/nonexistent/chromium")
    assert "BROWSER_PATH" in (export.static_export_problem() or "")
    with pytest.warns(UserWarning, match="interactive only") as caught:
        assert export.static_renderer("plotly_mimetype") == "plotly_mimetype"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    renderer = export.StaticImageRenderer("png")
    with pytest.warns(UserWarning, match="without a static image"):
        assert renderer.to_mimebundle(go.Figure().to_dict()) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                    # the second figure: no new warning
        assert renderer.to_mimebundle(go.Figure().to_dict()) == {}
    with pytest.raises(ImportError, match="kaleido and a Chromium"):
        viz.save_figure(go.Figure(), "figure.png")


def test_reference_line_labels_sit_outside_the_plot():
    fig = go.Figure(go.Bar(x=list(range(30)), y=[0.5] * 30))
    viz.reference_line(fig, 0.05, "random picks")
    [label] = fig.layout.annotations
    assert (label.x, label.xref, label.xanchor, label.y) == (1.0, "paper", "left", 0.05)   # right of the bars
    assert fig.layout.margin.r >= 7 * len("random picks")
    assert fig.layout.shapes[0].y0 == fig.layout.shapes[0].y1 == 0.05
    panels = viz.metric_overlap(*[{f"model.layers.{b}.mlp.up_proj": torch.rand(8) for b in range(2)} for _ in range(2)], k=2)
    viz.reference_line(panels, 0.5, "half", row=1, col=1)
    label = panels.layout.annotations[-1]
    assert label.yref == "y" and label.x == pytest.approx(panels.layout.xaxis.domain[1])


def test_a_browser_that_fails_to_start_costs_the_image_not_the_cell(monkeypatch):
    pytest.importorskip("kaleido")
    monkeypatch.setenv("BROWSER_PATH", "/bin/false")                      # an executable that exits at once
    renderer = export.StaticImageRenderer("png", timeout=30)
    with pytest.warns(UserWarning, match="without a static image"):
        assert renderer.to_mimebundle(go.Figure().to_dict()) == {}
    assert renderer.failed and "\n" not in renderer.failed
