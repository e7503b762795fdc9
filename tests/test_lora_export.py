"""save_as_lora: rowsft updates written as a stock peft LoRA adapter that plain peft loads, in a process that
never imports rowsft, with the same logits; refusals leave folders as they were."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402

import rowsft  # noqa: E402
from rowsft.data.models import tiny_model  # noqa: E402
from rowsft.integrations.lora_export import Update, lora_factors  # noqa: E402
from rowsft.selection.choice import LayerChoice, Selection  # noqa: E402
from rowsft.targets import find_targets, linear_shape  # noqa: E402

VOCAB = 128


@pytest.fixture(autouse=True)
def _quiet():
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def selection(model, unit, k=3, seed=0) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (name, module) in enumerate(find_targets(model).items()):
        d_out, d_in = linear_shape(module)
        limit = {"row": d_out, "column": d_in, "element": d_out * d_in}[unit]
        count = k + (i % 2)                                 # two different k: the export needs rank_pattern
        layers[name] = LayerChoice(unit, torch.sort(torch.randperm(limit, generator=gen)[:count]).values, (d_out, d_in))
    return Selection(layers, {"metric": "random"})


def fill(model, seed=1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def ids(seed=3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        x = ids()
        return model.eval()(input_ids=x, attention_mask=torch.ones_like(x)).logits


@pytest.mark.parametrize("unit", ["row", "column"])
def test_lora_factors_multiply_to_the_dense_update(unit):
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, index = 6, 5, torch.tensor([1, 4])
    delta = torch.randn((2, d_in) if unit == "row" else (d_out, 2), generator=gen, dtype=torch.float64)
    dense = torch.zeros(d_out, d_in, dtype=torch.float64)
    if unit == "row":
        dense[index] = delta
    else:
        dense[:, index] = delta
    a, b = lora_factors(Update(unit, delta, index, (d_out, d_in), conv1d=False))
    assert a.shape == (2, d_in) and b.shape == (d_out, 2)
    assert torch.equal(b @ a, dense)


LOADER = textwrap.dedent('''
    import json, sys
    import torch, transformers
    from peft import LoraConfig, PeftModel
    torch.set_num_threads(1)
    results = {}
    for case in json.loads(sys.argv[1]):
        config = transformers.AutoConfig.from_pretrained(case["base"])
        base = getattr(transformers, config.architectures[0]).from_pretrained(case["base"]).float()
        model = PeftModel.from_pretrained(base, case["lora"]).eval()
        lora = model.peft_config["default"]
        assert isinstance(lora, LoraConfig) and lora.peft_type == "LORA", lora
        ids = torch.load(case["ids"])
        with torch.no_grad():
            torch.save(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, case["out"])
    leaked = sorted(m for m in sys.modules if m == "rowsft" or m.startswith("rowsft."))
    assert not leaked, leaked
    print("loaded without rowsft")
''')


def test_plain_peft_in_a_fresh_process_reproduces_the_logits(tmp_path):
    cases, expected = [], {}

    def case(label, arch, build):
        base = tiny_model(arch, vocab_size=VOCAB, seed=0)
        base.save_pretrained(tmp_path / label / "base")
        model = build(tiny_model(arch, vocab_size=VOCAB, seed=0))
        fill(model)
        expected[label] = logits(model)
        assert not torch.allclose(expected[label], logits(base), atol=1e-3), "no update: the test cannot fail"
        rowsft.save_as_lora(model, tmp_path / label / "lora")
        torch.save(ids(), tmp_path / label / "ids.pt")
        cases.append({"base": str(tmp_path / label / "base"), "lora": str(tmp_path / label / "lora"),
                      "ids": str(tmp_path / label / "ids.pt"), "out": str(tmp_path / label / "logits.pt")})
        return model

    case("llama-rows-apply", "llama", lambda m: rowsft.apply(m, selection(m, "row")))
    case("gpt2-columns-peft", "gpt2", lambda m: get_peft_model(m, rowsft.RowSFTConfig.from_selection(selection(m, "column"))))
    case("bert-groups-peft", "bert", lambda m: get_peft_model(m, rowsft.RowSFTConfig.from_selection(
        rowsft.select(rowsft.score(m, None, metric="magnitude", unit="group"), 2), modules_to_save=["classifier"])))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(cases)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loaded without rowsft" in done.stdout
    for label, want in expected.items():
        got = torch.load(tmp_path / label / "logits.pt")
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (label, (got - want).abs().max())
    gpt2 = json.loads((tmp_path / "gpt2-columns-peft" / "lora" / "adapter_config.json").read_text())
    assert gpt2["fan_in_fan_out"] is True and gpt2["lora_alpha"] == gpt2["r"]
    assert all(gpt2["alpha_pattern"][n] == k for n, k in gpt2["rank_pattern"].items()) and gpt2["rank_pattern"]
    bert = json.loads((tmp_path / "bert-groups-peft" / "lora" / "adapter_config.json").read_text())
    assert bert["modules_to_save"] == ["classifier"] and bert["fan_in_fan_out"] is False


def test_element_updates_are_refused_with_the_reason(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    rowsft.apply(model, selection(model, "element"))
    with pytest.raises(ValueError, match="not low-rank"):
        rowsft.save_as_lora(model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    peft_model = get_peft_model(tiny_model("gpt2", vocab_size=VOCAB, seed=0),
                                rowsft.RowSFTConfig(unit="element", k=20))
    with pytest.raises(ValueError, match="not low-rank"):
        rowsft.save_as_lora(peft_model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_bias_and_merged_updates_are_refused(tmp_path):
    model = tiny_model("gpt2", vocab_size=VOCAB, seed=0)
    rowsft.apply(model, selection(model, "row"), train_bias=True)
    with pytest.raises(ValueError, match="train_bias"):
        rowsft.save_as_lora(model, tmp_path / "lora")
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    peft_model = get_peft_model(model, rowsft.RowSFTConfig(k=2))
    peft_model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        rowsft.save_as_lora(peft_model, tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


def test_a_foreign_folder_is_refused_and_other_files_are_never_removed(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    rowsft.apply(model, selection(model, "row"))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty.*overwrite=True"):
        rowsft.save_as_lora(model, folder)
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    rowsft.save_adapter(model, tmp_path / "native")                          # a rowsft adapter is foreign too
    before = {p: (tmp_path / "native" / p).read_bytes() for p in os.listdir(tmp_path / "native")}
    with pytest.raises(ValueError, match="no peft LoRA adapter"):
        rowsft.save_as_lora(model, tmp_path / "native")
    assert {p: (tmp_path / "native" / p).read_bytes() for p in os.listdir(tmp_path / "native")} == before
    rowsft.save_as_lora(model, folder, overwrite=True)                       # beside the other files
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "keep me"
    fill(model)
    rowsft.save_as_lora(model, folder)                                       # a LoRA folder: replaced in place
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    with pytest.raises(ValueError, match="is a file"):
        rowsft.save_as_lora(model, folder / "notes.txt")


def test_export_picks_the_named_adapter(tmp_path):
    from safetensors.torch import load_file
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    peft_model = get_peft_model(model, rowsft.RowSFTConfig.from_selection(selection(model, "row", k=2)), "A")
    peft_model.add_adapter("B", rowsft.RowSFTConfig.from_selection(selection(model, "column", k=4, seed=1)))
    peft_model.base_model.set_adapter(["A", "B"])
    with pytest.raises(ValueError, match="adapter_name="):
        rowsft.save_as_lora(peft_model, tmp_path / "x")
    rowsft.save_as_lora(peft_model, tmp_path / "b", adapter_name="B")
    tensors = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    a_shapes = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert a_shapes == {4, 5}                                                # B's k, not A's
