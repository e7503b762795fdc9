"""rowsft as a peft method: get_peft_model(model, RowSFTConfig(...)) on tiny Llama, GPT-2 (Conv1D) and BERT.

References are independent of the tuner: `rowsft.apply` (the short verb, its own layers), dense weights edited
by hand, peft's own files, and a fresh Trainer run without interruption."""
from __future__ import annotations

import json
import os
import re
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402

import rowsft  # noqa: E402
from rowsft.data.models import tiny_model  # noqa: E402
from rowsft.integrations import RowSFTConfig, get_rowsft_model  # noqa: E402
from rowsft.integrations.peft_layer import RowSFTLayer  # noqa: E402
from rowsft.integrations.peft_tuner import PEFT_PIN, peft_api_problems  # noqa: E402
from rowsft.selection.choice import LayerChoice, Selection  # noqa: E402
from rowsft.targets import find_targets, linear_shape, weight_out_in  # noqa: E402

VOCAB, SEQ = 128, 10
ARCHS = ("llama", "gpt2", "bert")
UNITS = ("row", "column", "element")


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def random_selection(model, unit="row", k=3, seed=0, n_elements=40) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model).items():
        d_out, d_in = linear_shape(module)
        limit, count = {"row": (d_out, k), "column": (d_in, k), "element": (d_out * d_in, n_elements)}[unit]
        layers[name] = LayerChoice(unit, torch.sort(torch.randperm(limit, generator=gen)[:count]).values, (d_out, d_in))
    return Selection(layers, {"metric": "random", "budget": k})


def batch(arch, seed=3) -> dict:
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([0, 1]) if arch == "bert" else ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def logits(model, arch="llama") -> torch.Tensor:
    inputs = {k: v for k, v in batch(arch).items() if k != "labels"}
    with torch.no_grad():
        return model.eval()(**inputs).logits


