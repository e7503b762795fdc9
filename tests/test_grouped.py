"""rowsft.layers.grouped: q/k/v and gate/up rows computed as one product per group.

Grouping changes only the order in which the same products are summed: gradients must equal the ungrouped
layers' to float32 rounding, and a float64 run must equal dense masked training (tests/test_tuner.py covers the
grouped layers there too, since `rowsft.apply` groups by default). Here: which layers group, that the graph really
has one grouped node per group, the fall-backs, and that grouping keeps no more tensors for backward.
"""
import pytest
import torch
from _reference import node_names, random_batches

import rowsft
from rowsft.layers import grouped, tuner
from rowsft.memory import SavedTensorCounter, model_tensors
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape

VOCAB = 128


def row_selection(model, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model, "all-linear").items():
        d_out, d_in = linear_shape(module)
        layers[name] = LayerChoice("row", torch.sort(torch.randperm(d_out, generator=g)[:k]).values, (d_out, d_in))
    return Selection(layers)


def applied(arch, dtype=torch.float32, form="lent"):
    """A tiny model with row layers on every linear layer, trained the usual way (``form="usual"``), with their rows
    lent to the weights for each product (``"lent"``, the default), or inside the weights (``"in-weight"``)."""
    model = rowsft.tiny_model(arch, vocab_size=VOCAB, seed=3, dtype=dtype)
    tuner.apply(model, row_selection(model), train_in_weight=form == "in-weight", lend_rows=form != "usual")
    for layer in tuner.sparse_layers(model).values():              # nonzero updates: a trained state
        with torch.no_grad():
            layer.update.normal_(std=0.05)
    return model


def expected(layer, x):
    """``x (W0 + D)ᵀ`` for a row layer: the pretrained weight (rows trained in the weight put back) plus its dense
    update, computed here without the layer's forward."""
    weight = layer.base_layer.weight.detach().clone()
    if layer.in_weight:
        weight[layer.indices] = layer.pretrained_rows
    return x @ (weight + layer.delta_weight()).T


FORMS = pytest.mark.parametrize("form", ["usual", "lent", "in-weight"])
NODES = {"usual": "GroupedRowProductsBackward", "lent": "LentRowProductsBackward",
         "in-weight": "InWeightProductsBackward"}


def batch_for(arch):
    batch = random_batches(1, 2, 12, VOCAB, seed=1)[0]
    if arch == "bert":
        return {"input_ids": batch["input_ids"], "labels": batch["input_ids"][:, 0] % 2}
    return batch


def gradients(model, batch):
    for p in model.parameters():
        p.grad = None
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def ungrouped(model):
    for layer in tuner.sparse_layers(model).values():
        layer.row_group = None
    return model


def test_groups_are_the_layers_that_read_one_input():
    layers = tuner.sparse_layers(applied("llama"))
    blocks = {n.split(".")[2] for n in layers}
    for block in blocks:
        attn = [layers[f"model.layers.{block}.self_attn.{t}_proj"] for t in "qkv"]
        mlp = [layers[f"model.layers.{block}.mlp.{t}_proj"] for t in ("gate", "up")]
        assert attn[0].row_group is not None and all(m.row_group is attn[0].row_group for m in attn)
        assert mlp[0].row_group is not None and all(m.row_group is mlp[0].row_group for m in mlp)
        assert attn[0].row_group is not mlp[0].row_group
        assert layers[f"model.layers.{block}.self_attn.o_proj"].row_group is None
        assert layers[f"model.layers.{block}.mlp.down_proj"].row_group is None
    bert = tuner.sparse_layers(applied("bert"))
    assert bert["bert.encoder.layer.0.attention.self.query"].row_group is not None
    assert bert["bert.encoder.layer.0.intermediate.dense"].row_group is None          # reads its input alone
    assert all(layer.row_group is None for layer in tuner.sparse_layers(applied("gpt2")).values())   # fused c_attn


