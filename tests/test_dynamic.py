"""Dynamic SPEFT masks (rowsft.training.dynamic) against an independent dense float64 reference.

The reference fine-tunes the dense target weights of a copy of the model with AdamW written out by
hand, a gradient mask, the loop's gradient clipping and linear learning-rate decay; at a
reselection it recomputes its mask from its own dense gradient salience ``|G|`` (per-layer mean
normalisation, one global top-k, every layer's best entry first) and keeps the moments of kept
entries, zero for new ones, none for dropped ones, with the step count shared.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from _reference import dense_loss

from rowsft.data import models as zoo
from rowsft.layers import tuner
from rowsft import memory
from rowsft.selection import TotalParams
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape, weight_out_in
from rowsft.training import train
from rowsft.training.dynamic import DynamicMask, reselect_mask

VOCAB = 128
LR, WD, BETAS, EPS, CLIP = 1e-2, 0.1, (0.9, 0.999), 1e-8, 0.3  # clipping binds on some steps


# ---------------------------------------------------------------- fixtures
def tiny(arch: str, dtype=torch.float64):
    model = zoo.tiny_model(arch, vocab_size=VOCAB, seed=0, dtype=dtype)
    for m in model.modules():  # dropout off: the reference and the sparse run must see the same function
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def token_batches(n: int, seed: int, batch: int = 2, seq: int = 12) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def random_element_selection(model, fraction: float = 0.05, seed: int = 1) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model).items():
        d_out, d_in = linear_shape(module)
        k = max(1, int(fraction * d_out * d_in))
        layers[name] = LayerChoice("element", torch.randperm(d_out * d_in, generator=gen)[:k], (d_out, d_in))
    return Selection(layers)


def masks_of(selection: Selection) -> dict[str, torch.Tensor]:
    out = {}
    for name, choice in selection.layers.items():
        mask = torch.zeros(choice.shape[0] * choice.shape[1], dtype=torch.bool)
        mask[choice.indices] = True
        out[name] = mask.view(choice.shape)
    return out


def effective_weight(layer) -> torch.Tensor:
    """(d_out, d_in) weight the sparse layer computes with: base (+ update unless merged)."""
    base = weight_out_in(layer).detach()
    return base if layer.merged else base + layer.delta_weight()


# ---------------------------------------------------------------- the independent reference
class DenseReference:
    """Dense float64 fine-tuning of the target weights with a masked gradient; AdamW by hand."""

    def __init__(self, model, masks: dict[str, torch.Tensor], max_steps: int):
        self.model, self.max_steps = model, max_steps
        modules = dict(model.named_modules())
        self.conv1d = {n: type(modules[n]).__name__ == "Conv1D" for n in masks}
        self.params = {n: modules[n].weight for n in masks}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.params.values():
            p.requires_grad_(True)
        self.masks = {n: m.clone() for n, m in masks.items()}
        self.m = {n: torch.zeros_like(m, dtype=torch.float64) for n, m in masks.items()}
        self.v = {n: torch.zeros_like(m, dtype=torch.float64) for n, m in masks.items()}
        self.anchor = {n: self.weight(n).detach().clone() for n in masks}
        self.t = 0
        self.losses: list[float] = []

    def weight(self, name):  # (d_out, d_in) view of the stored weight
        p = self.params[name]
        return p.t() if self.conv1d[name] else p

    def grads(self, batches, train_mode=True) -> dict[str, torch.Tensor]:
        self.model.train(train_mode)
        for p in self.params.values():
            p.grad = None
        loss = sum(dense_loss(self.model, b) for b in batches)
        loss.backward()
        out = {n: (p.grad.t() if self.conv1d[n] else p.grad).clone() for n, p in self.params.items()}
        return out, float(loss.detach())

    def step(self, batch) -> None:
        grads, loss = self.grads([batch])
        self.losses.append(loss)
        self.t += 1
        lr = LR * (1.0 - (self.t - 1) / self.max_steps)                 # linear decay, no warm-up
        grads = {n: g * self.masks[n] for n, g in grads.items()}
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        coef = min(1.0, CLIP / (float(norm) + 1e-6))                       # clip_grad_norm_
        b1, b2 = BETAS
        with torch.no_grad():
            for n, g in grads.items():
                g = g * coef
                w, mask = self.weight(n), self.masks[n].double()
                w -= lr * WD * (w - self.anchor[n]) * mask        # decoupled decay of the update
                self.m[n] = b1 * self.m[n] + (1 - b1) * g
                self.v[n] = b2 * self.v[n] + (1 - b2) * g * g
                denom = self.v[n].sqrt() / (1 - b2 ** self.t) ** 0.5 + EPS
                w -= (lr / (1 - b1 ** self.t)) * self.m[n] / denom

    def reselect(self, calibration, total: int) -> dict[str, torch.Tensor]:
        """New masks from |G| (mean-normalised per layer), one global top-``total`` with every
        layer's best entry taken first; moments kept for kept entries only; decay anchor moves."""
        grads, _ = self.grads(calibration, train_mode=False)
        names = list(grads)
        scores = {n: grads[n].abs() / grads[n].abs().mean() for n in names}
        new = {n: torch.zeros_like(self.masks[n]) for n in names}
        for n in names:                                                    # the floor: one per layer
            new[n].view(-1)[scores[n].argmax()] = True
        rest = torch.cat([scores[n].masked_fill(new[n], -1.0).reshape(-1) for n in names])
        chosen = torch.topk(rest, total - len(names)).indices
        offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
        for i, n in enumerate(names):
            local = chosen[(chosen >= offsets[i]) & (chosen < offsets[i + 1])] - offsets[i]
            new[n].view(-1)[local] = True
        for n in names:
            self.m[n] *= new[n]
            self.v[n] *= new[n]
            self.anchor[n] = self.weight(n).detach().clone()
        self.masks = new
        return new

    def run(self, batches, steps, calibration=None, every=None, total=None) -> list[dict]:
        chosen = []
        for s in range(1, steps + 1):
            self.step(batches[(s - 1) % len(batches)])
            if every and s % every == 0 and s < steps:
                chosen.append({n: m.clone() for n, m in self.reselect(calibration, total).items()})
        return chosen