def fill(model, seed=1, scale=0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def deltas(model, adapter="default") -> dict[str, torch.Tensor]:
    base = model.get_base_model()
    return {name: m.rowsft_delta[adapter].detach().clone() for name, m in base.named_modules()
            if isinstance(m, RowSFTLayer) and adapter in m.rowsft_delta}


def dense_reference(arch, updates: dict[str, tuple[str, torch.Tensor, torch.Tensor]], dtype=torch.float32):
    """A fresh tiny model with each update added into its dense weight by hand."""
    model = tiny_model(arch, vocab_size=VOCAB, seed=0, dtype=dtype)
    with torch.no_grad():
        for name, (unit, idx, delta) in updates.items():
            w = weight_out_in(model.get_submodule(name))                     # (d_out, d_in), a view
            if unit == "row":
                w[idx] += delta
            elif unit == "column":
                w[:, idx] += delta
            else:
                w[idx // w.shape[1], idx % w.shape[1]] += delta
    return model


def updates_of(model, adapter="default"):
    base = model.get_base_model()
    return {n: (m.rowsft_unit[adapter], m.rowsft_indices[adapter].long(), m.rowsft_delta[adapter].detach())
            for n, m in base.named_modules() if isinstance(m, RowSFTLayer) and adapter in m.rowsft_delta}


def unchanged(model) -> bool:
    return not any(isinstance(m, (BaseTunerLayer, rowsft.layers.SparseLinear)) for m in model.modules()) \
        and not hasattr(model, "peft_config") and all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- same modules, same bits as rowsft.apply
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", UNITS)
def test_peft_equals_rowsft_apply_bit_for_bit(arch, unit):
    """The peft layer runs each layer's update on its own: it equals rowsft.apply without grouped updates bit for bit
    (grouped ones differ by rounding only: tests/test_grouped.py)."""
    heads = {"train_heads": ["classifier"]} if arch == "bert" else {}
    a, b = tiny_model(arch, vocab_size=VOCAB, seed=0), tiny_model(arch, vocab_size=VOCAB, seed=0)
    selection = random_selection(a, unit)
    config = RowSFTConfig.from_selection(selection, modules_to_save=["classifier"] if heads else None)
    peft_model = get_peft_model(a, config)
    rowsft.apply(b, selection, group_updates=False, **heads)
    assert torch.equal(logits(peft_model, arch), logits(b, arch))
    assert torch.equal(logits(peft_model, arch), logits(tiny_model(arch, vocab_size=VOCAB, seed=0), arch))  # step 0
    params_a = [p for p in peft_model.parameters() if p.requires_grad]
    params_b = [p for p in b.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params_a) == sum(p.numel() for p in params_b) > 0
    opt_a, opt_b = torch.optim.AdamW(params_a, lr=1e-2), torch.optim.AdamW(params_b, lr=1e-2)
    peft_model.train(), b.train()
    for step in range(3):
        for model, opt in ((peft_model, opt_a), (b, opt_b)):
            torch.manual_seed(step)                                    # same dropout masks
            model(**batch(arch, seed=step)).loss.backward()
            opt.step()
            opt.zero_grad()
    layers = rowsft.sparse_layers(b)
    trained = deltas(peft_model)
    assert set(trained) == set(layers)
    for name, layer in layers.items():
        assert torch.equal(trained[name], layer.update.detach()), name
        assert trained[name].abs().sum() > 0
    assert torch.equal(logits(peft_model, arch), logits(b, arch))


def test_data_free_config_picks_rowsft_magnitude_rows():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    expected = rowsft.select(rowsft.score(model, None, metric="magnitude", unit="row"), 4)
    peft_model = get_peft_model(model, RowSFTConfig(k=4))
    config = peft_model.peft_config["default"]
    assert set(config.indices) == set(expected)
    for name in expected:
        assert config.indices[name] == expected[name].tolist()
        assert peft_model.get_base_model().get_submodule(name).rowsft_indices["default"].tolist() == config.indices[name]


def test_get_rowsft_model_scores_on_calibration_then_builds_a_peft_model():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    batches = [batch("llama", seed=s) for s in range(2)]
    reference = rowsft.select(rowsft.score(tiny_model("llama", vocab_size=VOCAB, seed=0), batches, metric="taylor",
                                           unit="column", num_batches=2), 3)
    peft_model = get_rowsft_model(model, RowSFTConfig(metric="taylor", unit="column", k=3), calibration=batches,
                                  num_batches=2)
    assert isinstance(peft_model, PeftModel)
    placed = updates_of(peft_model)
    assert set(placed) == set(reference)
    assert all(placed[n][0] == "column" and placed[n][1].tolist() == reference[n].tolist() for n in reference)
    assert peft_model.peft_config["default"].metric == "taylor"


@pytest.mark.parametrize("arch", ARCHS)
def test_group_selection_places_rows_and_columns(arch):
    model = tiny_model(arch, vocab_size=VOCAB, seed=0)
    selection = rowsft.select(rowsft.score(model, None, metric="magnitude", unit="group"), 2)
    config = RowSFTConfig.from_selection(selection)
    assert config.unit == "group" and set(config.unit_pattern.values()) == {"row", "column"}
    placed = updates_of(get_peft_model(model, config))
    assert {n: (u, i.tolist()) for n, (u, i, _) in placed.items()} == \
        {n: (c.unit, c.indices.tolist()) for n, c in selection.layers.items()}


# ---------------------------------------------------------------- save / load, merge
@pytest.mark.parametrize("arch, unit", [("llama", "row"), ("gpt2", "column"), ("gpt2", "element"), ("bert", "group")])
def test_save_pretrained_then_from_pretrained_gives_equal_outputs(tmp_path, arch, unit):
    model = tiny_model(arch, vocab_size=VOCAB, seed=0)
    if unit == "group":
        selection = rowsft.select(rowsft.score(model, None, metric="magnitude", unit="group"), 2)
    else:
        gen = torch.Generator().manual_seed(5)        # different k per layer: reload needs k_pattern
        selection = random_selection(model, unit, k=int(torch.randint(2, 5, (1,), generator=gen)))
        name = next(iter(selection))
        choice = selection.layers[name]
        selection.layers[name] = LayerChoice(unit, choice.indices[:1], choice.shape)
    peft_model = get_peft_model(model, RowSFTConfig.from_selection(selection))
    fill(peft_model)
    expected = logits(peft_model, arch)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROWSFT" and saved["indices"] and (saved["k_pattern"] or unit == "group")
    fresh = tiny_model(arch, vocab_size=VOCAB, seed=0)
    assert not torch.equal(logits(fresh, arch), expected), "the deltas change nothing: the test cannot fail"
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(logits(loaded, arch), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_merge_and_unload_equals_hand_merged_weights():
    model = tiny_model("gpt2", vocab_size=VOCAB, seed=0, dtype=torch.float64)
    selection = random_selection(model, "row")
    peft_model = get_peft_model(model, RowSFTConfig.from_selection(selection))
    fill(peft_model)
    expected = logits(dense_reference("gpt2", updates_of(peft_model), torch.float64), "gpt2")
    assert torch.allclose(logits(peft_model, "gpt2"), expected, atol=1e-10)
    plain = peft_model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.allclose(logits(plain, "gpt2"), expected, atol=1e-10)


# ---------------------------------------------------------------- several adapters
def test_two_adapters_switched_disabled_and_deleted():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    base = logits(tiny_model("llama", vocab_size=VOCAB, seed=0))
    peft_model = get_peft_model(model, RowSFTConfig.from_selection(random_selection(model, "row", seed=1)), "A")
    peft_model.add_adapter("B", RowSFTConfig.from_selection(random_selection(model, "column", seed=2)))
    peft_model.base_model.set_adapter(["A", "B"])
    fill(peft_model, seed=7)
    ups_a, ups_b = updates_of(peft_model, "A"), updates_of(peft_model, "B")
    only_a, only_b = logits(dense_reference("llama", ups_a)), logits(dense_reference("llama", ups_b))
    both = dense_reference("llama", ups_a)
    with torch.no_grad():
        for name, (_, idx, delta) in ups_b.items():
            weight_out_in(both.get_submodule(name))[:, idx] += delta
    tol = dict(atol=1e-5, rtol=0)
    assert torch.allclose(logits(peft_model), logits(both), **tol)             # both active: both added
    peft_model.set_adapter("A")
    assert torch.allclose(logits(peft_model), only_a, **tol)
    assert {n.split(".")[-1] for n, p in peft_model.named_parameters() if p.requires_grad} == {"A"}
    peft_model.set_adapter("B")
    assert torch.allclose(logits(peft_model), only_b, **tol)
    assert {n.split(".")[-1] for n, p in peft_model.named_parameters() if p.requires_grad} == {"B"}
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model), base)
    assert torch.allclose(logits(peft_model), only_b, **tol)
    peft_model.delete_adapter("B")
    assert peft_model.active_adapters == ["A"] and list(peft_model.peft_config) == ["A"]
    assert not any(".B" in key for key in peft_model.state_dict())
    assert torch.allclose(logits(peft_model), only_a, **tol)


# ---------------------------------------------------------------- Trainer and TRL
def trainer_dataset(n=8) -> list[dict]:
    ids = torch.randint(3, VOCAB, (n, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "attention_mask": torch.ones(12, dtype=torch.long), "labels": row.clone()} for row in ids]


def trainer_args(out, **kw):
    from transformers import TrainingArguments
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, use_cpu=True,
                report_to=[], logging_steps=1, save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0,
                dataloader_num_workers=0, weight_decay=0.0)
    base.update(kw)
    return TrainingArguments(**base)


