"""rowsft.layers.rebuild: layer inputs rebuilt in backward from what the frozen graph keeps.

Rebuilding is bit-exact (the same kernels on the same inputs), so gradients with and without it must be
*equal*, not close; the bytes it saves must be exactly the inputs it no longer keeps, counted by hand. The one
exception is by design: a row update whose input is a Llama RMSNorm's output takes the norm's two scalings on its
thin factors instead of rebuilding the input (`RowUpdate`), which changes the rounding, so those gradients are
compared to float32 rounding (and to a float64 recomputation of the same formula).
Equality with dense masked float64 training (rebuild on) is in tests/test_tuner.py.
"""
import copy

import pytest
import torch
from _reference import random_batches
from torch import nn

import rowsft
from rowsft.layers import RowSparseLinear, SparseLinear, rebuild, tuner
from rowsft.memory import SavedTensorCounter, model_tensors
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape

VOCAB = 128


def all_linear_selection(model, unit, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model, "all-linear").items():
        d_out, d_in = linear_shape(module)
        limit, k = {"row": (d_out, 3), "element": (d_out * d_in, 40)}[unit]
        layers[name] = LayerChoice(unit, torch.sort(torch.randperm(limit, generator=g)[:k]).values, (d_out, d_in))
    return Selection(layers)


def gradients(model, batch, use_rebuild):
    for layer in tuner.sparse_layers(model).values():
        layer.rebuild_input = use_rebuild
        for p in layer.parameters():
            p.grad = None
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model, batch, use_rebuild):
    for layer in tuner.sparse_layers(model).values():
        layer.rebuild_input = use_rebuild
    with SavedTensorCounter(exclude=model_tensors(model)) as counter:
        loss = model(**batch).loss
    loss.backward()
    return counter.bytes


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("unit", ["row", "element"])
def test_gradients_are_bitwise_equal_with_and_without_rebuilding(arch, unit):
    model = rowsft.tiny_model(arch, vocab_size=VOCAB, seed=3)        # float32, eval(): no dropout
    tuner.apply(model, all_linear_selection(model, unit))
    for layer in tuner.sparse_layers(model).values():                  # nonzero updates: a real step's state
        with torch.no_grad():
            layer.update.normal_(std=0.05)
    batch = random_batches(1, 2, 12, VOCAB, seed=1)[0]
    if arch == "bert":                                                   # a sequence classifier
        batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"][:, 0] % 2}
    with_rebuild = gradients(model, batch, True)
    without = gradients(model, batch, False)
    assert with_rebuild.keys() == without.keys() and with_rebuild
    folded = folded_layers(model, batch) if unit == "row" else set()
    assert bool(folded) == (arch == "llama" and unit == "row")
    for name in without:
        if name.removesuffix(".delta") in folded:                        # the norm folded in: rounding only
            torch.testing.assert_close(with_rebuild[name], without[name], rtol=1e-5, atol=1e-9, msg=name)
        else:
            assert torch.equal(with_rebuild[name], without[name]), name


def folded_layers(model, batch=None) -> set[str]:
    """Sparse row layers whose input is a scaled RMSNorm's output (Source.scaled), by one forward pass."""
    names = {id(m): n for n, m in tuner.sparse_layers(model).items()}
    for layer in tuner.sparse_layers(model).values():
        layer.rebuild_input = True
    found, original = set(), RowSparseLinear._input_source

    def spy(self, x):
        source = original(self, x)
        if source is not None and source.scaled is not None:      # a group's leader finds the source for all
            found.update(names[id(m)] for m in (self.row_group.layers if self.row_group else [self]))
        return source
    RowSparseLinear._input_source = spy
    try:
        model(**(batch or random_batches(1, 2, 12, VOCAB, seed=1)[0]))    # with grad: sources need it
    finally:
        RowSparseLinear._input_source = original
    return found


