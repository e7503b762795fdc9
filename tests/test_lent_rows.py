"""Rows lent to the weight for each product (`rowsft.layers.lent_rows`, the default over float32/float64 weights).

References written without the code under test: dense float64 training with the weight gradients masked to the
selected rows (`_reference.train_beside_masked_dense`), and the pretrained weight cloned before anything ran. Rows
trained in the weight (``train_in_weight=True``) compute the very same products, so lent rows must equal them bit for
bit; the usual update (``lend_rows=False``) sums ``x W0ᵀ + x deltaᵀ`` instead, equal to float rounding.
"""
import copy
import threading

import pytest
import torch
from _reference import node_names, out_in, random_batches, selection_for, train_beside_masked_dense

import rowsft
from rowsft.layers import group_products, tuner
from rowsft.layers.forward_paths import lends_rows
from rowsft.layers.lent_rows import LENDING_LOCK

VOCAB = 128
LLAMA_ROWS = {f"model.layers.{b}.{m}": "row" for b in (0, 1)
              for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
GPT2_ROWS = {"transformer.h.0.attn.c_attn": "row", "transformer.h.0.attn.c_proj": "row",
             "transformer.h.1.mlp.c_fc": "row", "transformer.h.1.mlp.c_proj": "row"}


def batches(n, seed=0):
    return random_batches(n, 2, 8, VOCAB, seed)


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter but the updates as it stands, cloned, by its plain name (``.base_layer`` left out)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if not n.endswith("delta")}


def assert_pretrained(model, pretrained) -> None:
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, pretrained[name]), name


def with_updates(model, std=0.05, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in tuner.sparse_layers(model).values():
            layer.update.normal_(std=std)
    return model


@pytest.mark.parametrize("arch, units", [("llama", LLAMA_ROWS), ("gpt2", GPT2_ROWS)])
@pytest.mark.parametrize("lend", [True, False], ids=["lent", "usual"])
def test_three_adamw_steps_equal_masked_dense_float64(arch, units, lend):
    original = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)
    selection = selection_for(original, units)
    make = lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.0)   # noqa: E731
    reference, model, _ = train_beside_masked_dense(original, selection, make, batches(3),
                                                    lambda m: tuner.apply(m, selection, lend_rows=lend))
    for name, layer in tuner.sparse_layers(model).items():
        update = out_in(reference.get_submodule(name)).detach() - out_in(original.get_submodule(name))
        torch.testing.assert_close(layer.delta_weight(), update, rtol=0, atol=1e-10)
        assert update.abs().max() > 1e-6
    assert_pretrained(model, base_weights(original))             # the base weights never kept a lent row


@pytest.mark.parametrize("arch, units", [("llama", LLAMA_ROWS), ("gpt2", GPT2_ROWS)])
def test_lent_rows_train_bit_for_bit_as_rows_trained_in_the_weight(arch, units):
    original = rowsft.tiny_model(arch, vocab_size=VOCAB, seed=2)
    selection = selection_for(original, units)
    lent = tuner.apply(copy.deepcopy(original), selection)
    inside = tuner.apply(copy.deepcopy(original), selection, train_in_weight=True)
    usual = tuner.apply(copy.deepcopy(original), selection, lend_rows=False)
    losses = {}
    for key, model in (("lent", lent), ("inside", inside), ("usual", usual)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        losses[key] = []
        for batch in batches(3, seed=4):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[key].append(loss.item())
    assert losses["lent"] == losses["inside"]                     # the same products as rows in the weight
    torch.testing.assert_close(torch.tensor(losses["lent"]), torch.tensor(losses["usual"]), rtol=1e-5, atol=0)
    for (name, a), (_, b), (_, c) in zip(tuner.sparse_layers(lent).items(), tuner.sparse_layers(inside).items(),
                                         tuner.sparse_layers(usual).items()):
        assert torch.equal(a.delta, b.delta), name
        torch.testing.assert_close(a.delta, c.delta, rtol=1e-4, atol=1e-6, msg=name)   # another sum: rounding
    assert_pretrained(lent, base_weights(original))


def test_inside_each_product_the_weight_holds_its_rows_and_outside_it_the_pretrained_values(monkeypatch):
    model = with_updates(tuner.apply(rowsft.tiny_model("llama", vocab_size=VOCAB), selection_for(
        rowsft.tiny_model("llama", vocab_size=VOCAB), LLAMA_ROWS)))
    pretrained = base_weights(model)
    layers = list(tuner.sparse_layers(model).values())
    seen = {"forward": 0, "backward": 0}

    def check_rows(weight, phase):
        layer = next(m for m in layers if m.base_layer.weight.data_ptr() == weight.data_ptr())
        rows = pretrained[layer.label + ".weight"].index_select(0, layer.indices) + layer.delta.detach()
        assert torch.equal(weight.index_select(0, layer.indices), rows), layer.label
        others = torch.ones(weight.shape[0], dtype=torch.bool)
        others[layer.indices] = False
        assert torch.equal(weight[others], pretrained[layer.label + ".weight"][others]), layer.label
        seen[phase] += 1

    real_linear, real_grad = group_products.frozen_linear, group_products.frozen_input_grad

    def linear(x, weight, *args):
        check_rows(weight, "forward")
        return real_linear(x, weight, *args)

    def input_grad(grad_out, weight, *args):
        check_rows(weight, "backward")
        return real_grad(grad_out, weight, *args)

    monkeypatch.setattr(group_products, "frozen_linear", linear)
    monkeypatch.setattr(group_products, "frozen_input_grad", input_grad)
    loss = model(**batches(1)[0]).loss
    assert_pretrained(model, pretrained)                           # between forward and backward
    loss.backward()
    assert_pretrained(model, pretrained)
    assert seen["forward"] == len(layers) and seen["backward"] >= 6    # every product lent (grad x: 3 nodes a block)


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_product_that_raises_leaves_the_pretrained_weight(phase, monkeypatch):
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    model = with_updates(tuner.apply(copy.deepcopy(original), selection_for(original, LLAMA_ROWS)))
    pretrained = base_weights(model)

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the frozen product")

    name = "frozen_linear" if phase == "forward" else "frozen_input_grad"
    if phase == "backward":
        loss = model(**batches(1)[0]).loss
    monkeypatch.setattr(group_products, name, broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        (model(**batches(1)[0]).loss if phase == "forward" else loss).backward()
    assert_pretrained(model, pretrained)
    monkeypatch.undo()
    model(**batches(1)[0]).loss.backward()                          # and the model trains on
    assert_pretrained(model, pretrained)


def test_which_updates_are_lent():
    model = tuner.apply(rowsft.tiny_model("llama", vocab_size=VOCAB),
                        selection_for(rowsft.tiny_model("llama", vocab_size=VOCAB),
                                      {**LLAMA_ROWS, "model.layers.0.self_attn.o_proj": "column"}))
    layers = tuner.sparse_layers(model)
    q, o = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.o_proj"]
    x = torch.randn(2, 3, q.in_features)
    lent = lambda layer: lends_rows(layer.unit, layer.lend_rows, layer.base_layer, x, layer.update)   # noqa: E731
    assert lent(q) and not lent(o)                                 # rows only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lent(q)                                         # under autocast: rows in the kept cast
    q.lend_rows = False
    assert not lent(q)
    q.lend_rows = True
    handle = q.base_layer.register_forward_hook(lambda *a: None)
    assert not lent(q)                                             # a hooked base runs as is
    handle.remove()
    half = tuner.apply(rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16),
                       {"model.layers.0.self_attn.q_proj": torch.tensor([0, 3])})
    h = tuner.sparse_layers(half)["model.layers.0.self_attn.q_proj"]
    assert not lends_rows("row", True, h.base_layer, x.bfloat16(), h.update)     # an update would vanish in bf16
    wide = tuner.apply(rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16),
                       {"model.layers.0.self_attn.q_proj": torch.tensor([0, 3])}, delta_dtype=torch.float32)
    w = tuner.sparse_layers(wide)["model.layers.0.self_attn.q_proj"]
    assert not lends_rows("row", True, w.base_layer, x.bfloat16(), w.update)