def test_trainer_checkpoints_hold_the_adapter_and_resume_bit_exactly(tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer

    def fresh():
        return get_peft_model(tiny_model("llama", vocab_size=VOCAB, seed=0), RowSFTConfig(k=3, metric="random"))

    straight = fresh()
    Trainer(model=straight, args=trainer_args(tmp_path / "a"), train_dataset=trainer_dataset()).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    assert all(re.search(r"\.rowsft_(delta|indices)$", k) for k in load_file(str(checkpoint / "adapter_model.safetensors")))
    resumed = fresh()
    Trainer(model=resumed, args=trainer_args(tmp_path / "b"), train_dataset=trainer_dataset()).train(
        resume_from_checkpoint=str(checkpoint))
    expected, got = deltas(straight), deltas(resumed)
    assert set(expected) == set(got) and all(expected[n].abs().sum() > 0 for n in expected)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_trl_sft_trainer_takes_a_rowsft_peft_config(tmp_path, byte_tokenizer):
    trl = pytest.importorskip("trl", reason="trl is not installed (pip install --no-deps trl)")
    from datasets import Dataset
    byte_tokenizer.pad_token = byte_tokenizer.eos_token
    model = tiny_model("llama", vocab_size=len(byte_tokenizer), seed=0)
    data = Dataset.from_dict({"text": ["the cat sat on the mat", "rows are sparse", "a dog ran", "hi peft"] * 2})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                         use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, max_length=32,
                         dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=byte_tokenizer,
                             peft_config=RowSFTConfig(k=2))
    assert isinstance(trainer.model, PeftModel)
    before = deltas(trainer.model)
    trainer.train()
    after = deltas(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".rowsft_delta.default") for n in trainable)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(math_finite(x["loss"]) for x in trainer.state.log_history if "loss" in x)