def sparse_run(arch, selection, steps, callbacks=()):
    model = tiny(arch)
    tuner.apply(model, selection)
    history = train(model, BATCHES, steps=steps, lr=LR, weight_decay=WD, max_grad_norm=CLIP, progress=False,
                    callbacks=list(callbacks))
    return model, history


BATCHES = token_batches(5, seed=3)
CALIBRATION = token_batches(2, seed=4)


def assert_matches_reference(model, history, reference):
    assert history.losses == pytest.approx(reference.losses, abs=1e-10, rel=0)
    layers = tuner.sparse_layers(model)
    assert set(layers) == set(reference.params)
    for name, layer in layers.items():
        diff = (effective_weight(layer) - reference.weight(name).detach()).abs().max()
        assert float(diff) < 1e-10, f"{name}: {float(diff)}"


# ---------------------------------------------------------------- static and dynamic vs the reference
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_element_training_equals_masked_dense_training(arch):
    selection = random_element_selection(tiny(arch))
    model, history = sparse_run(arch, selection, steps=6)
    reference = DenseReference(tiny(arch), masks_of(selection), max_steps=6)
    reference.run(BATCHES, 6)
    assert reference.losses[-1] < reference.losses[0]          # it trained
    assert_matches_reference(model, history, reference)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dynamic_reselection_equals_dense_reference(arch):
    selection = random_element_selection(tiny(arch))
    total = sum(c.k for c in selection.layers.values())
    chosen = []

    class MaskRecorder:  # the masks the model carries right after each reselection
        def on_reselect(self, state, record):
            chosen.append(masks_of(tuner.current_selection(state.model)))

    dynamic = DynamicMask(CALIBRATION, metric="gradient", budget=TotalParams(total), strategy="global", every=3,
                          num_batches=2, score_options={"dtype": torch.float64}, on_reselect=MaskRecorder())
    model, history = sparse_run(arch, selection, steps=8, callbacks=[dynamic])
    reference = DenseReference(tiny(arch), masks_of(selection), max_steps=8)
    expected = reference.run(BATCHES, 8, CALIBRATION, every=3, total=total)

    assert [r["step"] for r in dynamic.reselections] == [3, 6]
    assert len(chosen) == len(expected) == 2
    for mine, theirs in zip(chosen, expected):                 # the same masks, chosen independently
        for name in theirs:
            assert torch.equal(mine[name], theirs[name]), name
    for record, before, after in zip(dynamic.reselections, [masks_of(selection)] + expected[:-1], expected):
        kept = sum(int((before[n] & after[n]).sum()) for n in after)
        assert record["total"] == total and record["kept"] == kept
        assert record["changed"] == total - kept and record["dropped"] == total - kept
        assert record["jaccard"] == pytest.approx(kept / (2 * total - kept))
        assert 0 < record["changed"] < total                   # the mask really moved
    assert_matches_reference(model, history, reference)


