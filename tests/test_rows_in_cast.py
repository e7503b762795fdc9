"""Rows trained in the kept autocast cast (the default under autocast: ``apply(train_in_cast=True)``).

Reference: rows trained in the weight, the weight cast afresh in every forward and backward
(``train_in_weight=True, keep_cast_weights=False``): the frozen product over ``bf16(W0[idx] + delta)`` with none of
the kept-copy machinery. Rows in the cast must train as that does, bit for bit, while the base weight itself never
changes; the plain cast must never be handed out with trained rows in it, and rows of other indices (a new
selection, another peft adapter) must leave none of theirs behind."""
import copy

import pytest
import torch
from _reference import MIXED_UNITS, adamw_steps, assert_train_alike, logits_bf16, random_batches, selection_for

import rowsft
from rowsft.integrations.rowsft_model import RowSFTModel
from rowsft.layers import tuner
from rowsft.layers.cast_weights import cast_weight, kept_bytes
from rowsft.layers.in_weight import trains_in_cast

VOCAB = 128
UNITS = MIXED_UNITS
MODES = {"grouped": {}, "ungrouped": {"group_updates": False}, "inputs-kept": {"rebuild_inputs": False}}
REFERENCE = {"train_in_weight": True, "keep_cast_weights": False}




def batches(n, seed=0):
    return random_batches(n, 2, 8, VOCAB, seed)


def pair(arch="llama", **apply_kwargs):
    """(the untouched model, rows in the cast (the default), the reference), same selection and weights."""
    original = rowsft.tiny_model(arch, vocab_size=VOCAB)
    selection = selection_for(original, UNITS[arch])
    in_cast = tuner.apply(copy.deepcopy(original), selection, **apply_kwargs)
    reference = tuner.apply(copy.deepcopy(original), selection, **REFERENCE, **apply_kwargs)
    return original, in_cast, reference


def train_bf16(model, steps) -> list[float]:
    return adamw_steps(model, steps, autocast=True)



def base_weights_untouched(model, original) -> bool:
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return all(torch.equal(state[k], v) for k, v in original.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", list(MODES))
def test_rows_in_the_cast_train_as_rows_in_the_weight_bit_for_bit_and_leave_the_weight_alone(arch, mode):
    original, in_cast, reference = pair(arch, **MODES[mode])
    steps = batches(3)
    assert_train_alike(in_cast, reference, steps)
    for name, layer in tuner.sparse_layers(in_cast).items():
        assert not hasattr(layer, "pretrained_rows"), name     # no copy of the pretrained rows is kept
    assert torch.equal(logits_bf16(in_cast, batches(1, seed=4)[0]), logits_bf16(reference, batches(1, seed=4)[0]))
    assert base_weights_untouched(in_cast, original)            # every parameter, the trained layers' weights too


def test_rows_go_into_the_cast_only_for_row_layers_under_autocast_with_kept_casts():
    _, in_cast, _ = pair()
    layers = tuner.sparse_layers(in_cast)
    x = torch.randn(2, 3, 32)
    q, o = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.self_attn.o_proj"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert trains_in_cast(q, x)
        assert not trains_in_cast(o, x)                         # a column layer
        assert not trains_in_cast(layers["model.layers.0.mlp.up_proj"], x)   # an element layer
        for off in ("train_in_cast", "keep_cast_weight"):
            setattr(q, off, False)
            assert not trains_in_cast(q, x), off
            setattr(q, off, True)
    assert not trains_in_cast(q, x)                             # no autocast


def test_without_autocast_rows_train_the_usual_way():
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = selection_for(original, UNITS["llama"])
    default = tuner.apply(copy.deepcopy(original), selection)
    usual = tuner.apply(copy.deepcopy(original), selection, train_in_cast=False)
    steps = batches(2)
    assert_train_alike(default, usual, steps, autocast=False)
    assert kept_bytes(default) == 0


def test_the_plain_cast_never_holds_trained_rows():
    _, in_cast, reference = pair()
    train_bf16(in_cast, batches(2))
    train_bf16(reference, batches(2))
    q = tuner.sparse_layers(in_cast)["model.layers.0.self_attn.q_proj"].base_layer
    plain = cast_weight(q, torch.bfloat16)                      # e.g. what a column update of this weight would read
    assert torch.equal(plain, q.weight.to(torch.bfloat16))
    batch = batches(1, seed=5)[0]
    assert torch.equal(logits_bf16(in_cast, batch), logits_bf16(reference, batch))    # the rows written again
    assert torch.equal(plain, q.weight.to(torch.bfloat16))      # ... into a copy of their own


def test_new_indices_leave_no_row_of_the_old_ones_in_the_copy():
    original, in_cast, _ = pair()
    train_bf16(in_cast, batches(2))
    moved = selection_for(original, UNITS["llama"], seed=1)
    reference = tuner.apply(copy.deepcopy(original), moved, **REFERENCE)
    for (name, layer), ref in zip(tuner.sparse_layers(in_cast).items(), tuner.sparse_layers(reference).values()):
        assert not torch.equal(layer.indices, ref.indices.to(layer.indices.dtype)), name
        layer.indices = ref.indices.clone()                     # the same deltas, on other rows
        with torch.no_grad():
            ref.update.copy_(layer.update)
    batch = batches(1, seed=6)[0]
    assert torch.equal(logits_bf16(in_cast, batch), logits_bf16(reference, batch))


def test_disable_adapter_merge_and_state_dict_see_the_pretrained_weight():
    original, in_cast, reference = pair()
    for model in (in_cast, reference):
        train_bf16(model, batches(2))
    batch = batches(1, seed=7)[0]
    with RowSFTModel(in_cast).disable_adapter():
        assert torch.equal(logits_bf16(in_cast, batch), logits_bf16(original, batch))
    assert torch.equal(logits_bf16(in_cast, batch), logits_bf16(reference, batch))
    merged, merged_reference = tuner.merge_and_unload(in_cast), tuner.merge_and_unload(reference)
    for (name, a), b in zip(merged.state_dict().items(), merged_reference.state_dict().values()):
        assert torch.equal(a, b), name                          # folded onto the pretrained rows alike
    assert kept_bytes(merged) == 0


def test_inference_mode_under_autocast_then_training():
    """A copy cast under inference mode is an inference tensor, which autograd cannot save: cast again after."""
    _, in_cast, reference = pair()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        in_cast(input_ids=batches(1, seed=8)[0]["input_ids"])
    steps = batches(2)
    assert train_bf16(in_cast, steps) == train_bf16(reference, steps)
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)             # the plain kept casts alike
    selection = selection_for(original, UNITS["llama"])
    usual = tuner.apply(copy.deepcopy(original), selection, train_in_cast=False)
    recast = tuner.apply(copy.deepcopy(original), selection, train_in_cast=False, keep_cast_weights=False)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        usual(input_ids=batches(1, seed=8)[0]["input_ids"])
    assert train_bf16(usual, steps) == train_bf16(recast, steps)


