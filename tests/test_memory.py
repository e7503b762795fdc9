"""Memory accounting: exact parts on hand-computable models, the CPU profiler approach on known
allocations, analytic vs measured peak of a real step, and the fast prediction vs the breakdown."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import rowsft
from rowsft.memory import MemoryReport, SavedTensorCounter, breakdown, measure_peak, predict
from rowsft.memory.measure import cpu_peak, unique_storage_bytes
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape

VOCAB = 128
F32 = 4


class LinearRegression(nn.Module):
    """``loss = mean((W x + b - y)^2)``: every saved tensor is known by hand."""

    def __init__(self, d_in=8, d_out=3):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x, y):
        return {"loss": ((self.lin(x) - y) ** 2).mean()}


def regression_batch(b=5, d_in=8, d_out=3):
    return {"x": torch.randn(b, d_in), "y": torch.randn(b, d_out)}


def token_batch(arch="llama", b=4, t=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    labels = torch.randint(0, 2, (b,), generator=g) if arch == "bert" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def every_fourth(model, unit="row", targets="all-linear"):
    def choice(module):
        d_out, d_in = linear_shape(module)
        limit = {"row": d_out, "column": d_in, "element": d_out * d_in}[unit]
        return LayerChoice(unit, torch.arange(0, limit, 4), (d_out, d_in))
    return Selection({n: choice(m) for n, m in find_targets(model, targets).items()})


# ---------------------------------------------------------------- exact parts
def test_breakdown_parts_are_exact_on_a_single_linear_layer():
    model, batch = LinearRegression(), regression_batch()
    n_params = 8 * 3 + 3
    r = breakdown(model, batch)
    assert (r.weights, r.trainable, r.gradients, r.optimizer, r.indices) == (
        n_params * F32, n_params * F32, n_params * F32, 2 * n_params * F32, 0)
    # saved for backward: x (for W's gradient) and (W x + b - y) (for the square); W itself is a weight
    assert r.activations == (5 * 8 + 5 * 3) * F32
    assert r.total == r.weights + r.gradients + r.optimizer + r.activations + r.transient
    assert breakdown(model, batch, optimizer="sgd").optimizer == 0
    # only the bias trains: x is no longer needed for backward
    model.lin.weight.requires_grad_(False)
    r = breakdown(model, batch)
    assert (r.trainable, r.optimizer, r.activations) == (3 * F32, 2 * 3 * F32, 5 * 3 * F32)
    assert r.weights == n_params * F32
    assert model.training is True  # restored (nn.Module starts in train mode)


def test_tied_weights_count_once_and_indices_are_counted():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB).requires_grad_(False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    r = breakdown(model, token_batch(b=1, t=4))
    assert r.weights == sum(p.numel() for p in model.parameters()) * F32  # parameters() yields tied ones once
    assert r.weights < (sum(p.numel() for p in model.parameters()) + model.lm_head.weight.numel()) * F32
    assert r.activations == 0 and r.trainable == 0  # nothing trains: autograd saves nothing
    selection = every_fourth(model)
    rowsft.apply(model, selection)
    r = breakdown(model, token_batch(b=1, t=4))
    assert r.trainable == selection.trainable_parameters * F32 == r.gradients
    assert r.indices == sum(c.k for c in selection.layers.values()) * 8
    assert r.method == "rowsft-row"


def test_saved_tensor_counter_skips_weights_and_counts_storages_once():
    w = nn.Parameter(torch.randn(16, 16))
    x = torch.randn(4, 16, requires_grad=True)
    with SavedTensorCounter([w]) as counter:
        y = x @ w            # saves x and w (w excluded)
        z = (y * y).sum()    # saves y twice: one storage
    assert counter.bytes == (4 * 16 + 4 * 16) * F32
    del z


# ---------------------------------------------------------------- measured peaks
def test_cpu_profiler_sees_known_allocations():
    mib = 1 << 20

    def region():
        kept = torch.empty(mib, dtype=torch.uint8)
        scratch = torch.empty(4 * mib, dtype=torch.uint8)
        del scratch
        return kept

    out = cpu_peak(region)
    assert out["peak_delta"] == 5 * mib
    assert out["end_delta"] == mib and out["result"].numel() == mib


@pytest.mark.parametrize("arch,method", [("llama", "full"), ("llama", "row"), ("gpt2", "column")])
def test_measured_peak_of_a_step_is_within_15_percent_of_the_breakdown(arch, method):
    model = rowsft.tiny_model(arch, vocab_size=VOCAB)
    if method == "full":
        rowsft.baselines.full_finetune(model)
    else:
        rowsft.apply(model, every_fourth(model, method))
    batch = token_batch(arch, b=4, t=64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.eval()
    measured = measure_peak(model, batch)
    report = breakdown(model, batch)
    assert report.activations > report.weights  # a case where activations matter
    assert abs(measured["peak"] - report.total) <= 0.15 * report.total, (measured, str(report))
    assert measured["baseline"] >= report.weights + report.optimizer
    assert measured["source"].startswith("torch.profiler")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # weights restored
    assert not model.training and all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- prediction
CASES = [("llama", "full"), ("llama", "row"), ("llama", "column"), ("llama", "lora"), ("gpt2", "row"),
         ("gpt2", "element"), ("gpt2", "lora"), ("bert", "row"), ("bert", "full")]


@pytest.mark.parametrize("arch,method", CASES)
def test_predict_matches_breakdown_within_25_percent(arch, method):
    model = rowsft.tiny_model(arch, vocab_size=VOCAB)
    if method == "full":
        spec = "full"
        rowsft.baselines.full_finetune(model)
    elif method == "lora":
        spec = ("lora", 4)
        model = rowsft.baselines.lora(model, rank=4)
    else:
        spec = every_fourth(model, method)
        rowsft.apply(model, spec)
    b, t = 2, 48
    actual = breakdown(model, token_batch(arch, b, t))
    predicted = predict(model, spec, batch_size=b, seq_len=t)
    for part in ("weights", "trainable", "gradients", "optimizer", "indices"):
        assert getattr(predicted, part) == getattr(actual, part), part   # exact
    assert abs(predicted.activations - actual.activations) <= 0.25 * actual.activations
    assert abs(predicted.total - actual.total) <= 0.25 * actual.total


def test_predict_before_applying_prices_the_selection_exactly():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = every_fourth(model, "element")
    predicted = predict(model, selection, 2, 32)
    rowsft.apply(model, selection)
    actual = breakdown(model, token_batch(b=2, t=32))
    assert (predicted.weights, predicted.trainable, predicted.indices) == (actual.weights, actual.trainable, actual.indices)
    assert predicted.method == "rowsft-element"
    bigger = predict(model, selection, 4, 32)
    assert bigger.activations == 2 * predicted.activations and bigger.weights == predicted.weights


def test_predict_is_fast_on_a_deep_model():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, layers=30)   # SmolLM2-135M has 30 blocks
    selection = every_fourth(model)
    for spec in (selection, "full", ("lora", 8)):
        predict(model, spec, 8, 256)
        best = min(_timed(lambda: predict(model, spec, 8, 256)) for _ in range(3))
        assert best < 0.05, (spec, best)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def no_dropout_model(arch):
    """Models whose attention takes sdpa's fused kernel on CPU (no attention dropout): the padded case differs there."""
    if arch == "llama":
        return rowsft.tiny_model("llama", vocab_size=VOCAB)                  # 4 heads, 2 kv heads
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=None,
                                          eos_token_id=None))
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128,
                                                    attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                                    max_position_embeddings=64))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_predict_prices_what_padding_adds_as_the_saved_tensors_show(arch):
    # With padding, attention gets a mask: transformers repeats k and v to every head (llama's grouped-query
    # attention) and the fused kernel keeps each block's (B, 1, T, T) mask. The traced saved tensors of a padded and
    # an unpadded batch differ by exactly what predict(padded=True) adds.
    model = no_dropout_model(arch)
    rowsft.baselines.full_finetune(model)
    batch = token_batch(arch, b=2, t=24)
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][0, -5:] = 0
    traced = breakdown(model, padded).activations - breakdown(model, batch).activations
    priced = (predict(model, "full", 2, 24, padded=True).activations
              - predict(model, "full", 2, 24, padded=False).activations)
    assert traced > 0 and priced == traced