@pytest.mark.parametrize("arch", ["llama", "bert"])
@FORMS
def test_grouped_gradients_equal_the_ungrouped_ones_with_one_node_per_group(arch, form):
    model, batch = applied(arch, form=form), batch_for(arch)
    loss, grouped_grads = gradients(model, batch)
    names = node_names(model(**batch).loss)
    layers = tuner.sparse_layers(model).values()
    groups = {id(layer.row_group) for layer in layers if layer.row_group is not None}
    alone = sum(layer.row_group is None for layer in layers)
    usual = form == "usual"
    assert names.count(NODES[form]) == len(groups) + (0 if usual else alone)   # one node for a whole group
    assert not {node for other, node in NODES.items() if other != form} & set(names)
    if usual:                                  # a layer alone (o_proj, down_proj) runs its own row update
        assert names.count("RowUpdateBackward") == alone
    plain_loss, plain = gradients(ungrouped(model), batch)
    ungrouped_names = node_names(model(**batch).loss)
    assert "GroupedRowProductsBackward" not in ungrouped_names
    assert ungrouped_names.count(NODES[form]) == (0 if usual else len(layers))
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    assert plain.keys() == grouped_grads.keys()
    for name in plain:
        torch.testing.assert_close(grouped_grads[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)


@FORMS
def test_float64_grouped_gradients_equal_the_ungrouped_ones_to_float64_rounding(form):
    model, batch = applied("llama", torch.float64, form=form), batch_for("llama")
    _, grouped_grads = gradients(model, batch)
    _, plain = gradients(ungrouped(model), batch)
    for name in plain:
        torch.testing.assert_close(grouped_grads[name], plain[name], rtol=1e-12, atol=1e-15, msg=name)


@FORMS
def test_a_member_run_on_another_input_falls_back_to_its_own_update(form):
    model = applied("llama", form=form)
    layers = tuner.sparse_layers(model)
    q, k = layers["model.layers.1.self_attn.q_proj"], layers["model.layers.1.self_attn.k_proj"]
    x = torch.randn(2, 5, q.in_features, requires_grad=True)
    other = torch.randn(2, 5, q.in_features)
    q(x)                                                            # q leads: shares for k and v are pending
    torch.testing.assert_close(k(other), expected(k, other), rtol=1e-5, atol=1e-6)     # not the share from x
    q(x)
    with torch.no_grad():
        x.add_(1.0)                                                 # the same tensor, changed in place
    torch.testing.assert_close(k(x), expected(k, x.detach()), rtol=1e-5, atol=1e-6)


@FORMS
def test_a_merged_member_leaves_the_group_and_the_rest_stay_exact(form):
    model, batch = applied("llama", form=form), batch_for("llama")
    layers = tuner.sparse_layers(model)
    layers["model.layers.0.self_attn.k_proj"].merge()
    _, with_groups = gradients(model, batch)
    _, plain = gradients(ungrouped(model), batch)
    for name in plain:
        torch.testing.assert_close(with_groups[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)


@FORMS
def test_grouping_keeps_no_more_for_backward(form):
    model, batch = applied("llama", form=form), batch_for("llama")
    with SavedTensorCounter(exclude=model_tensors(model)) as counted:
        model(**batch).loss.backward()
    with SavedTensorCounter(exclude=model_tensors(model)) as plain:
        ungrouped(model)(**batch).loss.backward()
    assert counted.bytes <= plain.bytes


def test_assign_groups_resets_layers_that_no_longer_group():
    model = applied("llama")
    layers = tuner.sparse_layers(model)
    only_q = {n: l for n, l in layers.items() if n.endswith("q_proj")}
    assert grouped.assign_groups(only_q) == []
    assert all(layer.row_group is None for layer in only_q.values())


@pytest.mark.parametrize("reentrant", [False, True])
@FORMS
def test_grouped_updates_under_gradient_checkpointing(reentrant, form):
    """Checkpointing runs each block's forward again in backward (and lets saved tensors be read only once)."""
    model, batch = applied("llama", form=form), batch_for("llama")
    _, plain = gradients(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    _, checkpointed = gradients(model, batch)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)


def test_layers_of_different_input_widths_do_not_group():
    """Cross-attention may give key/value another input width than query (BLIP-2's Q-Former): no common product."""
    model = applied("llama")
    layers = tuner.sparse_layers(model)
    q = layers["model.layers.0.self_attn.q_proj"]
    wide = {"a.self_attn.q_proj": q, "a.self_attn.k_proj": layers["model.layers.0.self_attn.k_proj"],
            "a.self_attn.v_proj": layers["model.layers.0.self_attn.v_proj"]}
    wide_in = q.in_features
    try:
        q.in_features = wide_in + 8                 # as if q read a wider input than its siblings
        groups = grouped.assign_groups(wide)
        assert len(groups) == 1 and q.row_group is None and len(groups[0].layers) == 2
    finally:
        q.in_features = wide_in


@FORMS
def test_layers_that_read_different_tensors_stop_grouping_and_keep_no_share(form):
    """Cross-attention (q reads the decoder, k/v the encoder) or cached generation (k/v not called): the group
    notices, computes each update alone from then on, and holds no share (a model with one still deep-copies)."""
    import copy
    model = applied("llama", form=form)
    layers = tuner.sparse_layers(model)
    q, k, v = (layers[f"model.layers.1.self_attn.{t}_proj"] for t in "qkv")
    decoder, encoder = torch.randn(2, 5, q.in_features), torch.randn(2, 7, q.in_features)
    for _ in range(2):                              # two forwards of a cross-attention block
        for x, layer in ((decoder, q), (encoder, k), (encoder, v)):
            torch.testing.assert_close(layer(x), expected(layer, x), rtol=1e-5, atol=1e-6)
    group = q.row_group
    assert group.shared_input is False and group._pending == {}
    copy.deepcopy(model)
    fresh = applied("llama", form=form)
    q2 = tuner.sparse_layers(fresh)["model.layers.1.self_attn.q_proj"]
    for step in range(3):                           # q leads each step; k and v never come (cached generation)
        q2(torch.randn(2, 1, q2.in_features))
    assert q2.row_group.shared_input is False and q2.row_group._pending == {}


@FORMS
def test_one_interrupted_forward_does_not_stop_grouping(form):
    model, batch = applied("llama", form=form), batch_for("llama")
    q = tuner.sparse_layers(model)["model.layers.1.self_attn.q_proj"]
    q(torch.randn(2, 5, q.in_features))             # as if the forward stopped after q (Ctrl-C, an error)
    loss = model(**batch).loss
    assert q.row_group.shared_input is True and q.row_group._pending == {}
    layers = tuner.sparse_layers(model).values()
    if form == "usual":
        assert "GroupedRowProductsBackward" in node_names(loss)
    else:                                           # grouped: fewer nodes than layers
        assert node_names(loss).count(NODES[form]) < len(layers)


@FORMS
def test_a_share_is_not_used_once_the_members_delta_changed(form):
    model = applied("llama", form=form)
    layers = tuner.sparse_layers(model)
    q, k = layers["model.layers.1.self_attn.q_proj"], layers["model.layers.1.self_attn.k_proj"]
    x = torch.randn(2, 5, q.in_features)
    q(x)
    with torch.no_grad():
        k.delta.add_(1.0)                           # e.g. an optimizer step or load_adapter between the two calls
    torch.testing.assert_close(k(x), expected(k, x), rtol=1e-5, atol=1e-6)


@FORMS
def test_a_group_deep_copies_and_pickles_with_a_share_pending(form):
    import copy
    import pickle
    model = applied("llama", form=form)
    q = tuner.sparse_layers(model)["model.layers.1.self_attn.q_proj"]
    q(torch.randn(2, 5, q.in_features, requires_grad=True))
    assert q.row_group._pending
    twin = copy.deepcopy(model)
    assert tuner.sparse_layers(twin)["model.layers.1.self_attn.q_proj"].row_group._pending == {}
    pickle.dumps(q.row_group)


@FORMS
def test_inference_mode_runs_ungrouped_with_the_same_outputs(form):
    model = applied("llama", form=form)
    batch = batch_for("llama")
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
    with torch.inference_mode():          # inference tensors have no version counter: the group steps aside
        got = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