def test_gradient_checkpointing_changes_no_bit():
    _, in_cast, reference = pair()
    for model in (in_cast, reference):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = batches(2)
    assert_train_alike(in_cast, reference, steps)


def test_the_peft_method_trains_rows_in_the_cast_as_rowsft_apply():
    from peft import get_peft_model

    from rowsft.integrations import RowSFTConfig
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = selection_for(original, UNITS["llama"])
    peft_model = get_peft_model(copy.deepcopy(original), RowSFTConfig.from_selection(selection))
    applied = tuner.apply(copy.deepcopy(original), selection, group_updates=False)
    steps = batches(2)
    assert train_bf16(peft_model, steps) == train_bf16(applied, steps)
    deltas = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(deltas) == len(tuner.sparse_layers(applied))
    for (name, a), b in zip(sorted(deltas.items()), [tuner.sparse_layers(applied)[n] for n in sorted(
            tuner.sparse_layers(applied))]):
        assert torch.equal(a, b.update), name
    plain = peft_model.unload()
    assert base_weights_untouched(plain, original) and kept_bytes(plain) == 0


def test_another_peft_adapter_finds_none_of_the_first_ones_rows():
    from peft import get_peft_model

    from rowsft.integrations import RowSFTConfig
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    first = {"model.layers.0.self_attn.q_proj": [0, 3, 5]}
    model = get_peft_model(copy.deepcopy(original), RowSFTConfig.from_selection(tuner.as_selection(original, first)))
    train_bf16(model, batches(2))
    model.add_adapter("other", RowSFTConfig.from_selection(tuner.as_selection(
        original, {"model.layers.0.self_attn.q_proj": [1, 2, 7]})))
    model.set_adapter("other")                                  # zero deltas on other rows: the pretrained model
    batch = batches(1, seed=9)[0]
    assert torch.equal(logits_bf16(model, batch), logits_bf16(original, batch))
    model.set_adapter("default")
    assert not torch.equal(logits_bf16(model, batch), logits_bf16(original, batch))