def test_folded_row_gradient_is_the_float64_gradient_of_the_norm_output():
    """A row layer over a Llama RMSNorm: its delta gradient equals gᵀ x with x the norm's output, computed here
    independently in float64 from a hooked forward (x and g captured), to float32 rounding."""
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    tuner.apply(model, all_linear_selection(model, "row"))
    name = "model.layers.1.self_attn.q_proj"
    assert name in folded_layers(model)
    layer = tuner.sparse_layers(model)[name]
    captured = {}

    def keep_input(module, inputs):
        captured["x"] = inputs[0].detach().double()

    def keep_grad(module, grad_input, grad_output):
        captured["g"] = grad_output[0].detach().double()
    handles = [layer.register_forward_pre_hook(keep_input), layer.register_full_backward_hook(keep_grad)]
    try:
        model(**random_batches(1, 2, 12, VOCAB, seed=1)[0]).loss.backward()
    finally:
        for h in handles:
            h.remove()
    g_rows = captured["g"].reshape(-1, captured["g"].shape[-1])[:, layer.indices.long()]     # (N, k)
    expected = g_rows.T @ captured["x"].reshape(-1, captured["x"].shape[-1])                # (k, d_in)
    torch.testing.assert_close(layer.update.grad.double(), expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("unit", ["row", "element"])
def test_bitwise_equal_under_bf16_autocast(unit):
    """Under autocast the input is handed over already cast to the update's compute dtype (once per
    sibling group): the gradients must still equal those of the kept-input path bit for bit (rows included: they
    fold a Llama RMSNorm into their gradient only where they compute in the input's dtype, not under autocast).
    Rows take the usual update here (``train_in_cast=False``); rows written into the kept cast take delta's gradient
    on the norm's input, equal to this to bf16 rounding (`tests/test_in_weight.py`)."""
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    tuner.apply(model, all_linear_selection(model, unit), train_in_cast=False)
    for layer in tuner.sparse_layers(model).values():
        with torch.no_grad():
            layer.update.normal_(std=0.05)
    batch = random_batches(1, 2, 12, VOCAB, seed=1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with_rebuild = gradients(model, batch, True)
        without = gradients(model, batch, False)
    assert with_rebuild.keys() == without.keys() and with_rebuild
    for name in without:
        assert with_rebuild[name].dtype == torch.float32, name        # fp32 updates keep fp32 gradients
        assert torch.equal(with_rebuild[name], without[name]), name


def test_llama_saves_exactly_the_rebuilt_inputs():
    """Rows on all seven projections of a float32 tiny Llama: without rebuilding, each block keeps its two
    norm outputs (q/k/v and gate/up inputs) and its down input; with it, none of them, except the first
    block's input norm output (its input, the embeddings, needs no grad, so the norm keeps nothing)."""
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    tuner.apply(model, all_linear_selection(model, "row"))
    batch = random_batches(1, 2, 12, VOCAB, seed=1)[0]
    cfg = model.config
    tokens = batch["input_ids"].numel()
    expected = tokens * 4 * ((2 * cfg.num_hidden_layers - 1) * cfg.hidden_size
                             + cfg.num_hidden_layers * cfg.intermediate_size)
    assert saved_bytes(model, batch, False) - saved_bytes(model, batch, True) == expected


def test_apply_can_keep_the_inputs_themselves():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    batch = random_batches(1, 2, 12, VOCAB, seed=1)[0]
    tuner.apply(model, all_linear_selection(model, "row"), rebuild_inputs=False)
    assert not any(layer.rebuild_input for layer in tuner.sparse_layers(model).values())
    assert not any(m._forward_hooks for m in model.modules() if rebuild.is_norm(m))
    with SavedTensorCounter(exclude=model_tensors(model)) as kept:
        model(**batch).loss.backward()
    tuner.unload(model)
    tuner.apply(model, all_linear_selection(model, "row"))
    with SavedTensorCounter(exclude=model_tensors(model)) as rebuilt:
        model(**batch).loss.backward()
    assert rebuilt.bytes < kept.bytes


def test_sources_found_per_role_on_llama():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    tuner.apply(model, all_linear_selection(model, "row"))
    found = {}
    original = RowSparseLinear._input_source

    def spy(self, x):
        source = original(self, x)
        found[self_names[id(self)]] = None if source is None else source.what
        return source

    self_names = {id(m): n for n, m in tuner.sparse_layers(model).items()}
    RowSparseLinear._input_source = spy
    try:
        model(**random_batches(1, 2, 12, VOCAB, seed=1)[0]).loss.backward()
    finally:
        RowSparseLinear._input_source = original
    assert found["model.layers.0.self_attn.q_proj"] is None                 # embeddings need no grad
    assert found["model.layers.1.self_attn.q_proj"] == "norm"
    assert found["model.layers.0.mlp.gate_proj"] == "norm"
    assert found["model.layers.0.mlp.down_proj"] == "product"
    assert found["model.layers.0.self_attn.o_proj"] is None                 # kept by the attention kernel
    tuner.unload(model)                                                     # the norm hooks go with the layers
    assert not any(m._forward_hooks for m in model.modules() if rebuild.is_norm(m))


def test_no_source_under_checkpointing_compile_no_grad_or_half_rmsnorm():
    h = torch.randn(2, 3, 8, requires_grad=True)
    norm = nn.LayerNorm(8)
    rebuild.track_norm_outputs(norm)
    assert rebuild.source_of(norm(h)) is not None
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):   # e.g. checkpointing
        assert rebuild.source_of(norm(h)) is None
    with torch.no_grad():
        assert rebuild.source_of(norm(h)) is None
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert rebuild.source_of(torch.nn.functional.silu(x) * x.exp()).what == "product"
    assert rebuild.source_of(torch.nn.functional.silu(x) * torch.randn(8)) is None   # one factor is not kept
    half = rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16)
    tuner.apply(half, all_linear_selection(half, "row"))
    kinds = set()
    original = RowSparseLinear._input_source
    RowSparseLinear._input_source = lambda self, x: kinds.add(getattr(original(self, x), "what", None))
    try:
        half(**random_batches(1, 2, 12, VOCAB, seed=1)[0])
    finally:
        RowSparseLinear._input_source = original
    assert "norm" not in kinds      # a bf16 RMSNorm keeps an fp32 copy, not its input: nothing to rebuild from


