"""Rows trained inside the base weight (`rowsft.layers.in_weight`, ``apply(train_in_weight=True)``).

The reference is dense float64 training with the weight gradients masked to the selected entries (as in
tests/test_tuner.py), written here without rowsft, and the usual row layers. What the mode changes must not show:
``state_dict``, ``unload`` and ``unmerge`` give the pretrained weight bit for bit, whatever optimizer ran (a fused
AdamW does not bump a tensor's version)."""
import copy

import pytest
import torch
from _reference import adamw_steps, out_in, random_batches, selection_for, train_beside_masked_dense

import rowsft
from rowsft.layers import tuner
from rowsft.layers.in_weight import InWeightProducts, InWeightRowUpdate, take_rows_out
from rowsft.training.dynamic import rebuild_layer

VOCAB = 128
LLAMA_UNITS = {"model.layers.0.self_attn.q_proj": "row", "model.layers.0.self_attn.k_proj": "row",
               "model.layers.0.self_attn.o_proj": "column", "model.layers.1.mlp.up_proj": "element",
               "model.layers.1.mlp.down_proj": "row", "model.layers.1.mlp.gate_proj": "row"}
GPT2_UNITS = {"transformer.h.0.attn.c_attn": "row", "transformer.h.0.attn.c_proj": "column",
              "transformer.h.1.mlp.c_proj": "row"}




def batches(n, seed=0):
    return random_batches(n, 2, 8, VOCAB, seed)


def pretrained_state(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def plain_name(name):
    return name.replace(".base_layer", "")


OPTIMIZERS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0),
              "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0, fused=True),
              "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)}


@pytest.mark.parametrize("arch, units", [("llama", LLAMA_UNITS), ("gpt2", GPT2_UNITS)])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_three_steps_equal_masked_dense_float64(arch, units, opt_name):
    original = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)
    selection = selection_for(original, units)
    reference, model, _ = train_beside_masked_dense(
        original, selection, OPTIMIZERS[opt_name], batches(3),
        lambda m: tuner.apply(m, selection, train_in_weight=True))
    assert {n for n, layer in tuner.sparse_layers(model).items() if layer.in_weight} == \
        {n for n, u in units.items() if u == "row"}
    for name, layer in tuner.sparse_layers(model).items():
        update = out_in(reference.get_submodule(name)).detach() - out_in(original.get_submodule(name))
        torch.testing.assert_close(layer.delta_weight(), update, rtol=0, atol=1e-10)
        assert update.abs().max() > 1e-6
    with torch.no_grad():                        # the last step's update reaches the next forward (fused too)
        batch = batches(1, seed=5)[0]
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-10)


def trained(arch="llama", units=LLAMA_UNITS, steps=2, dtype=torch.float32, **apply_kwargs):
    """(original, the same model trained a few steps with rows in the weight)."""
    original = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=dtype)
    model = tuner.apply(copy.deepcopy(original), selection_for(original, units), train_in_weight=True,
                        **apply_kwargs)
    adamw_steps(model, batches(steps), fused=True)
    return original, model


def rows_of(units):
    return {name: unit for name, unit in units.items() if unit == "row"}


@pytest.mark.parametrize("arch, units", [("llama", rows_of(LLAMA_UNITS)), ("gpt2", rows_of(GPT2_UNITS))])
def test_state_dict_unmerge_and_unload_give_the_pretrained_weight_bit_for_bit(arch, units):
    original, model = trained(arch, units)
    pretrained = pretrained_state(original)
    saved = model.state_dict()
    for name, tensor in saved.items():
        if plain_name(name) in pretrained:
            assert torch.equal(tensor, pretrained[plain_name(name)]), name
    batch = batches(1, seed=7)[0]
    with torch.no_grad():
        trained_logits = model(input_ids=batch["input_ids"]).logits
        usual = tuner.apply(copy.deepcopy(original), selection_for(original, units))   # the usual layers, same deltas
        usual.load_state_dict(saved)
        torch.testing.assert_close(usual(input_ids=batch["input_ids"]).logits, trained_logits, rtol=0, atol=1e-5)
        tuner.merge(model)                        # the very weight the last forward used
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, trained_logits)
        tuner.unmerge(model)
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, trained_logits)
        tuner.unload(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, pretrained[name]), name
    assert all(p.requires_grad for p in model.parameters())


def test_loading_a_state_dict_takes_up_a_new_base_weight_and_new_deltas():
    original, model = trained()
    other = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=11)
    usual = tuner.apply(copy.deepcopy(other), selection_for(original, LLAMA_UNITS))
    for layer in tuner.sparse_layers(usual).values():
        with torch.no_grad():
            layer.update.normal_(std=0.05)
    model.load_state_dict(usual.state_dict())
    for name, layer in tuner.sparse_layers(model).items():
        if layer.in_weight:
            expected = out_in(other.get_submodule(name)).index_select(0, layer.indices)
            assert torch.equal(layer.pretrained_rows, expected), name
    batch = batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, usual(**batch).logits, rtol=0, atol=1e-5)
    assert all(torch.equal(t, usual.state_dict()[n]) for n, t in model.state_dict().items())


