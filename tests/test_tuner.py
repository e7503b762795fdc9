"""apply / merge / unmerge / unload on tiny llama, gpt2 and bert, against dense float64 training whose
weight gradients are masked to the selected rows, columns and elements."""
import copy
import re

import pytest
import torch
from _reference import random_batches, train_beside_masked_dense
from torch import nn
from transformers.pytorch_utils import Conv1D

import rowsft
from rowsft.layers import ColumnSparseLinear, ElementSparseLinear, RowSparseLinear, SparseLinear, tuner
from rowsft.selection.choice import LayerChoice, Selection

VOCAB = 128


def weight_out_in(module):
    """(d_out, d_in) view of a plain module's weight, written independently of rowsft."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def shape_of(module):
    return tuple(weight_out_in(module).shape)


def mixed_selection(model, names_units, seed=0):
    """A selection mixing units: {name: unit}, a few random indices each."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, unit in names_units.items():
        d_out, d_in = shape_of(model.get_submodule(name))
        limit = {"row": d_out, "column": d_in, "element": d_out * d_in}[unit]
        k = {"row": 5, "column": 4, "element": 37}[unit]
        layers[name] = LayerChoice(unit, torch.sort(torch.randperm(limit, generator=g)[:k]).values, (d_out, d_in))
    return Selection(layers, meta={"metric": "random"})


def lm_batches(n, seed=0, batch=2, seq=8):
    return random_batches(n, batch, seq, VOCAB, seed)


LLAMA_UNITS = {"model.layers.0.self_attn.q_proj": "row", "model.layers.0.self_attn.o_proj": "column",
               "model.layers.0.mlp.up_proj": "element", "model.layers.1.mlp.down_proj": "row",
               "model.layers.1.self_attn.v_proj": "column", "model.layers.1.mlp.gate_proj": "row"}
GPT2_UNITS = {"transformer.h.0.attn.c_attn": "row", "transformer.h.0.attn.c_proj": "column",
              "transformer.h.0.mlp.c_fc": "element", "transformer.h.1.mlp.c_proj": "row",
              "transformer.h.1.attn.c_attn": "column"}


# ---------------------------------------------------------------- training equals masked dense training
OPTIMIZERS = {"adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)}


@pytest.mark.parametrize("arch, units", [("llama", LLAMA_UNITS), ("gpt2", GPT2_UNITS)])
@pytest.mark.parametrize("opt_name, steps", [("adamw", 3), ("sgd", 1), ("sgd", 3)])
def test_steps_equal_masked_dense_float64(arch, units, opt_name, steps):
    original = rowsft.tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64)   # eval(): no dropout
    selection = mixed_selection(original, units)
    reference, model, masks = train_beside_masked_dense(      # dense: the full weights train, their grads masked
        original, selection, OPTIMIZERS[opt_name], lm_batches(steps), lambda m: tuner.apply(m, selection))

    layers = tuner.sparse_layers(model)
    assert set(layers) == set(units)
    for name, layer in layers.items():
        update = weight_out_in(reference.get_submodule(name)).detach() - weight_out_in(original.get_submodule(name))
        assert torch.equal(update[~masks[name]], torch.zeros_like(update[~masks[name]]))
        torch.testing.assert_close(layer.delta_weight(), update, rtol=0, atol=1e-10)
        assert update.abs().max() > 1e-6     # it did train


# ---------------------------------------------------------------- exactness, merge, unload
BERT_UNITS = {"bert.encoder.layer.0.attention.self.query": "row", "bert.encoder.layer.0.attention.output.dense": "column",
              "bert.encoder.layer.1.intermediate.dense": "element"}