def test_predict_rejects_bad_input():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="selection_or_method"):
        predict(model, "dora", 1, 8)
    with pytest.raises(ValueError, match="batch_size"):
        predict(model, "full", 0, 8)
    with pytest.raises(ValueError, match="optimizer"):
        breakdown(LinearRegression(), regression_batch(), optimizer="lion")


# ---------------------------------------------------------------- report and callback
def test_report_prints_a_table_in_mib():
    r = MemoryReport(weights=2 << 20, trainable=1 << 20, gradients=1 << 20, optimizer=2 << 20, activations=3 << 20,
                     method="full")
    text = str(r)
    assert "weights" in text and "2.00 MiB" in text and "8.00 MiB" in text and "full" in text
    assert r.as_dict()["total"] == 8 << 20 and r.as_dict()["method"] == "full"


def test_memory_callback_fills_state_and_history():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    rowsft.apply(model, every_fourth(model))
    batch = token_batch(b=2, t=32)
    seen = []
    with pytest.warns(RuntimeWarning, match="profiler"):
        h = rowsft.train(model, [batch], steps=3, memory_every=2, progress=False,
                         callbacks=[lambda s: seen.append(dict(s.memory))])
    expected = breakdown(model, batch)
    assert len(seen) == 3 and all(m["weights"] == expected.weights for m in seen)
    assert all(m["activations"] == expected.activations for m in seen)
    assert "peak_measured" in seen[1] and "peak_measured" not in seen[0]
    assert abs(seen[1]["peak_measured"] - expected.total) <= 0.25 * expected.total
    assert h.steps[1]["memory_total"] == seen[1]["total"] and "memory_peak_measured" in h.steps[1]


def test_unique_storage_bytes_counts_views_once():
    t = torch.zeros(10, 10)
    assert unique_storage_bytes([t, t.t(), t[2:5], None]) == 400


def test_counting_activations_leaves_no_graph_alive():
    """A count-only forward must not keep its graph (activations and the weights it saved) after it returns."""
    import gc

    import rowsft
    from rowsft.memory import activation_bytes
    model = rowsft.tiny_model("llama", vocab_size=300)
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(3, 300, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def graph_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o) and o.grad_fn is not None)

    before = graph_tensors()
    for _ in range(3):
        assert activation_bytes(model, batch)[0] > 0
    assert graph_tensors() <= before      # the leak added a whole graph (67 tensors here) per call


def test_a_count_only_forward_refuses_backward():
    from rowsft.memory import SavedTensorCounter
    w = torch.randn(3, 3, requires_grad=True)
    with SavedTensorCounter([w], backward=False) as counter:
        y = (torch.randn(2, 3) @ w).sin().sum()
    assert counter.bytes > 0
    with pytest.raises(RuntimeError, match="only to count"):
        y.backward()