# ---------------------------------------------------------------- function preserved
def test_zero_init_and_fold_keep_the_function():
    probe = token_batches(1, seed=9)[0]
    plain = tiny("llama")
    with torch.no_grad():
        expected = plain(**probe).logits
    model = tiny("llama")
    tuner.apply(model, random_element_selection(model))
    with torch.no_grad():
        assert torch.equal(model(**probe).logits, expected)    # step 0: the pretrained model exactly

    seen = {}

    def logits(tag):
        def fn(state):
            with torch.no_grad():
                seen.setdefault(state.step, {})[tag] = state.model(**probe).logits.clone()
        return fn

    dynamic = DynamicMask(CALIBRATION, every=2, num_batches=2)
    train(model, BATCHES, steps=5, lr=LR, progress=False, callbacks=[logits("before"), dynamic, logits("after")])
    assert [r["step"] for r in dynamic.reselections] == [2, 4]
    for step in (2, 4):
        before, after = seen[step]["before"], seen[step]["after"]
        assert not torch.equal(before, expected)                # training changed the model...
        torch.testing.assert_close(after, before, atol=1e-12, rtol=0)  # ...the reselection did not
    for layer in tuner.sparse_layers(model).values():
        assert not layer.merged


# ---------------------------------------------------------------- optimizer state semantics
def optimizer_snapshot(into: dict, at_step: int):
    """A callback recording every sparse layer's indices and AdamW state at ``at_step``."""
    def fn(state):
        if state.step == at_step:
            for name, layer in tuner.sparse_layers(state.model).items():
                st = state.optimizer.state[layer.update]
                into[name] = (layer.indices.long().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
                              st["step"].clone(), layer.update)
    return fn