@pytest.mark.parametrize("arch, units", [("llama", LLAMA_UNITS), ("gpt2", GPT2_UNITS), ("bert", BERT_UNITS)])
def test_step0_merge_unmerge_unload(arch, units):
    original = rowsft.tiny_model(arch, vocab_size=VOCAB)
    batch = lm_batches(1)[0]
    with torch.no_grad():
        y0 = original(input_ids=batch["input_ids"]).logits
    weights0 = {n: p.detach().clone() for n, p in original.named_parameters()}
    model = copy.deepcopy(original)
    originals = {name: model.get_submodule(name) for name in units}
    tuner.apply(model, mixed_selection(model, units))
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, y0)
        for layer in tuner.sparse_layers(model).values():
            layer.update.normal_(0, 0.05)
        y = model(input_ids=batch["input_ids"]).logits
        assert not torch.allclose(y, y0)
        unloaded = tuner.unload(copy.deepcopy(model))            # drops the deltas
        assert not tuner.sparse_layers(unloaded)
        assert torch.equal(unloaded(input_ids=batch["input_ids"]).logits, y0)
        tuner.merge(model)
        assert all(layer.merged for layer in tuner.sparse_layers(model).values())
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, y, rtol=0, atol=1e-6)
        tuner.unmerge(model)
        for name, p in model.named_parameters():
            if name.replace(".base_layer", "") in weights0:
                torch.testing.assert_close(p, weights0[name.replace(".base_layer", "")], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, y, rtol=0, atol=1e-6)

        tuner.merge_and_unload(model)                            # keeps them
        assert not tuner.sparse_layers(model)
        for name, module in originals.items():
            assert model.get_submodule(name) is module
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, y, rtol=0, atol=1e-6)
    assert [n for n, p in model.named_parameters()] == [n for n, p in original.named_parameters()]
    assert all(p.requires_grad for p in model.parameters()), "unload restores requires_grad"
    tuner.apply(model, mixed_selection(model, units))            # a plain model again: apply works


# ---------------------------------------------------------------- counting
def test_trainable_parameter_counts_per_unit():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    _, total0 = tuner.trainable_parameters(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "layers" in n]
    for unit, per_layer in (("row", lambda k, s: k * s[1]), ("column", lambda k, s: k * s[0]),
                            ("element", lambda k, s: k)):
        m = copy.deepcopy(model)
        sel = mixed_selection(m, dict.fromkeys(names, unit))
        tuner.apply(m, sel)
        expected = sum(per_layer(c.k, c.shape) for c in sel.layers.values())
        trainable, total = tuner.trainable_parameters(m)
        assert trainable == expected == sel.trainable_parameters
        assert total == total0 + expected
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected


def test_print_trainable_parameters_peft_format(capsys):
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    sel = mixed_selection(model, LLAMA_UNITS)
    tuner.apply(model, sel)
    tuner.print_trainable_parameters(model)
    line = capsys.readouterr().out.strip()
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trainable = sel.trainable_parameters
    assert line == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                    f"trainable%: {100 * trainable / total:.4f}")
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", line)


def test_train_heads_on_bert_classifier():
    model = rowsft.tiny_model("bert", vocab_size=VOCAB)
    sel = mixed_selection(model, {"bert.encoder.layer.0.attention.self.query": "row",
                                  "bert.encoder.layer.1.output.dense": "column"})
    tuner.apply(model, sel, train_heads=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    head = sum(p.numel() for p in model.classifier.parameters())
    assert tuner.trainable_parameters(model)[0] == sel.trainable_parameters + head
    assert tuner.trained_heads(model) == ["classifier"]
    llama = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="found no head"):
        tuner.apply(llama, mixed_selection(llama, {"model.layers.0.mlp.up_proj": "row"}), train_heads=True)


def test_current_selection_roundtrip():
    model = rowsft.tiny_model("gpt2", vocab_size=VOCAB)
    sel = mixed_selection(model, GPT2_UNITS)
    tuner.apply(model, sel)
    got = tuner.current_selection(model)
    assert got.to_dict() == sel.to_dict()


