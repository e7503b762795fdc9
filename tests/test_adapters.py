"""save_adapter / load_adapter: bit-exact round trips, the written format, refusals, atomic writes."""
import json

import pytest
import torch
from safetensors.torch import load_file

import rowsft
from rowsft.layers import adapter_checks, adapters, tuner
from rowsft.selection.choice import LayerChoice, Selection

VOCAB = 128
SELECTIONS = {
    "llama": {"model.layers.0.self_attn.q_proj": ("row", [0, 7, 33]),
              "model.layers.0.self_attn.o_proj": ("column", [1, 2, 60]),
              "model.layers.1.mlp.down_proj": ("element", [4, 700, 8000])},
    "gpt2": {"transformer.h.0.attn.c_attn": ("row", [3, 100, 191]),
             "transformer.h.1.mlp.c_proj": ("column", [0, 255]),
             "transformer.h.1.mlp.c_fc": ("element", [9, 16000])},
    "bert": {"bert.encoder.layer.0.attention.self.query": ("row", [5, 6]),
             "bert.encoder.layer.1.output.dense": ("column", [100])},
}


def selection_for(model, arch):
    layers = {}
    for name, (unit, idx) in SELECTIONS[arch].items():
        w = model.get_submodule(name).weight
        shape = tuple(w.shape[::-1]) if arch == "gpt2" else tuple(w.shape)
        layers[name] = LayerChoice(unit, torch.tensor(idx), shape)
    return Selection(layers, meta={"metric": "taylor", "budget": 3})


def trained_model(arch, **apply_kwargs):
    model = rowsft.tiny_model(arch, vocab_size=VOCAB)
    tuner.apply(model, selection_for(model, arch), **apply_kwargs)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def inputs():
    return {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("arch, kwargs", [("llama", {}), ("gpt2", {"train_bias": True}),
                                          ("bert", {"train_heads": True})])
def test_save_then_load_into_fresh_model_is_bit_exact(tmp_path, arch, kwargs):
    model = trained_model(arch, **kwargs)
    with torch.no_grad():
        expected = model(**inputs()).logits
    adapters.save_adapter(model, tmp_path / "adapter")
    fresh = rowsft.tiny_model(arch, vocab_size=VOCAB)
    with torch.no_grad():
        assert not torch.equal(fresh(**inputs()).logits, expected)
    adapters.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs()).logits, expected)
    assert tuner.current_selection(fresh).to_dict() == tuner.current_selection(model).to_dict()
    assert tuner.trainable_parameters(fresh) == tuner.trainable_parameters(model)
    # loading into a model that already carries the same selection works too
    adapters.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh(**inputs()).logits, expected)


def test_written_format(tmp_path):
    model = trained_model("bert", train_heads=True)
    adapters.save_adapter(model, tmp_path / "a", base_model_name="my/bert")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROWSFT" and config["format_version"] == 1
    assert config["base_model_name_or_path"] == "my/bert"
    assert config["heads"] == ["classifier"]
    assert config["selection_meta"] == {"metric": "taylor", "budget": 3}
    q = config["layers"]["bert.encoder.layer.0.attention.self.query"]
    assert q == {"unit": "row", "shape": [64, 64], "k": 2, "index_dtype": "int64", "delta_dtype": "float32", "bias": False}
    assert config["model_modules"]["bert.encoder.layer.0.intermediate.dense"] == [128, 64]
    assert config["model_modules"]["classifier"] == [2, 64]
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert set(tensors) == {
        "bert.encoder.layer.0.attention.self.query.indices", "bert.encoder.layer.0.attention.self.query.delta",
        "bert.encoder.layer.1.output.dense.indices", "bert.encoder.layer.1.output.dense.delta",
        "heads.classifier.weight", "heads.classifier.bias"}
    assert tensors["bert.encoder.layer.1.output.dense.delta"].shape == (64, 1)
    assert torch.equal(tensors["heads.classifier.weight"], model.classifier.weight.detach())
    # element indices are stored as int32
    adapters.save_adapter(trained_model("llama"), tmp_path / "b")
    element = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))["model.layers.1.mlp.down_proj.indices"]
    assert element.dtype == torch.int32 and element.tolist() == [4, 700, 8000]


def test_adapter_for_another_model_is_refused(tmp_path):
    adapters.save_adapter(trained_model("llama"), tmp_path / "a")
    other = rowsft.tiny_model("llama", vocab_size=VOCAB, hidden=32)
    with pytest.raises(ValueError, match=r"adapter was saved for a model .*whose model\.layers\.0\.self_attn\.q_proj "
                                         r"is \(64, 64\), this one has \(32, 32\)"):
        adapters.load_adapter(other, tmp_path / "a")
    assert not tuner.sparse_layers(other)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj.* do not exist in this one"):
        adapters.load_adapter(rowsft.tiny_model("llama", vocab_size=VOCAB, layers=1), tmp_path / "a")
    with pytest.raises(ValueError, match=r"do not exist in this one.*this model is tiny-gpt2"):
        adapters.load_adapter(rowsft.tiny_model("gpt2", vocab_size=VOCAB), tmp_path / "a")


def test_model_with_a_different_selection_is_refused(tmp_path):
    adapters.save_adapter(trained_model("llama"), tmp_path / "a")
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    tuner.apply(model, Selection({"model.layers.1.mlp.up_proj": LayerChoice("row", [0], (128, 64))}))
    with pytest.raises(ValueError, match="unload"):
        adapters.load_adapter(model, tmp_path / "a")


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        adapters.load_adapter(rowsft.tiny_model("llama", vocab_size=VOCAB), tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        adapters.load_adapter(rowsft.tiny_model("llama", vocab_size=VOCAB), tmp_path / "half")
    with pytest.raises(ValueError, match="no rowsft sparse layers"):
        adapters.save_adapter(rowsft.tiny_model("llama", vocab_size=VOCAB), tmp_path / "x")


def test_failed_save_keeps_the_earlier_adapter(tmp_path, monkeypatch):
    model = trained_model("llama")
    adapters.save_adapter(model, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        next(iter(tuner.sparse_layers(model).values())).update.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        adapters.save_adapter(model, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no half-written folder is left"


def test_merged_model_cannot_be_saved_until_unmerged(tmp_path):
    model = trained_model("llama")
    tuner.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        adapters.save_adapter(model, tmp_path / "a")
    tuner.unmerge(model)
    adapters.save_adapter(model, tmp_path / "a")
    assert adapter_checks.read_adapter_config(tmp_path / "a")["peft_type"] == "ROWSFT"