@pytest.mark.parametrize("unit", ["row", "column", "element"])
def test_kept_entries_keep_their_moments_new_ones_start_at_zero(unit):
    model = tiny("gpt2")
    layers = {}
    for i, (name, module) in enumerate(find_targets(model).items()):
        d_out, d_in = linear_shape(module)
        size = {"row": d_out, "column": d_in, "element": d_out * d_in}[unit]
        layers[name] = LayerChoice(unit, torch.randperm(size, generator=torch.Generator().manual_seed(i))[:size // 4],
                                   (d_out, d_in))
    tuner.apply(model, Selection(layers))
    before, after = {}, {}
    dynamic = DynamicMask(CALIBRATION, metric="gradient" if unit == "element" else "taylor", strategy="per-layer",
                          every=2, num_batches=2)
    train(model, BATCHES, steps=3, lr=LR, progress=False,
          callbacks=[optimizer_snapshot(before, 2), dynamic, optimizer_snapshot(after, 2)])
    axis = 1 if unit == "column" else 0
    new_entries = 0
    for name, (old_idx, m_old, v_old, step_old, param_old) in before.items():
        new_idx, m_new, v_new, step_new, param_new = after[name]
        assert param_new is param_old                           # the same Parameter object, resized
        assert new_idx.numel() == old_idx.numel()               # per-layer budget None: same count
        assert torch.equal(step_new, step_old)                  # the shared step count is kept
        assert m_new.shape == param_new.shape == v_new.shape
        for j, index in enumerate(new_idx.tolist()):
            hit = (old_idx == index).nonzero().reshape(-1)
            got_m, got_v = m_new.select(axis, j), v_new.select(axis, j)
            if hit.numel():
                assert torch.equal(got_m, m_old.select(axis, int(hit))) and torch.equal(got_v, v_old.select(axis, int(hit)))
            else:
                new_entries += 1
                assert not got_m.any() and not got_v.any()
    assert new_entries > 0
    assert dynamic.reselections[0]["changed"] == new_entries


# ---------------------------------------------------------------- memory, schedulers, reporting
def test_memory_counts_values_and_int32_indices_exactly():
    model = tiny("llama", dtype=torch.float32)
    total = 1000
    probe = tiny("llama", dtype=torch.float32)
    from rowsft.scoring import score
    from rowsft.selection import select
    tuner.apply(model, select(score(probe, CALIBRATION, metric="gradient", unit="element"), TotalParams(total),
                              strategy="global"))
    batch = BATCHES[0]
    report = memory.breakdown(model, batch)
    assert sum(layer.k for layer in tuner.sparse_layers(model).values()) == total
    assert report.trainable == total * 4 and report.indices == total * 4   # fp32 values, int32 indices
    holder = {}
    dynamic = DynamicMask(CALIBRATION, budget=TotalParams(total), every=2, num_batches=2)
    train(model, BATCHES, steps=3, lr=LR, progress=False,
          callbacks=[dynamic, lambda s: holder.setdefault("opt", s.optimizer)])
    assert dynamic.reselections[0]["changed"] > 0
    for layer in tuner.sparse_layers(model).values():
        assert layer.indices.dtype == torch.int32 and layer.values.shape == (layer.k,)
    report = memory.breakdown(model, batch)
    assert report.trainable == total * 4 and report.indices == total * 4
    params = [p for p in model.parameters() if p.requires_grad]
    assert memory.optimizer_bytes(params, holder["opt"]) == 2 * total * 4    # exp_avg + exp_avg_sq, fp32


def test_torch_scheduler_and_state_dict_keep_working_in_a_hand_written_loop():
    model = tiny("llama")
    tuner.apply(model, random_element_selection(model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    state = SimpleNamespace(step=0, max_steps=None, model=model, optimizer=optimizer, history=None)
    dynamic = DynamicMask(CALIBRATION, every=2, num_batches=2)
    dynamic.on_train_begin(state)
    for step in range(1, 5):
        optimizer.zero_grad(set_to_none=True)
        dense_loss(model, BATCHES[step % len(BATCHES)]).backward()
        optimizer.step()
        scheduler.step()
        state.step = step
        dynamic.on_step_end(state)
    assert [r["step"] for r in dynamic.reselections] == [2, 4]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5 ** 4)
    layers = tuner.sparse_layers(model)
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(layer.values) for layer in layers.values()]
    for layer in layers.values():
        assert optimizer.state[layer.values]["exp_avg"].shape == layer.values.shape
    copy_opt = torch.optim.AdamW(params, lr=LR)
    copy_opt.load_state_dict(optimizer.state_dict())            # shapes consistent with the parameters


def test_records_reach_history_listeners_and_json():
    model = tiny("llama")
    tuner.apply(model, random_element_selection(model))
    plain, hooked = [], []

    class Dashboard:
        def on_reselect(self, state, record):
            hooked.append((state.step, record))

    dynamic = DynamicMask(iter(CALIBRATION), every=2, num_batches=2, on_reselect=[plain.append, Dashboard()])
    history = train(model, BATCHES, steps=4, lr=LR, progress=False, callbacks=[dynamic])
    assert len(plain) == 1 and plain == dynamic.reselections == history.meta["reselections"]
    assert hooked[0][0] == 2 and hooked[0][1] is plain[0]
    record = plain[0]
    assert {"step", "changed", "kept", "total", "jaccard", "dropped", "per_layer"} <= set(record)
    assert record["kept"] + record["changed"] == record["total"]
    assert set(record["per_layer"]) == set(tuner.sparse_layers(model))
    json.dumps(history.to_dict())                                # the History still saves


def test_failed_reselection_leaves_the_model_trainable_and_unfolded():
    model = tiny("llama")
    tuner.apply(model, random_element_selection(model))
    train(model, BATCHES, steps=2, lr=LR, progress=False)
    before = {n: (layer.values.detach().clone(), weight_out_in(layer).detach().clone())
              for n, layer in tuner.sparse_layers(model).items()}
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in CALIBRATION]
    with pytest.raises(ValueError, match="labels"):
        reselect_mask(model, None, no_labels)
    for name, layer in tuner.sparse_layers(model).items():
        assert not layer.merged
        torch.testing.assert_close(layer.values.detach(), before[name][0], atol=0, rtol=0)
        torch.testing.assert_close(weight_out_in(layer).detach(), before[name][1], atol=1e-15, rtol=0)