# ---------------------------------------------------------------- precision and checkpointing
def test_bf16_model_fp32_updates_train_and_merge():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16)
    w0 = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tuner.apply(model, mixed_selection(model, LLAMA_UNITS), delta_dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = lm_batches(1)[0]
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with torch.no_grad():
        y = model(input_ids=batch["input_ids"]).logits.float()
        tuner.merge(model)
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, w0)
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits.float(), y, rtol=0.05, atol=0.05)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_gives_same_gradients():
    base = rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.float64)
    sel = mixed_selection(base, LLAMA_UNITS)
    plain = tuner.apply(copy.deepcopy(base), sel).train()
    ckpt = tuner.apply(copy.deepcopy(base), sel).train()
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ckpt.model.gradient_checkpointing
    with torch.no_grad():
        for m in (plain, ckpt):
            torch.manual_seed(0)
            for layer in tuner.sparse_layers(m).values():
                layer.update.normal_(0, 0.05)
    batch = lm_batches(1)[0]
    calls = []
    next(iter(tuner.sparse_layers(ckpt).values())).register_forward_hook(lambda *args: calls.append(1))
    plain(**batch, use_cache=False).loss.backward()
    ckpt(**batch, use_cache=False).loss.backward()
    assert len(calls) == 2, "the checkpointed layer is recomputed in backward"
    for (n, a), (_, b) in zip(tuner.sparse_layers(plain).items(), tuner.sparse_layers(ckpt).items()):
        assert a.update.grad is not None and a.update.grad.abs().max() > 0, n
        torch.testing.assert_close(b.update.grad, a.update.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- errors
def test_unknown_module_lists_similar_names():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    sel = Selection({"model.layers.0.mlp.up_prj": LayerChoice("row", [0], (128, 64))})
    with pytest.raises(KeyError, match="model.layers.0.mlp.up_proj"):
        tuner.apply(model, sel)
    assert not tuner.sparse_layers(model)


def test_non_linear_and_shape_mismatch_and_apply_twice():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    with pytest.raises(TypeError, match="LlamaRMSNorm"):
        tuner.apply(model, Selection({"model.layers.0.input_layernorm": LayerChoice("row", [0], (64, 64))}))
    with pytest.raises(ValueError, match=r"\(128, 32\).*\(128, 64\)"):
        tuner.apply(model, Selection({"model.layers.0.mlp.up_proj": LayerChoice("row", [0], (128, 32))}))
    with pytest.raises(IndexError, match="must lie in"):
        tuner.apply(model, Selection({"model.layers.0.mlp.up_proj": LayerChoice("row", [128], (128, 64))}))
    assert all(p.requires_grad for p in model.parameters()), "a refused apply changes nothing"
    tuner.apply(model, mixed_selection(model, LLAMA_UNITS))
    with pytest.raises(RuntimeError, match="unload"):
        tuner.apply(model, mixed_selection(model, {"model.layers.1.mlp.up_proj": "row"}))


def test_layer_classes_by_unit():
    model = rowsft.tiny_model("gpt2", vocab_size=VOCAB)
    tuner.apply(model, mixed_selection(model, GPT2_UNITS))
    kinds = {n: type(layer) for n, layer in tuner.sparse_layers(model).items()}
    expected = {"row": RowSparseLinear, "column": ColumnSparseLinear, "element": ElementSparseLinear}
    assert kinds == {n: expected[u] for n, u in GPT2_UNITS.items()}
    assert all(isinstance(layer.base_layer, Conv1D) for layer in tuner.sparse_layers(model).values())
    assert isinstance(model.transformer.h[0].attn.c_attn, SparseLinear)


def test_plain_dict_means_rows_and_tied_weights_refuse_merge():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    tuner.apply(model, {"model.layers.0.mlp.up_proj": [3, 1], "lm_head": torch.tensor([5])})
    sel = tuner.current_selection(model)
    assert sel.unit("model.layers.0.mlp.up_proj") == "row" and sel["model.layers.0.mlp.up_proj"].tolist() == [1, 3]
    assert tuner.trainable_parameters(model)[0] == 2 * 64 + 64
    with pytest.raises(RuntimeError, match=r"tied to \['model.embed_tokens.weight'\]"):
        tuner.merge(model)
    assert not any(layer.merged for layer in tuner.sparse_layers(model).values())
