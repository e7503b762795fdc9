"""The lean training loss (LM head only at labelled positions) against the full-logits loss in float64."""
from __future__ import annotations

import pytest
import torch
from _reference import dense_loss

import rowsft
from rowsft.lean_loss import accepts_logits_to_keep, kept_positions, lean_forward, training_loss
from rowsft.memory import activation_bytes
from rowsft.memory.prediction import predict

VOCAB = 300


def answer_batch(seed: int = 0, b: int = 3, t: int = 12) -> dict:
    """Prompt + short answer rows with unequal label counts, right padding on one row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    labels = torch.full_like(ids, -100)
    labels[0, 6:8] = ids[0, 6:8]          # two answer tokens
    labels[1, t - 1] = ids[1, t - 1]      # the last position
    labels[2, 5] = ids[2, 5]              # one token before padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def all_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lean_loss_and_gradients_equal_the_full_logits_loss_in_float64(arch):
    model = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = answer_batch()
    assert accepts_logits_to_keep(model)

    reference = dense_loss(model, batch)
    reference.backward()
    expected = all_grads(model)
    model.zero_grad(set_to_none=True)

    output = lean_forward(model, batch)
    assert output.logits.shape == (3, 4, VOCAB)            # positions 5, 6, 7 (row 0, 2) and 10 (row 1)
    torch.testing.assert_close(output.loss, reference, rtol=1e-12, atol=0)
    output.loss.backward()
    got = all_grads(model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-13, msg=name)


def test_kept_positions_are_those_whose_next_token_is_labelled():
    batch = answer_batch()
    assert kept_positions(batch["labels"]).tolist() == [4, 5, 6, 10]
    assert kept_positions(torch.full((2, 5), -100)) is None


def test_classification_and_unlabelled_batches_take_the_models_own_loss():
    bert = rowsft.tiny_model("bert", vocab_size=VOCAB, num_labels=2)
    ids = torch.randint(3, VOCAB, (2, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1])}
    assert torch.equal(training_loss(bert, batch), bert(**batch).loss)

    llama = rowsft.tiny_model("llama", vocab_size=VOCAB)
    empty = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.full_like(ids, -100)}
    assert torch.isnan(training_loss(llama, empty))                 # as model(**batch).loss: train names it
    assert lean_forward(llama, empty).logits.shape == (2, 6, VOCAB)
    assert lean_forward(llama, answer_batch(), lean=False).logits.shape[1] == 12


def test_peft_wrapped_models_take_the_lean_path():
    from rowsft.baselines import lora
    model = lora(rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.float64), rank=2)
    batch = answer_batch(1)
    output = lean_forward(model, batch)
    assert output.logits.shape[1] == len(kept_positions(batch["labels"]))
    torch.testing.assert_close(output.loss, dense_loss(model, batch), rtol=1e-12, atol=0)


def test_lean_logits_shrink_the_saved_activations_as_predicted():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    for p in model.parameters():
        p.requires_grad_(True)
    batch = answer_batch()
    lean, lean_transient = activation_bytes(model, batch, lean_logits=True)
    full, full_transient = activation_bytes(model, batch, lean_logits=False)
    kept = len(kept_positions(batch["labels"]))
    # the head's fp32 log-probabilities (V·4 per position) are kept for 4 positions instead of 12
    assert full - lean >= 3 * (12 - kept) * VOCAB * 4
    assert lean_transient * 12 == full_transient * kept
    predicted_full = predict(model, "full", 3, 12).activations
    predicted_lean = predict(model, "full", 3, 12, logit_positions=kept).activations
    assert predicted_full - predicted_lean == pytest.approx(full - lean, rel=0.1)


def test_logit_positions_counts_what_reaches_the_head_and_budget_control_prices_it():
    from rowsft.lean_loss import logit_positions
    from rowsft.notebook import BudgetControl
    batch = answer_batch()
    assert logit_positions(batch) == 4
    assert logit_positions({"input_ids": batch["input_ids"], "labels": torch.tensor([0, 1, 0])}) is None

    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    scores = rowsft.score(model, metric="magnitude", unit="row")
    everywhere = BudgetControl(model, scores, rows=2, batch_size=3, seq_len=12)
    lean = BudgetControl(model, scores, rows=2, batch_size=3, seq_len=12, logit_positions=4)
    full_head, lean_head = everywhere.memory["row-sparse"], lean.memory["row-sparse"]
    assert full_head.transient * 4 == lean_head.transient * 12
    assert lean_head.total < full_head.total