def test_threads_running_the_same_model_neither_see_nor_keep_lent_rows():
    """A notebook cell evaluating while the launcher trains in its thread: every product holds the lock, so each
    thread's losses are what one thread alone computes and the weights come back pretrained."""
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    model = with_updates(tuner.apply(copy.deepcopy(original), selection_for(original, LLAMA_ROWS)))
    pretrained = base_weights(model)
    batch = batches(1)[0]
    alone = model(**batch).loss.item()
    with torch.no_grad():
        alone_eval = model(**batch).loss.item()
    results, errors = {"train": [], "eval": []}, []

    def run(kind):
        try:
            for _ in range(40):
                if kind == "train":
                    loss = model(**batch).loss
                    loss.backward()
                else:
                    with torch.no_grad():
                        loss = model(**batch).loss
                results[kind].append(loss.item())
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(kind,)) for kind in ("train", "eval")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(results["train"]) == {alone} and set(results["eval"]) == {alone_eval}
    assert_pretrained(model, pretrained)


def test_a_merge_waits_for_a_product_in_another_thread():
    model = with_updates(tuner.apply(rowsft.tiny_model("llama", vocab_size=VOCAB),
                                     {"model.layers.0.self_attn.q_proj": torch.tensor([1, 4])}))
    done = threading.Event()
    with LENDING_LOCK:                                             # as a lending product in flight would hold it
        merging = threading.Thread(target=lambda: (tuner.merge(model), done.set()))
        merging.start()
        assert not done.wait(0.3)
    merging.join()
    assert done.is_set()


def test_lent_rows_keep_nothing_more_for_backward_than_the_usual_update():
    from rowsft.memory import SavedTensorCounter, model_tensors
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = selection_for(original, LLAMA_ROWS)
    counted = {}
    for lend in (True, False):
        model = with_updates(tuner.apply(copy.deepcopy(original), selection, lend_rows=lend))
        with SavedTensorCounter(exclude=model_tensors(model)) as counter:
            model(**batches(1)[0]).loss.backward()
        counted[lend] = counter.bytes
    assert counted[True] <= counted[False]


@pytest.mark.parametrize("lend", [True, False])
def test_the_peft_method_lends_as_rowsft_apply_does(lend):
    from peft import get_peft_model

    from rowsft.integrations import RowSFTConfig
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = selection_for(original, LLAMA_ROWS)
    peft_model = get_peft_model(copy.deepcopy(original), RowSFTConfig.from_selection(selection, lend_rows=lend))
    applied = tuner.apply(copy.deepcopy(original), selection, lend_rows=lend, group_updates=False)
    for model in (peft_model, applied):
        with_updates(model)
    batch = batches(1)[0]
    counts = [node_names(model(**batch).loss).count("LentRowProductsBackward") for model in (peft_model, applied)]
    assert counts[0] == counts[1] == (len(LLAMA_ROWS) if lend else 0)
