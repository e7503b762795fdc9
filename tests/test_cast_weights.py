"""Base weights kept in the autocast dtype across steps (`rowsft.layers.cast_weights`, ``apply(keep_cast_weights=)``).

The copy must change no bit: training under bf16 autocast with kept casts equals training with a fresh cast in
every forward and backward (``keep_cast_weights=False``, the path the float64 and bf16 tests of the layers check),
and outputs with the adapter disabled equal the model never touched by rowsft. The copy must follow the weight:
an in-place edit, ``load_state_dict`` or rows taken out of the weight are seen at the next forward."""
import copy
import gc
import weakref

import pytest
import torch
from _reference import MIXED_UNITS, adamw_steps, assert_train_alike, logits_bf16, out_in, random_batches, selection_for

import rowsft
from rowsft.integrations.rowsft_model import RowSFTModel
from rowsft.layers import tuner
from rowsft.layers.cast_weights import cast_weight, kept_bytes

VOCAB = 128
UNITS = MIXED_UNITS
MODES = {"grouped": {}, "ungrouped": {"group_updates": False}, "in-weight": {"train_in_weight": True},
         "inputs-kept": {"rebuild_inputs": False}}




def batches(n, seed=0):
    return random_batches(n, 2, 8, VOCAB, seed)


def pair(arch="llama", **apply_kwargs):
    """(the untouched model, rowsft with kept casts, rowsft casting every time), same selection and weights. Rows
    take the usual update here (``train_in_cast=False``): rows written into the kept casts have their own tests
    (`tests/test_rows_in_cast.py`)."""
    apply_kwargs.setdefault("train_in_cast", False)
    original = rowsft.tiny_model(arch, vocab_size=VOCAB)
    selection = selection_for(original, UNITS[arch])
    kept = tuner.apply(copy.deepcopy(original), selection, **apply_kwargs)
    fresh = tuner.apply(copy.deepcopy(original), selection, keep_cast_weights=False, **apply_kwargs)
    return original, kept, fresh


def train_bf16(model, steps) -> list[float]:
    return adamw_steps(model, steps, autocast=True)



@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("mode", list(MODES))
def test_kept_casts_change_no_bit_of_bf16_training(arch, mode):
    _, kept, fresh = pair(arch, **MODES[mode])
    steps = batches(3)
    assert_train_alike(kept, fresh, steps)
    assert kept_bytes(kept) > 0 and kept_bytes(fresh) == 0
    assert torch.equal(logits_bf16(kept, batches(1, seed=4)[0]), logits_bf16(fresh, batches(1, seed=4)[0]))


def test_one_copy_per_trained_row_or_column_weight_reused_across_steps_and_freed_with_the_model():
    _, kept, _ = pair()
    train_bf16(kept, batches(2))
    layers = tuner.sparse_layers(kept)
    expected = sum(out_in(layer.base_layer).numel() * 2 for layer in layers.values() if layer.unit != "element")
    assert kept_bytes(kept) == expected                   # bf16 copies of the row and column layers' weights only
    q = layers["model.layers.0.self_attn.q_proj"].base_layer
    copy_before = cast_weight(q, torch.bfloat16)
    train_bf16(kept, batches(1, seed=3))
    assert cast_weight(q, torch.bfloat16) is copy_before  # the same tensor: not cast again
    ref = weakref.ref(copy_before)
    del copy_before, q, layers, kept
    gc.collect()
    assert ref() is None


def test_no_copy_without_autocast_or_over_a_bf16_model():
    _, kept, _ = pair()
    opt = torch.optim.AdamW([p for p in kept.parameters() if p.requires_grad], lr=1e-2)
    kept(**batches(1)[0]).loss.backward()
    opt.step()
    assert kept_bytes(kept) == 0
    original = rowsft.tiny_model("llama", vocab_size=VOCAB, dtype=torch.bfloat16)
    bf16 = tuner.apply(original, selection_for(original, UNITS["llama"]))
    train_bf16(bf16, batches(1))
    assert kept_bytes(bf16) == 0


