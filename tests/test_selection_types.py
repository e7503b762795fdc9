"""The Selection value: parameter counts, validation, overlap and serialisation."""
import json

import pytest
import torch

from rowsft.selection.choice import LayerChoice, Selection


def make():
    return Selection({
        "a.up_proj": LayerChoice("row", torch.tensor([0, 3, 5]), (8, 4)),
        "a.down_proj": LayerChoice("column", torch.tensor([1, 2]), (4, 8)),
        "a.q_proj": LayerChoice("element", torch.tensor([0, 7, 31]), (4, 8)),
    }, meta={"metric": "taylor"})


def test_counts_by_unit():
    s = make()
    assert s.trainable_parameters == 3 * 4 + 2 * 4 + 3
    assert list(s) == ["a.up_proj", "a.down_proj", "a.q_proj"] and s["a.up_proj"].tolist() == [0, 3, 5]


@pytest.mark.parametrize("unit,idx,shape,err", [
    ("row", [0, 8], (8, 4), IndexError), ("row", [-1], (8, 4), IndexError), ("column", [1, 1], (4, 8), ValueError),
    ("element", [32], (4, 8), IndexError), ("row", [], (8, 4), ValueError)])
def test_validation_errors(unit, idx, shape, err):
    with pytest.raises(err, match="a.x"):
        Selection({"a.x": LayerChoice(unit, torch.tensor(idx, dtype=torch.long), shape)}).validate()


def test_empty_selection_and_bad_unit():
    with pytest.raises(ValueError, match="names no layer"):
        Selection().validate()
    with pytest.raises(ValueError, match="unit must be"):
        LayerChoice("neuron", torch.tensor([0]), (2, 2))


def test_jaccard_and_roundtrip(tmp_path):
    s = make()
    t = Selection({"a.up_proj": LayerChoice("row", torch.tensor([0, 3, 6]), (8, 4))})
    assert s.jaccard(t) == {"a.up_proj": pytest.approx(2 / 4)}
    s.save(tmp_path / "sel.json")
    back = Selection.load(tmp_path / "sel.json")
    assert back.to_dict() == s.to_dict() and json.loads((tmp_path / "sel.json").read_text())["meta"] == {"metric": "taylor"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