def test_a_source_modified_in_place_fails_loudly():
    norm = nn.LayerNorm(8)
    rebuild.track_norm_outputs(norm)
    layer = RowSparseLinear(nn.Linear(8, 6), [1, 4])
    h = torch.randn(2, 8, requires_grad=True)
    inner = h * 1.0
    out = layer(norm(inner))
    with torch.no_grad():
        inner.add_(1.0)                 # the tensor the norm (and the rebuild) keep
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_count_only_forward_counts_the_same_as_a_real_one():
    from rowsft.memory import activation_bytes
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    tuner.apply(model, all_linear_selection(model, "element"))
    batch = random_batches(1, 2, 12, VOCAB, seed=1)[0]
    counted, _ = activation_bytes(model, batch, lean_logits=False)
    model.train()
    assert counted == saved_bytes(model, batch, True)
    assert isinstance(next(iter(tuner.sparse_layers(model).values())), SparseLinear)
    assert copy.deepcopy(model) is not None        # hook handles live outside the model: it still copies


@pytest.mark.parametrize("unit", ["element", "row"])
def test_siblings_share_one_rebuild(monkeypatch, unit):
    """q/k/v read one norm output and gate/up another: each is rebuilt once per backward, not per layer (element
    updates); row updates take a Llama RMSNorm's scalings on their thin factors and rebuild none of them."""
    calls = []
    make = rebuild._norm_rebuild

    def counting(module, device_type, autocast):
        inner = make(module, device_type, autocast)
        return lambda h: calls.append(module) or inner(h)
    monkeypatch.setattr(rebuild, "_norm_rebuild", counting)
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=3)
    tuner.apply(model, all_linear_selection(model, unit))
    model(**random_batches(1, 2, 12, VOCAB, seed=1)[0]).loss.backward()
    layers = model.config.num_hidden_layers
    if unit == "row":
        assert calls == []
        return
    assert len(calls) == 2 * layers - 1             # every norm output once (not the first block's input norm)
    assert len(set(map(id, calls))) == len(calls)