def math_finite(x) -> bool:
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------- refusals, nothing changed
def test_bad_configs_are_refused_before_the_model_changes():
    with pytest.raises(ValueError, match="unit must be one of"):
        RowSFTConfig(unit="neuron")
    with pytest.raises(ValueError, match="k must be a whole number"):
        RowSFTConfig(k=0)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    with pytest.raises(ValueError, match=r"k=1000 rows but the layer of shape \(64, 64\)"):
        get_peft_model(model, RowSFTConfig(k=1000, target_modules=["q_proj"]))
    assert unchanged(model)
    with pytest.raises(ValueError, match="k_pattern keys \\['nope_proj'\\] name no targeted module"):
        get_peft_model(model, RowSFTConfig(k=2, k_pattern={"nope_proj": 3}))
    assert unchanged(model)
    with pytest.raises(ValueError, match="needs calibration batches"):
        get_peft_model(model, RowSFTConfig(metric="taylor"))
    assert unchanged(model)
    with pytest.raises(ValueError, match="needs calibration batches"):
        get_rowsft_model(model, RowSFTConfig(metric="taylor"))
    assert unchanged(model)
    selection = random_selection(model, "row")
    name = next(iter(selection))
    selection.layers[name] = LayerChoice("row", torch.tensor([0, 64]), (64, 64))
    with pytest.raises(IndexError, match="must lie in"):
        get_peft_model(model, RowSFTConfig(indices={n: c.indices.tolist() for n, c in selection.layers.items()},
                                           target_modules=list(selection), k=3, k_pattern={name: 2}))
    assert unchanged(model)


def test_a_bad_second_adapter_leaves_the_first_alone():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    peft_model = get_peft_model(model, RowSFTConfig(k=2))
    fill(peft_model)
    expected, state = logits(peft_model), {k: v.clone() for k, v in peft_model.state_dict().items()}
    with pytest.raises(ValueError, match="k=999"):
        peft_model.add_adapter("other", RowSFTConfig(k=999))
    assert list(peft_model.peft_config) == ["default"]
    assert peft_model.state_dict().keys() == state.keys() and torch.equal(logits(peft_model), expected)


def test_peft_refuses_a_rowsft_native_folder_with_the_fix(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    rowsft.apply(model, random_selection(model))
    rowsft.save_adapter(model, tmp_path / "native")
    with pytest.raises(ValueError, match="rowsft.load_adapter"):
        PeftModel.from_pretrained(tiny_model("llama", vocab_size=VOCAB, seed=0), str(tmp_path / "native"))
    get_peft_model(tiny_model("llama", vocab_size=VOCAB, seed=0), RowSFTConfig(k=2)).save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        rowsft.load_adapter(tiny_model("llama", vocab_size=VOCAB, seed=0), tmp_path / "peft")


# ---------------------------------------------------------------- registration and the peft pin
def test_registered_under_a_plain_string_key_without_patching_peft_type():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ROWSFT"] is RowSFTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["ROWSFT"].__name__ == "RowSFTTuner"
    assert PEFT_TYPE_TO_PREFIX_MAPPING["ROWSFT"] == "rowsft_"
    assert "ROWSFT" not in PeftType.__members__


def test_installed_peft_has_the_api_rowsft_uses():
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    pinned = next(r for r in project["optional-dependencies"]["peft"] if r.startswith("peft"))
    assert pinned == PEFT_PIN, f"pyproject pins {pinned!r}, rowsft.integrations.peft_tuner.PEFT_PIN says {PEFT_PIN!r}"
    problems = peft_api_problems()
    assert problems == [], "\n".join(problems)
    assert Version(peft.__version__) in SpecifierSet(pinned.removeprefix("peft")), \
        f"peft {peft.__version__} is outside {pinned}, the range whose API RowSFT was written against; the API " \
        f"check above passed, so widen the pin after running these tests"