@pytest.mark.parametrize("mode", ["grouped", "in-weight"])
def test_a_kept_copy_follows_in_place_edits_and_loaded_weights(mode):
    _, kept, fresh = pair(**MODES[mode])
    train_bf16(kept, batches(1))
    train_bf16(fresh, batches(1))
    batch = batches(1, seed=6)[0]
    for model in (kept, fresh):                             # an in-place edit of a trained layer's weight
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.base_layer.weight.mul_(1.5)
    assert torch.equal(logits_bf16(kept, batch), logits_bf16(fresh, batch))
    other = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=7).state_dict()
    for model in (kept, fresh):                             # new base weights through load_state_dict
        state = model.state_dict()
        state.update({k: other[k.replace(".base_layer", "")] for k in state if k.endswith("base_layer.weight")})
        model.load_state_dict(state)
    assert torch.equal(logits_bf16(kept, batch), logits_bf16(fresh, batch))
    assert not torch.equal(logits_bf16(kept, batch), logits_bf16(pair()[1], batch))


def test_rows_taken_out_of_the_weight_leave_no_trained_row_in_the_copy():
    original, kept, fresh = pair(train_in_weight=True)
    for model in (kept, fresh):
        train_bf16(model, batches(2))
    batch = batches(1, seed=8)[0]
    wrapped = RowSFTModel(kept)
    with wrapped.disable_adapter():                         # the base model, as never touched
        assert torch.equal(logits_bf16(kept, batch), logits_bf16(original, batch))
    for model in (kept, fresh):                             # the usual rows again: pretrained rows + delta added
        for layer in tuner.sparse_layers(model).values():
            layer.set_train_in_weight(False)
    assert torch.equal(logits_bf16(kept, batch), logits_bf16(fresh, batch))


def test_live_memory_counts_the_kept_copies():
    _, kept, fresh = pair()
    for model in (kept, fresh):
        train_bf16(model, batches(1))
    assert rowsft.memory.live_bytes(kept) - rowsft.memory.live_bytes(fresh) == kept_bytes(kept) > 0


def test_no_copy_under_torch_compile():
    """A compiled graph casts inside itself; the kept copy (state outside the graph) is not used there."""
    torch._dynamo.reset()
    _, kept, fresh = pair(rebuild_inputs=False)
    batch = batches(1, seed=9)[0]
    compiled = torch.compile(kept, backend="eager", fullgraph=False)
    assert torch.equal(logits_bf16(compiled, batch), logits_bf16(fresh, batch))
    assert kept_bytes(kept) == 0


def test_unload_frees_the_copies():
    _, kept, _ = pair()
    train_bf16(kept, batches(1))
    assert kept_bytes(kept) > 0
    tuner.unload(kept)
    assert kept_bytes(kept) == 0


@pytest.mark.parametrize("ending", ["unload", "merge_and_unload"])
def test_the_peft_method_keeps_casts_too_with_the_same_bits_and_frees_them(ending):
    from peft import get_peft_model

    from rowsft.integrations import RowSFTConfig
    original = rowsft.tiny_model("llama", vocab_size=VOCAB)
    selection = selection_for(original, UNITS["llama"])
    kept = get_peft_model(copy.deepcopy(original), RowSFTConfig.from_selection(selection, train_in_cast=False))
    fresh = get_peft_model(copy.deepcopy(original), RowSFTConfig.from_selection(selection, keep_cast_weights=False,
                                                                                train_in_cast=False))
    steps = batches(2)
    assert train_bf16(kept, steps) == train_bf16(fresh, steps)
    assert kept_bytes(kept) > 0 and kept_bytes(fresh) == 0
    batch = batches(1, seed=5)[0]
    assert torch.equal(logits_bf16(kept, batch), logits_bf16(fresh, batch))
    plain = getattr(kept, ending)()
    assert kept_bytes(plain) == 0


@pytest.mark.parametrize("mode", ["grouped", "in-weight"])
def test_kept_casts_under_gradient_checkpointing_change_no_bit(mode):
    _, kept, fresh = pair(**MODES[mode])
    for model in (kept, fresh):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = batches(2)
    assert_train_alike(kept, fresh, steps)
    assert kept_bytes(kept) > 0