def test_two_forwards_then_one_backward_and_checkpointing_match_the_usual_layers():
    original = rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.float64)
    selection = selection_for(original, LLAMA_UNITS)
    usual = tuner.apply(copy.deepcopy(original), selection).train()
    inside = tuner.apply(copy.deepcopy(original), selection, train_in_weight=True).train()
    for model in (usual, inside):
        torch.manual_seed(0)
        with torch.no_grad():
            for layer in tuner.sparse_layers(model).values():
                layer.update.normal_(std=0.05)
    first, second = batches(2)
    for model in (usual, inside):
        (model(**first).loss + model(**second).loss).backward()   # the second forward rewrites the same rows
    for (name, a), (_, b) in zip(tuner.sparse_layers(usual).items(), tuner.sparse_layers(inside).items()):
        torch.testing.assert_close(b.update.grad, a.update.grad, rtol=0, atol=1e-12, msg=name)
        a.update.grad = b.update.grad = None
    inside.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    usual(**first, use_cache=False).loss.backward()
    inside(**first, use_cache=False).loss.backward()
    for (name, a), (_, b) in zip(tuner.sparse_layers(usual).items(), tuner.sparse_layers(inside).items()):
        torch.testing.assert_close(b.update.grad, a.update.grad, rtol=0, atol=1e-12, msg=name)


def test_a_backward_after_delta_changed_in_place_is_refused_as_usual():
    _, model = trained(steps=0)
    loss = model(**batches(1)[0]).loss
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.delta.add_(1.0)     # its input needs a gradient: delta is saved
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_bf16_autocast_trains_and_merges_into_the_weight_it_used():
    original, model = trained(units=rows_of(LLAMA_UNITS), steps=0)
    losses = adamw_steps(model, [batches(1)[0]] * 4, autocast=True)
    assert losses[-1] < losses[0]
    batch = batches(1, seed=2)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=batch["input_ids"]).logits
        tuner.merge(model)
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, before)


def test_refused_before_anything_changes_tied_weight_compile_and_sharding(monkeypatch):
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = pretrained_state(model)
    rows = {"lm_head": [0, 3], "model.layers.0.mlp.up_proj": [1]}
    with pytest.raises(ValueError, match="tied to"):
        tuner.apply(model, rows, train_in_weight=True)
    assert not tuner.sparse_layers(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())

    _, inside = trained(steps=0)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="torch.compile"):
        inside(**batches(1)[0])
    monkeypatch.undo()

    from rowsft.distributed import sharding
    monkeypatch.setattr(sharding, "is_distributed", lambda: True)
    with pytest.raises(RuntimeError, match="train_in_weight=False before sharding"):
        sharding.check_can_shard(inside)


def test_rebuilt_layer_starts_from_the_folded_weight():
    original, model = trained(units={"model.layers.0.mlp.down_proj": "row"})
    layer = model.model.layers[0].mlp.down_proj
    layer.merge()
    folded = out_in(layer.base_layer).detach().clone()
    rebuild_layer(layer, torch.tensor([0, 2, 4, 6, 8]))
    assert not layer.merged and layer.in_weight
    assert torch.equal(layer.pretrained_rows, folded[[0, 2, 4, 6, 8]])
    with torch.no_grad():
        model(**batches(1)[0])                   # zero deltas: the weight is the folded one
        assert torch.equal(out_in(layer.base_layer), folded)
        take_rows_out(layer)
        assert torch.equal(out_in(layer.base_layer), folded)


def test_switching_off_puts_the_pretrained_rows_back():
    original, model = trained()
    q = model.model.layers[0].self_attn.q_proj
    q.set_train_in_weight(False)
    assert not q.in_weight and not hasattr(q, "pretrained_rows")
    assert torch.equal(q.base_layer.weight, original.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ValueError, match="trains columns"):
        model.model.layers[0].self_attn.o_proj.set_train_in_weight(True)


def test_memory_breakdown_counts_the_pretrained_rows():
    from rowsft import memory
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = selection_for(original, LLAMA_UNITS)
    usual = tuner.apply(copy.deepcopy(original), selection)
    inside = tuner.apply(copy.deepcopy(original), selection, train_in_weight=True)
    batch = batches(1)[0]
    kept = sum(len(c.indices) * c.shape[1] * 4 for c in selection.layers.values() if c.unit == "row")   # float32
    assert memory.breakdown(inside, batch).weights - memory.breakdown(usual, batch).weights == kept


def test_inference_mode_and_generation_see_the_trained_rows():
    original, model = trained(units=rows_of(LLAMA_UNITS))
    usual = tuner.apply(copy.deepcopy(original), selection_for(original, rows_of(LLAMA_UNITS)))
    usual.load_state_dict(model.state_dict())
    ids = batches(1, seed=4)[0]["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, usual(input_ids=ids).logits, rtol=0, atol=1e-5)
    with torch.no_grad():
        generated = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, usual.generate(ids[:1], max_new_tokens=4, do_sample=False))


