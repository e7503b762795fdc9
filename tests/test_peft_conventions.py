"""PEFT conventions, for both ways rowsft offers them: a real ``peft.PeftModel`` (``get_rowsft_model`` /
``get_peft_model(model, RowSFTConfig(...))``) and the ``RowSFTModel`` wrapper of a ``rowsft.apply`` model.
print_trainable_parameters format, save_pretrained / from_pretrained folders, merge_and_unload,
disable_adapter; references are PEFT's own output and plain tensor algebra."""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import rowsft
from rowsft.data.models import tiny_model
from rowsft.layers import SparseLinear
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape, weight_out_in

peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

from rowsft.integrations import RowSFTConfig, RowSFTModel, get_rowsft_model  # noqa: E402
from rowsft.integrations.peft_layer import RowSFTLayer  # noqa: E402

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
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def probe() -> dict:
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**probe()).logits


def fresh():
    return tiny_model("llama", vocab_size=VOCAB, seed=0, dtype=torch.float64)


def row_deltas(model) -> dict[str, torch.Tensor]:
    """``{module name: delta (k, d_in)}`` of either kind of model."""
    if isinstance(model, PeftModel):
        return {n: m.rowsft_delta["default"].detach().clone() for n, m in model.get_base_model().named_modules()
                if isinstance(m, RowSFTLayer)}
    return {n: layer.delta.detach().clone() for n, layer in rowsft.sparse_layers(model.base_model).items()}


@pytest.fixture(params=["peft", "apply", "apply-in-weight"])
def wrapped(request):
    torch.set_num_threads(1)
    model = fresh()
    selection = selection_for(model)
    if request.param == "peft":
        wrapped = get_rowsft_model(model, RowSFTConfig.from_selection(selection))
    else:      # rows trained the usual way, or inside the base weight (rowsft.layers.in_weight)
        wrapped = RowSFTModel(rowsft.apply(model, selection, train_in_weight=request.param == "apply-in-weight"))
    fill_deltas(wrapped)
    return wrapped, selection


def _numbers(line: str) -> tuple[int, int, float]:
    match = PEFT_LINE.match(line.strip())
    assert match, f"not PEFT's format: {line!r}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", "")), float(match[3])


def test_print_trainable_parameters_matches_peft_format(wrapped, capsys):
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
    from safetensors.torch import load_file
    model, selection = wrapped
    model.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    name = next(iter(selection))
    assert config["peft_type"] == "ROWSFT"
    if isinstance(model, PeftModel):                                    # peft's layout (and its README.md)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
        assert config["indices"][name] == selection[name].tolist() and config["unit"] == "row"
        assert config["peft_version"] == peft.__version__
        assert torch.equal(tensors[f"base_model.model.{name}.rowsft_indices"], selection[name])
        assert torch.equal(tensors[f"base_model.model.{name}.rowsft_delta"], row_deltas(model)[name])
        assert all(k.endswith((".rowsft_delta", ".rowsft_indices")) for k in tensors)
    else:                                                               # rowsft.save_adapter's layout
        assert files == ["adapter_config.json", "adapter_model.safetensors"]
        assert config["base_model_name_or_path"] == "tiny-llama"
        assert isinstance(config["format_version"], int)
        assert torch.equal(tensors[f"{name}.indices"], selection[name])
        assert torch.equal(tensors[f"{name}.delta"], row_deltas(model)[name])
    model.save_pretrained(tmp_path / "skipped", is_main_process=False)   # non-main ranks write nothing
    assert not (tmp_path / "skipped").exists() or not any((tmp_path / "skipped").iterdir())


def test_from_pretrained_reproduces_outputs(wrapped, tmp_path):
    model, _ = wrapped
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    assert not torch.allclose(logits(fresh()), expected), "the deltas change nothing: the test cannot fail"
    loader = PeftModel if isinstance(model, PeftModel) else RowSFTModel
    loaded = loader.from_pretrained(fresh(), str(tmp_path / "adapter"))
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = loader.from_pretrained(fresh(), str(tmp_path / "adapter"), is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names and all(n.endswith((".rowsft_delta.default", ".delta")) for n in names)
    assert len(names) == len(row_deltas(model))


def test_merge_and_unload_equals_dense_reference(wrapped):
    model, selection = wrapped
    deltas = row_deltas(model)
    reference = fresh()                          # independent reference: the rows added into dense weights by hand
    with torch.no_grad():
        for name, delta in deltas.items():
            weight_out_in(reference.get_submodule(name))[selection[name]] += delta      # (k, d_in) rows
    expected = logits(reference)
    assert torch.allclose(logits(model), expected, atol=1e-10)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (SparseLinear, RowSFTLayer)) for m in plain.modules())
    assert all(type(m) is nn.Linear for m in find_targets(plain).values())
    assert torch.allclose(logits(plain), expected, atol=1e-10)


def test_disable_adapter_runs_the_base_model(wrapped):
    model, _ = wrapped
    base = logits(fresh())
    adapted = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), base)
    assert torch.equal(logits(model), adapted)


def test_get_rowsft_model_returns_a_peft_model_and_refuses_what_it_cannot_do():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match="calibration"):
        get_rowsft_model(model, RowSFTConfig(metric="taylor"))
    wrapped = get_rowsft_model(model, RowSFTConfig.from_selection(selection_for(model)))
    assert isinstance(wrapped, PeftModel) and wrapped.get_base_model() is model and wrapped.config is model.config
    assert wrapped.get_nb_trainable_parameters()[0] == selection_for(model).trainable_parameters
    with pytest.raises(TypeError, match="already carries peft adapters"):
        get_rowsft_model(model)
    applied = rowsft.apply(tiny_model("llama", vocab_size=VOCAB, seed=0), selection_for(model))
    with pytest.raises(TypeError, match="rowsft.unload"):
        get_rowsft_model(applied)


def test_rowsft_model_wrapper_delegates_and_refuses_plain_models():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match="rowsft.apply"):
        RowSFTModel(model)
    wrapped = RowSFTModel(rowsft.apply(model, selection_for(model)))
    assert wrapped.config is model.config and wrapped.get_base_model() is model
    assert wrapped.selection.trainable_parameters == selection_for(model).trainable_parameters
