"""PEFT conventions: print_trainable_parameters format, save_pretrained / from_pretrained folders,
merge_and_unload, and the RowSFTModel wrapper; references are PEFT's own output and plain tensor algebra."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import rowsft
from rowsft.data.models import tiny_model
from rowsft.integrations import RowSFTConfig, RowSFTModel, get_rowsft_model
from rowsft.layers import SparseLinear
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape, weight_out_in

VOCAB = 128
PEFT_LINE = re.compile(r"^trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})$")


def selection_for(model, k=3, seed=0) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model).items():
        d_out, d_in = linear_shape(module)
        layers[name] = LayerChoice("row", torch.sort(torch.randperm(d_out, generator=gen)[:k]).values, (d_out, d_in))
    return Selection(layers, {"metric": "random"})


def fill_deltas(model, seed=1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rowsft.layers.tuner.sparse_layers(model).values():
            layer.delta.copy_(0.05 * torch.randn(layer.delta.shape, generator=gen, dtype=layer.delta.dtype))


def probe() -> dict:
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**probe()).logits


@pytest.fixture()
def wrapped():
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    selection = selection_for(model)
    wrapped = get_rowsft_model(model, RowSFTConfig(selection=selection))
    fill_deltas(model)
    return wrapped, selection


def _numbers(line: str) -> tuple[int, int, float]:
    match = PEFT_LINE.match(line.strip())
    assert match, f"not PEFT's format: {line!r}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", "")), float(match[3])


def test_print_trainable_parameters_matches_peft_format(wrapped, capsys):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model("llama", vocab_size=VOCAB, seed=0),
                               peft.LoraConfig(r=2, target_modules="all-linear"))
    capsys.readouterr()
    lora.print_trainable_parameters()
    _numbers(capsys.readouterr().out.strip().splitlines()[-1])          # PEFT's own line fits the pattern

    model, selection = wrapped
    model.print_trainable_parameters()
    trainable, total, percent = _numbers(capsys.readouterr().out.strip())
    base_params = sum(p.numel() for p in tiny_model("llama", vocab_size=VOCAB, seed=0).parameters())
    expected = sum(choice.k * choice.shape[1] for choice in selection.layers.values())
    assert trainable == expected == selection.trainable_parameters
    assert total == base_params + expected                              # PEFT counts adapters in "all params"
    assert percent == pytest.approx(round(100 * expected / total, 4))
    assert model.get_nb_trainable_parameters() == (trainable, total)


def test_save_pretrained_folder_layout(wrapped, tmp_path):
    model, selection = wrapped
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert isinstance(config["format_version"], int) and config["peft_type"] == "ROWSFT"
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = next(iter(selection))
    assert torch.equal(tensors[f"{name}.indices"], selection[name])
    assert torch.equal(tensors[f"{name}.delta"], rowsft.layers.tuner.sparse_layers(model.base_model)[name].delta.detach())
    model.save_pretrained(tmp_path / "skipped", is_main_process=False)   # non-main ranks write nothing
    assert not (tmp_path / "skipped").exists()


def test_from_pretrained_reproduces_outputs(wrapped, tmp_path):
    model, _ = wrapped
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    fresh = tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    assert not torch.allclose(logits(fresh), expected), "the deltas change nothing: the test cannot fail"
    loaded = RowSFTModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = RowSFTModel.from_pretrained(tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64),
                                            tmp_path / "adapter", is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {f"base_model.{n}.delta" for n in rowsft.layers.tuner.sparse_layers(trainable.base_model)}


def test_merge_and_unload_equals_dense_reference(wrapped):
    model, selection = wrapped
    deltas = {n: layer.delta.detach().clone() for n, layer in rowsft.layers.tuner.sparse_layers(model.base_model).items()}
    # independent reference: add the rows into a fresh model's dense weights by hand
    reference = tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = weight_out_in(reference.get_submodule(name))      # (d_out, d_in)
            weight[selection[name]] += delta
    expected = logits(reference)
    assert torch.allclose(logits(model), expected, atol=1e-10)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, SparseLinear) for m in plain.modules())
    assert all(type(m) is nn.Linear for m in find_targets(plain).values())
    assert torch.allclose(logits(plain), expected, atol=1e-10)


def test_disable_adapter_runs_the_base_model(wrapped):
    model, _ = wrapped
    base = logits(tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64))
    adapted = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted)


def test_wrapper_delegates_and_refuses_plain_models():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match="rowsft.apply"):
        RowSFTModel(model)
    with pytest.raises(ValueError, match="calibration"):
        get_rowsft_model(model, RowSFTConfig(metric="taylor"))
    wrapped = get_rowsft_model(model, RowSFTConfig(selection=selection_for(model)))
    assert wrapped.config is model.config and wrapped.get_base_model() is model
    assert wrapped.selection.trainable_parameters == selection_for(model).trainable_parameters
    with pytest.raises(TypeError, match="already a RowSFTModel"):
        get_rowsft_model(wrapped)


def test_peft_refuses_a_rowsft_folder(wrapped, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = wrapped
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises((KeyError, ValueError)):
        peft.PeftModel.from_pretrained(tiny_model("llama", vocab_size=VOCAB, seed=0), str(tmp_path / "adapter"))