def test_clear_errors():
    with pytest.raises(ValueError, match="every"):
        DynamicMask(CALIBRATION, every=0)
    with pytest.raises(ValueError, match="calibration batches"):
        DynamicMask(None, metric="gradient")
    with pytest.raises(ValueError, match="metric"):
        DynamicMask(CALIBRATION, metric="nonsense")
    with pytest.raises(ValueError, match="budget"):
        DynamicMask(CALIBRATION, budget=-3)
    with pytest.raises(TypeError, match="on_reselect"):
        DynamicMask(CALIBRATION, on_reselect=42)
    with pytest.raises(ValueError, match="rowsft.apply"):
        DynamicMask(CALIBRATION).on_train_begin(SimpleNamespace(model=tiny("llama"), optimizer=object()))
    element = tiny("llama")
    tuner.apply(element, random_element_selection(element))
    with pytest.raises(ValueError, match="cannot score elements"):
        DynamicMask(CALIBRATION, metric="activation").on_train_begin(SimpleNamespace(model=element, optimizer=object()))
    with pytest.raises(ValueError, match="optimizer"):
        DynamicMask(CALIBRATION).on_train_begin(SimpleNamespace(model=element, optimizer=None))
    mixed = tiny("llama")
    layers = {n: LayerChoice("row" if i % 2 else "column", torch.tensor([0, 1]), linear_shape(m))
              for i, (n, m) in enumerate(find_targets(mixed).items())}
    tuner.apply(mixed, Selection(layers))
    with pytest.raises(ValueError, match="one unit"):
        train(mixed, BATCHES, steps=1, progress=False, callbacks=[DynamicMask(CALIBRATION)])
    tied = tiny("llama")                                         # lm_head shares the embeddings' weight
    tuner.apply(tied, Selection({"lm_head": LayerChoice("element", torch.tensor([0, 5]), linear_shape(tied.lm_head))}))
    with pytest.raises(ValueError, match="tied"):
        train(tied, BATCHES, steps=1, progress=False, callbacks=[DynamicMask(CALIBRATION)])


def test_trained_bias_is_folded_and_remapped():
    model = tiny("gpt2")                                         # Conv1D layers with biases
    tuner.apply(model, random_element_selection(model, fraction=0.01), train_bias=True)
    probe = token_batches(1, seed=9)[0]
    seen = {}

    def logits(tag):
        def fn(state):
            if state.step == 2:
                with torch.no_grad():
                    seen[tag] = state.model(**probe).logits.clone()
                seen[tag + "_state"] = {n: (layer.bias_indices.clone(), state.optimizer.state[layer.bias_delta]["exp_avg"].clone())
                                        for n, layer in tuner.sparse_layers(state.model).items()}
        return fn

    dynamic = DynamicMask(CALIBRATION, every=2, num_batches=2)
    history = train(model, BATCHES, steps=3, lr=LR, progress=False, callbacks=[logits("before"), dynamic, logits("after")])
    torch.testing.assert_close(seen["after"], seen["before"], atol=1e-12, rtol=0)
    assert len(history.steps) == 3
    for name, layer in tuner.sparse_layers(model).items():
        assert layer.bias_delta.shape == layer.bias_indices.shape
        old_rows, old_m = seen["before_state"][name]
        new_rows, new_m = seen["after_state"][name]
        for j, row in enumerate(new_rows.tolist()):
            hit = (old_rows == row).nonzero().reshape(-1)
            assert float(new_m[j]) == (float(old_m[int(hit)]) if hit.numel() else 0.0)
