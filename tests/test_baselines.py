"""Baselines: full fine-tuning, LoRA through the real peft library, LoRA-rank parity, and the
SPEFT-style dense-scatter reference (checked against masked dense gradients)."""
from __future__ import annotations

import pytest
import torch
from _reference import random_batches

import rowsft
from rowsft import baselines
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, is_transposed, linear_shape, weight_out_in

VOCAB = 128


def token_batches(n=2, b=2, t=16, seed=0):
    return random_batches(n, b, t, VOCAB, seed)


def test_full_finetune_trains_everything():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB).requires_grad_(False)
    assert baselines.full_finetune(model) is model
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_through_peft_trains_only_lora_parameters(arch):
    peft = pytest.importorskip("peft")
    base = rowsft.tiny_model(arch, vocab_size=VOCAB)
    batch = token_batches(n=1)[0]
    with torch.no_grad():
        reference_logits = base(**batch).logits
    model = baselines.lora(base, rank=4)
    assert isinstance(model, peft.PeftModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # peft's own count == rank * (d_in + d_out) over rowsft's targets
    assert model.get_nb_trainable_parameters()[0] == baselines.lora_trainable_parameters(
        rowsft.tiny_model(arch, vocab_size=VOCAB), 4)
    if arch == "gpt2":
        assert model.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reference_logits, atol=1e-6)  # B starts at zero
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = rowsft.train(model, token_batches(), steps=12, lr=1e-2, schedule="constant", progress=False)
    assert history.losses[-1] < history.losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_lora_options_reach_peft():
    model = baselines.lora(rowsft.tiny_model("llama", vocab_size=VOCAB), rank=2, targets=["q_proj", "v_proj"],
                           alpha=7, dropout=0.1, use_dora=True)
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_dora) == (2, 7, 0.1, True)
    assert sorted(cfg.target_modules) == sorted(find_targets(rowsft.tiny_model("llama", vocab_size=VOCAB), ["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="rank"):
        baselines.lora(rowsft.tiny_model("llama", vocab_size=VOCAB), rank=0)


def test_lora_on_sequence_classification_trains_the_head():
    model = baselines.lora(rowsft.tiny_model("bert", vocab_size=VOCAB), rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable)


# ---------------------------------------------------------------- LoRA-rank parity
def _per_rank(shapes):
    return sum(d_out + d_in for d_out, d_in in shapes)


def test_lora_parity_rank_is_the_closest_rank():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    shapes = [linear_shape(m) for m in find_targets(model).values()]
    for rows in (1, 3, 8, 17, 40, 64, 200):
        wanted = sum(min(rows, d_out) * d_in for d_out, d_in in shapes)
        best = min(range(1, 300), key=lambda r: (abs(r * _per_rank(shapes) - wanted), r))  # brute force
        assert baselines.lora_parity_rank(model, rows) == best, rows


def test_lora_parity_rank_inverts_a_selection_of_lora_size():
    model = rowsft.tiny_model("gpt2", vocab_size=VOCAB)
    targets = find_targets(model)
    for rank in (1, 2, 5, 8):
        # rows per layer giving about rank * (d_in + d_out) parameters per layer
        layers = {}
        for name, module in targets.items():
            d_out, d_in = linear_shape(module)
            k = round(rank * (d_out + d_in) / d_in)
            layers[name] = LayerChoice("row", torch.arange(k), (d_out, d_in))
        selection = Selection(layers)
        assert baselines.lora_parity_rank(model, selection) == rank
        # and that rank's real peft model has the closest parameter count
        peft_count = baselines.lora(rowsft.tiny_model("gpt2", vocab_size=VOCAB), rank=rank).get_nb_trainable_parameters()[0]
        for other in (rank - 1, rank + 1):
            if other >= 1:
                assert abs(peft_count - selection.trainable_parameters) <= abs(
                    other * _per_rank([c.shape for c in layers.values()]) - selection.trainable_parameters)


def test_lora_parity_rank_prices_only_the_selected_modules():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    name = "model.layers.0.mlp.up_proj"
    d_out, d_in = linear_shape(model.get_submodule(name))
    selection = Selection({name: LayerChoice("row", torch.arange(30), (d_out, d_in))})
    assert baselines.lora_parity_rank(model, selection) == round(30 * d_in / (d_out + d_in))
    with pytest.raises(TypeError):
        baselines.lora_parity_rank(model, 2.5)


def test_lora_parity_rank_inverts_selection_lora_parity():
    selection_module = pytest.importorskip("rowsft.selection")
    if not hasattr(selection_module, "lora_parity"):
        pytest.skip("rowsft.selection.lora_parity not written yet")
    scoring = pytest.importorskip("rowsft.scoring")
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    scores = scoring.score(model, token_batches(), metric="magnitude", unit="row", num_batches=1)
    for rank in (2, 4):
        chosen = selection_module.select(scores, budget=selection_module.lora_parity(rank))
        assert baselines.lora_parity_rank(model, chosen) == rank


# ---------------------------------------------------------------- dense scatter reference
@pytest.mark.parametrize("unit", ["row", "column", "element"])
def test_dense_scatter_reference_equals_masked_dense_training(unit):
    """One SGD step of the reference == a dense float64 step whose weight gradient is masked."""
    arch = "gpt2" if unit == "column" else "llama"  # also covers HF Conv1D
    names = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_proj"] if arch == "gpt2" else \
        ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    model = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    layers = {}
    for n in names:
        d_out, d_in = linear_shape(model.get_submodule(n))
        limit = {"row": d_out, "column": d_in, "element": d_out * d_in}[unit]
        layers[n] = LayerChoice(unit, torch.sort(torch.randperm(limit, generator=g)[:7]).values, (d_out, d_in))
    selection = Selection(layers)
    batch = token_batches(n=1)[0]
    with torch.no_grad():
        before = model(**batch).logits
    baselines.dense_scatter_reference(model, selection)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, before)   # zero start: the pretrained model exactly
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(names)
    model.train()
    model(**batch).loss.backward()
    with torch.no_grad():
        for p in trainable:
            p -= 0.3 * p.grad

    ref = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)
    stored = [ref.get_submodule(n).weight for n in names]
    ref.train()
    grads = [g.t() if is_transposed(ref.get_submodule(n)) else g  # as (d_out, d_in)
             for n, g in zip(names, torch.autograd.grad(ref(**batch).loss, stored))]
    weights = [weight_out_in(ref.get_submodule(n)) for n in names]
    for n, w, grad in zip(names, weights, grads):
        mask = torch.zeros_like(grad).reshape(-1) if unit == "element" else torch.zeros_like(grad)
        idx = layers[n].indices
        if unit == "row":
            mask[idx] = 1
        elif unit == "column":
            mask[:, idx] = 1
        else:
            mask[idx] = 1
            mask = mask.view_as(grad)
        expected = w.detach() - 0.3 * grad * mask
        got = model.get_submodule(n).dense_weight().detach()
        assert torch.allclose(got, expected, rtol=0, atol=1e-12), n


def test_dense_scatter_reference_rejects_a_foreign_selection():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(KeyError, match="no module"):
        baselines.dense_scatter_reference(model, Selection({"nope.q_proj": LayerChoice("row", torch.tensor([0]), (4, 4))}))
    with pytest.raises(ValueError, match="shape"):
        baselines.dense_scatter_reference(model, Selection(
            {"model.layers.0.mlp.up_proj": LayerChoice("row", torch.tensor([0]), (4, 4))}))
