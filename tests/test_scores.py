"""The Scores value: tidy tables, summaries, comparisons, normalisation and save/load."""
import json

import numpy as np
import pytest
import torch

from rowsft.data.models import tiny_model
from rowsft.scoring import score
from rowsft.scoring.agreement import topk_indices
from rowsft.scoring.scores import Scores, normalization_scale
from rowsft.targets import neuron_groups


def hand_scores(unit="row", seed=0, normalize="none"):
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.mlp.up_proj": (8, 4), "model.layers.1.mlp.up_proj": (8, 4),
              "model.layers.1.self_attn.o_proj": (4, 4)}
    size = {"row": lambda s: (s[0],), "column": lambda s: (s[1],), "element": lambda s: s}[unit]
    values = {n: torch.rand(size(s), generator=g) for n, s in shapes.items()}
    return Scores(values, "taylor", unit, normalize, shapes)


def test_tidy_frame_has_one_row_per_unit():
    s = hand_scores()
    frame = s.tidy()
    assert list(frame.columns) == ["layer", "module_type", "layer_index", "neuron", "score"]
    assert len(frame) == 8 + 8 + 4
    up0 = frame[frame.layer == "model.layers.0.mlp.up_proj"]
    assert up0.module_type.unique().tolist() == ["up_proj"] and up0.layer_index.unique().tolist() == [0]
    np.testing.assert_allclose(up0.score.to_numpy(), s["model.layers.0.mlp.up_proj"].numpy())
    assert up0.neuron.tolist() == list(range(8))
    elements = hand_scores("element").tidy()
    assert len(elements) == 32 + 32 + 16 and elements.neuron.max() == 31


def test_group_tidy_uses_group_kind_and_block_index():
    model = tiny_model("llama", vocab_size=128)
    s = score(model, metric="magnitude", unit="group")
    frame = s.tidy()
    assert set(frame.module_type) == {"mlp", "attention"}
    assert set(frame.layer_index) == {0, 1}
    assert len(frame) == sum(g.size for g in neuron_groups(model))


def test_summary_per_layer():
    s = hand_scores()
    summary = s.summary()
    assert list(summary.columns) == ["layer", "module_type", "layer_index", "mean", "std", "max", "min"]
    assert len(summary) == 3
    row = summary.set_index("layer").loc["model.layers.1.self_attn.o_proj"]
    v = s["model.layers.1.self_attn.o_proj"].double()
    assert row["mean"] == pytest.approx(float(v.mean())) and row["std"] == pytest.approx(float(v.std()))
    assert row["max"] == pytest.approx(float(v.max())) and row["min"] == pytest.approx(float(v.min()))


def reference_spearman(a, b):
    """Average ranks through pandas, Pearson through numpy."""
    import pandas as pd
    ra = pd.Series(a.numpy()).rank().to_numpy()
    rb = pd.Series(b.numpy()).rank().to_numpy()
    return float(np.corrcoef(ra, rb)[0, 1])


def test_rank_correlation_is_spearman_with_ties():
    a, b = hand_scores(seed=1), hand_scores(seed=2)
    name = "model.layers.0.mlp.up_proj"
    b._values[name] = torch.tensor([1., 1., 2., 3., 3., 3., 0., 5.])  # ties
    rho = a.rank_correlation(b)
    assert set(rho) == set(a)
    for n in a:
        assert rho[n] == pytest.approx(reference_spearman(a[n], b[n]), abs=1e-12)
    assert a.rank_correlation(a)[name] == pytest.approx(1.0)
    flipped = Scores({n: -v for n, v in a.items()}, "taylor", "row", "none", a.shapes)
    assert flipped.rank_correlation(a)[name] == pytest.approx(-1.0)


def test_topk_overlap_and_tie_breaking():
    a = Scores({"l.0.x": torch.tensor([5., 4., 3., 2., 1.])}, "m", "row", shapes={"l.0.x": (5, 2)})
    b = Scores({"l.0.x": torch.tensor([5., 1., 3., 2., 4.])}, "m", "row", shapes={"l.0.x": (5, 2)})
    assert a.topk_overlap(b, 2) == {"l.0.x": 0.5}
    assert a.topk_overlap(b, 3) == {"l.0.x": pytest.approx(2 / 3)}
    assert a.topk_overlap(b, 1.0) == {"l.0.x": 1.0}
    assert topk_indices(torch.tensor([1., 2., 2., 2., 0.]), 2).tolist() == [1, 2]  # lower index wins ties
    with pytest.raises(ValueError, match="ratio"):
        a.topk_overlap(b, 0)


def test_normalisation_scales_and_raw_values():
    raw = torch.tensor([1., 2., 3., 6.])
    assert normalization_scale(raw, "mean") == pytest.approx(3.0)
    assert normalization_scale(raw, "max") == 6.0 and normalization_scale(raw, "sum") == 12.0
    assert normalization_scale(raw, "none") == 1.0 and normalization_scale(torch.zeros(3), "mean") == 1.0
    assert normalization_scale(torch.tensor([-2., 2.]), "mean") == 2.0  # signed metrics: mean of |s|
    s = Scores({"a.0.b": raw / 3}, "m", "row", "mean", {"a.0.b": (4, 1)}, scales={"a.0.b": 3.0})
    torch.testing.assert_close(s.raw("a.0.b"), raw)
    torch.testing.assert_close(s.renormalize("max")["a.0.b"], raw / 6)
    with pytest.raises(ValueError, match="normalize"):
        normalization_scale(raw, "median")


def test_shape_is_checked_against_the_unit():
    with pytest.raises(ValueError, match="needs"):
        Scores({"a.0.b": torch.zeros(3)}, "m", "row", shapes={"a.0.b": (4, 2)})
    with pytest.raises(ValueError, match="unit"):
        Scores({}, "m", "neuron")


@pytest.mark.parametrize("unit", ["row", "group", "element"])
def test_save_and_load_round_trip(tmp_path, unit):
    model = tiny_model("gpt2", vocab_size=128)
    s = score(model, metric="magnitude", unit=unit)
    s.save(tmp_path / "scores")
    assert sorted(p.name for p in (tmp_path / "scores").iterdir()) == ["scores.json", "scores.safetensors"]
    info = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert info["metric"] == "magnitude" and info["unit"] == unit
    back = Scores.load(tmp_path / "scores")
    assert list(back) == list(s) and back.unit == unit and back.normalize == s.normalize
    assert back.shapes == s.shapes and back.groups == s.groups and back.scales == s.scales and back.meta == s.meta
    assert all(torch.equal(back[n], s[n]) for n in s)
    s.save(tmp_path / "scores")  # overwriting keeps one complete copy
    assert [p.name for p in tmp_path.iterdir()] == ["scores"]


def test_load_missing_folder_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="scores.json"):
        Scores.load(tmp_path)


def test_mapping_protocol_and_errors():
    s = hand_scores()
    assert len(s) == 3 and "model.layers.0.mlp.up_proj" in s
    with pytest.raises(KeyError, match="scored layers"):
        s["nope"]
    sub = s.subset(["model.layers.1.self_attn.o_proj"])
    assert list(sub) == ["model.layers.1.self_attn.o_proj"]
    with pytest.raises(ValueError, match="share no layer"):
        s.rank_correlation(Scores({"x.0.y": torch.zeros(2)}, "m", "row", shapes={"x.0.y": (2, 2)}))