def test_bf16_model_with_float32_deltas_stores_rows_in_bf16_and_merges_what_it_used():
    original = rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16)
    units = rows_of(LLAMA_UNITS)
    model = tuner.apply(copy.deepcopy(original), selection_for(original, units), delta_dtype=torch.float32,
                        train_in_weight=True)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.delta.dtype == torch.float32 and layer.pretrained_rows.dtype == torch.bfloat16
    losses = adamw_steps(model, [batches(1)[0]] * 4)
    assert losses[-1] < losses[0]
    ids = batches(1, seed=6)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        expected = (layer.pretrained_rows.float() + layer.delta.float()).to(torch.bfloat16)
        assert torch.equal(layer.base_layer.weight[layer.indices], expected)
        tuner.merge(model)
        assert torch.equal(model(input_ids=ids).logits, before)


def test_a_layer_switched_into_the_weight_after_apply_leaves_its_group_working():
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    units = {f"model.layers.0.self_attn.{m}_proj": "row" for m in "qkv"}
    model = tuner.apply(copy.deepcopy(original), selection_for(original, units))
    q, k = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj
    group = k.row_group
    assert group is not None and q.row_group is group
    q.set_train_in_weight(True)
    for _ in range(3):                      # q runs alone (no sibling in the weight), k leads, v takes its share
        model(**batches(1)[0]).loss.backward()
    assert group.shared_input and not group._pending


def test_one_node_per_group_and_bf16_autocast_gradients_match_the_usual_layers():
    """q/k/v rows in the weight run as one node (`InWeightProducts`). Under bf16 autocast delta's gradient is taken
    on the norm's input cast once (``((g · s)ᵀ bf16(h)) ⊙ w``), not on the rebuilt, cast input: equal to the usual
    layers' gradient to bf16 rounding."""
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    units = {f"model.layers.{b}.self_attn.{m}_proj": "row" for b in (0, 1) for m in "qkv"}
    units.update({f"model.layers.{b}.mlp.{m}_proj": "row" for b in (0, 1) for m in ("gate", "up", "down")})
    selection = selection_for(original, units)
    usual = tuner.apply(copy.deepcopy(original), selection, train_in_cast=False)
    inside = tuner.apply(copy.deepcopy(original), selection, train_in_weight=True)
    for model in (usual, inside):
        torch.manual_seed(0)
        with torch.no_grad():
            for layer in tuner.sparse_layers(model).values():
                layer.update.normal_(std=0.02)
    batch = batches(1)[0]
    nodes = []
    attention = inside.model.layers[0].self_attn
    hooks = [getattr(attention, f"{m}_proj").register_forward_hook(lambda mod, args, out: nodes.append(out.grad_fn))
             for m in "qkv"]
    grads = []
    for model in (usual, inside):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads.append({n: layer.delta.grad for n, layer in tuner.sparse_layers(model).items()})
    for hook in hooks:
        hook.remove()
    assert len(nodes) == 3 and all(node is nodes[0] for node in nodes)
    assert nodes[0].name() == "InWeightProductsBackward"
    for name in units:
        usual_grad, inside_grad = grads[0][name], grads[1][name]
        scale = usual_grad.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(inside_grad, usual_grad, rtol=0, atol=0.03 * scale, msg=name)


@pytest.mark.parametrize("arch, units", [("llama", rows_of(LLAMA_UNITS)), ("gpt2", rows_of(GPT2_UNITS))])
def test_rows_in_a_hooked_base_layer_train_as_masked_dense_float64(arch, units, monkeypatch):
    """A base layer with a forward hook runs as is (its rows written first) and `InWeightRowUpdate` gives delta's
    gradient: three steps equal dense float64 training masked to the rows, as the fused path does."""
    original = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)
    selection = selection_for(original, units)
    calls, backward = [], {"fallback": 0, "fused": 0}
    fallback_grads, fused_backward = InWeightRowUpdate._grads, InWeightProducts.backward

    def counted_fallback(*args):
        backward["fallback"] += 1
        return fallback_grads(*args)

    def counted_fused(*args):
        backward["fused"] += 1
        return fused_backward(*args)

    monkeypatch.setattr(InWeightRowUpdate, "_grads", staticmethod(counted_fallback))
    monkeypatch.setattr(InWeightProducts, "backward", staticmethod(counted_fused))

    def hooked(model):
        tuner.apply(model, selection, train_in_weight=True)
        for name in units:
            model.get_submodule(name).base_layer.register_forward_hook(lambda mod, args, out: calls.append(mod))
        return model

    reference, model, _ = train_beside_masked_dense(original, selection, OPTIMIZERS["adamw"], batches(3), hooked)
    assert len(calls) == 3 * len(units)                      # the hooks ran: the base layers ran as they are
    assert backward == {"fallback": 3 * len(units), "fused": 0}
    for name, layer in tuner.sparse_layers(model).items():
        update = out_in(reference.get_submodule(name)).detach() - out_in(original.get_submodule(name))
        torch.testing.assert_close(layer.delta_weight(), update, rtol=0, atol=1e-10)
        assert update.abs().max() > 1e-6
