"""The learning-rate range test: geometric rates, the smoothed curve by hand, early stop, the model restored."""
from __future__ import annotations

import math

import pytest
import torch
from _reference import random_batches

import rowsft
from rowsft.training.lr_range import lr_range_test

VOCAB = 128


def prepared_llama():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=0)
    batches = random_batches(4, 2, 16, VOCAB, 0)
    scores = rowsft.score(model, batches, metric="magnitude")
    rowsft.apply(model, rowsft.select(scores, 2))
    return model, batches


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_rates_grow_geometrically_and_the_model_is_restored():
    model, batches = prepared_llama()
    before = state(model)
    result = lr_range_test(model, batches, min_lr=1e-4, max_lr=1e-2, steps=5, diverge=1e9, seed=0)
    assert result.lrs == pytest.approx([1e-4 * 100 ** (i / 4) for i in range(5)])
    after = state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)           # bit for bit, deltas included
    average, smoothed = 0.0, []                                             # the moving average by hand
    for i, loss in enumerate(result.losses, 1):
        average = 0.8 * average + 0.2 * loss
        smoothed.append(average / (1 - 0.8 ** i))
    assert result.smoothed == pytest.approx(smoothed)
    best = min(range(5), key=lambda i: smoothed[i])
    assert result.min_loss_lr == pytest.approx(result.lrs[best]) and result.suggestion == pytest.approx(result.lrs[best] / 10)


class FakeState:
    def __init__(self, lr, loss):
        self.lr, self.loss, self.stopped = lr, loss, None

    def request_stop(self, reason):
        self.stopped = reason


@pytest.mark.parametrize("losses, stop_at", [([3.0, 2.0, 1.0, 1.0, 6.0, 9.0, 20.0, 40.0], 6),
                                            ([3.0, 2.0, float("nan")], 3)])
def test_the_test_stops_once_the_smoothed_loss_passes_the_factor(losses, stop_at):
    from rowsft.training.lr_range import RangeTestResult, _Divergence
    result = RangeTestResult()
    watcher = _Divergence(result, beta=0.5, factor=4.0)
    for step, loss in enumerate(losses, 1):
        state_ = FakeState(lr=10.0 ** step, loss=loss)
        watcher.on_step_end(state_)
        if state_.stopped:
            break
    # by hand (beta 0.5, bias-corrected): smoothed 3, 2.333, 1.571, 1.267, 3.710, 6.397 > 4 x 1.267 at step 6
    assert step == stop_at and result.diverged_at == 10.0 ** stop_at


def test_the_model_is_restored_after_an_error():
    model, batches = prepared_llama()
    before = state(model)

    def explode(state_):
        if state_.step == 2:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lr_range_test(model, batches, steps=5, callbacks=[explode])
    after = state(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_lr=0.0), "min_lr"), (dict(max_lr=math.inf), "max_lr"), (dict(min_lr=1e-2, max_lr=1e-3), "larger"),
    (dict(steps=2), "steps"), (dict(smoothing=1.0), "smoothing"), (dict(diverge=1.0), "diverge"),
])
def test_bad_settings_are_refused_before_training(kwargs, match):
    model, batches = prepared_llama()
    before = state(model)
    with pytest.raises(ValueError, match=match):
        lr_range_test(model, batches, **kwargs)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_model_with_nothing_to_train_is_refused():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB, seed=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="prepare it first"):
        lr_range_test(model, random_batches(2, 2, 16, VOCAB, 0))


def test_figure_marks_the_suggestion_and_the_tuned_rate():
    from rowsft.viz import lr_range_figure
    model, batches = prepared_llama()
    result = lr_range_test(model, batches, min_lr=1e-4, max_lr=1e-1, steps=6, seed=0)
    fig = lr_range_figure(result, tuned_lr=1e-3)
    names = [t.name for t in fig.data]
    assert names[:2] == ["loss of each step", "smoothed"]
    assert any(name.startswith("tuned default: 1.0e-03") for name in names)
    assert any(name.startswith("suggested") for name in names) and fig.layout.xaxis.type == "log"
