"""Kept adapters: keep / use / none / compare, as plain functions and as the dashboard's section 5.

References are independent of the code under test: the logits recorded right after each training run, the
pretrained model's logits and weights, and ``rowsft.evaluate`` + ``exact_mcnemar`` run directly after each run.
"""
from __future__ import annotations

import threading

import pytest
import torch
from test_notebook_fakes import (
    fake_lora_parity,
    fake_predict,
    fake_score,
    fake_select,
    fake_train,
    random_batches,
)

from rowsft import notebook as nb
from rowsft.cli.job import describe_accuracy
from rowsft.data.models import tiny_model
from rowsft.evaluation.choices import evaluate
from rowsft.evaluation.stats import exact_mcnemar
from rowsft.layers import tuner
from rowsft.notebook.adapters import compare_adapters, comparison_text, keep_adapter, use_adapter, use_none

UP, Q = "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"


def model_for(tokenizer=None, seed=0):
    return tiny_model("llama", vocab_size=len(tokenizer) if tokenizer is not None else 128, seed=seed)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits.clone()


def frozen(model):
    """Every base weight by its name in the plain model (sparse layers' base_layer prefix removed)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()
            if "delta" not in n and "values" not in n}


def train_rows(model, rows: dict, steps=3, lr=0.05, seed=0, noise=0.0):
    """Apply ``rows``, train; ``noise``: then add seeded noise of that scale to the updates (answers that differ)."""
    tuner.apply(model, rows)
    fake_train(model, random_batches(4, seed=seed), steps=steps, lr=lr)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in tuner.sparse_layers(model).values():
            layer.update.add_(noise * torch.randn(layer.update.shape, generator=g))
    return model


def questions(n=24):
    """Two-choice questions with varied one-letter answers; labels uneven (majority 0)."""
    letter = lambda j: chr(97 + j % 26)  # noqa: E731
    return [{"prompt": f"Question {i}: which of {letter(i)} or {letter(7 * i + 3)}?\nAnswer:",
             "choices": [f" {letter(i)}", f" {letter(7 * i + 3)}"], "label": int(i % 3 == 0)} for i in range(n)]


def same_models(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ plain functions
def test_use_puts_back_each_trained_adapter_exactly_and_none_is_pretrained():
    model, batch = model_for(), random_batches(1, seed=9)[0]
    pretrained, weights = logits(model, batch), frozen(model)
    train_rows(model, {UP: [1, 5, 9], Q: [0, 2]})
    after_a = logits(model, batch)
    a = keep_adapter(model, "A")
    assert not torch.equal(after_a, pretrained)
    use_none(model)
    assert torch.equal(logits(model, batch), pretrained) and not tuner.sparse_layers(model)
    train_rows(model, {UP: [0, 3], "model.layers.1.mlp.down_proj": [4]}, lr=0.1, seed=1)   # B from the pretrained
    after_b = logits(model, batch)
    b = keep_adapter(model, "B", {"A": a})
    assert same_models(frozen(model), weights)

    use_adapter(model, a)                                   # another selection: re-applied, deltas copied in
    assert torch.equal(logits(model, batch), after_a)
    assert set(tuner.current_selection(model)) == {UP, Q}
    update = tuner.sparse_layers(model)[UP].update
    with torch.no_grad():
        update.add_(1.0)                                    # trained further, then Use A again: same selection
    use_adapter(model, a)
    assert tuner.sparse_layers(model)[UP].update is update  # copied in place, not re-applied
    assert torch.equal(logits(model, batch), after_a)
    use_adapter(model, b)
    assert torch.equal(logits(model, batch), after_b)
    use_none(model)
    assert torch.equal(logits(model, batch), pretrained)
    assert same_models(frozen(model), weights)              # no update was ever merged into the weights
    assert a.trainable_parameters == 5 * 64 and "'A': row updates in 2 layers" in a.describe()


def test_keep_refusals_change_nothing():
    model, batch = model_for(), random_batches(1, seed=9)[0]
    with pytest.raises(ValueError, match="no rowsft update"):
        keep_adapter(model, "A")
    tuner.apply(model, {UP: [1, 2]})
    with pytest.raises(ValueError, match="all zero"):
        keep_adapter(model, "A")
    fake_train(model, random_batches(2), steps=2, lr=0.05)
    before, update = logits(model, batch), tuner.sparse_layers(model)[UP].update.detach().clone()
    kept = {"A": keep_adapter(model, "A")}
    for name, message in (("", "give the adapter a name"), ("   ", "give the adapter a name"),
                          (" A ", "already kept")):
        with pytest.raises(ValueError, match=message):
            keep_adapter(model, name, kept)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="weight also trains, and an adapter holds only"):
        keep_adapter(model, "B", kept)
    model.lm_head.weight.requires_grad_(False)
    tuner.merge(model)
    with pytest.raises(ValueError, match="merged"):
        keep_adapter(model, "B", kept)
    with pytest.raises(ValueError, match="merged"):
        use_adapter(model, kept["A"])
    with pytest.raises(ValueError, match="merged"):
        use_none(model)
    tuner.unmerge(model)
    assert torch.allclose(logits(model, batch), before, atol=1e-5) and list(kept) == ["A"]
    assert torch.equal(tuner.sparse_layers(model)[UP].update.detach(), update)


def test_an_adapter_is_refused_once_the_frozen_weights_changed():
    model = model_for()
    train_rows(model, {UP: [1, 2]})
    a = keep_adapter(model, "A")
    tuner.merge_and_unload(model)                            # what Launch did before adapters: A is now in the weights
    with pytest.raises(ValueError, match="frozen weights changed since 'A' was kept"):
        use_adapter(model, a)
    assert not tuner.sparse_layers(model)


def test_compare_equals_evaluate_and_exact_mcnemar_and_leaves_the_model_as_it_was(byte_tokenizer):
    model, rows = model_for(byte_tokenizer, seed=3), questions()
    batch = random_batches(1, seed=9)[0]

    def evaluate_fn(m):
        return evaluate(m, byte_tokenizer, rows, batch_size=8, max_length=64, progress=False)

    train_rows(model, {UP: [1, 5, 9], Q: [0, 2]}, lr=0.5, noise=1.0)
    direct_a, a = evaluate_fn(model), keep_adapter(model, "taylor rows")
    use_none(model)
    train_rows(model, {UP: [0, 3, 7], Q: [1, 4, 9]}, lr=0.5, seed=1, noise=1.0)
    direct_b, b = evaluate_fn(model), keep_adapter(model, "random rows")
    with torch.no_grad():
        tuner.sparse_layers(model)[UP].update.mul_(3)        # an unkept state: compare must put it back
    current, selection = logits(model, batch), tuner.current_selection(model)

    result = compare_adapters(model, a, b, evaluate_fn)
    assert result["result_a"] == direct_a and result["result_b"] == direct_b
    assert result["mcnemar"] == exact_mcnemar(direct_a, direct_b)
    assert result["difference"] == direct_b["accuracy"] - direct_a["accuracy"]
    assert result["majority"] == direct_a["majority"]
    assert result["mcnemar"]["a_only"] + result["mcnemar"]["b_only"] > 0     # the two answer differently
    assert torch.equal(logits(model, batch), current) and list(tuner.current_selection(model)) == list(selection)

    text = comparison_text(result)
    assert describe_accuracy(direct_a) in text and describe_accuracy(direct_b) in text
    assert f"majority class   {direct_a['majority']['accuracy']:.4f}" in text
    assert f"exact McNemar p = {result['mcnemar']['p_value']:.2g}" in text
    assert ("not shown" in text) == (result["mcnemar"]["p_value"] >= 0.05)

    with pytest.raises(ValueError, match="two different adapters"):
        compare_adapters(model, a, a, evaluate_fn)
    with pytest.raises(ValueError, match="no per-question results"):
        compare_adapters(model, a, b, lambda m: 0.5)
    assert torch.equal(logits(model, batch), current)          # refused or failed: the model as it was
    use_none(model)
    compare_adapters(model, a, b, evaluate_fn)
    assert not tuner.sparse_layers(model)                      # no update before, none after


def _result(answers, labels=None):
    labels = labels or [0] * len(answers)
    per = [{"index": i, "label": lab, "predicted": lab if ok else 1 - lab, "correct": bool(ok), "scores": [0, 0]}
           for i, (ok, lab) in enumerate(zip(answers, labels))]
    n, right = len(answers), sum(answers)
    from rowsft.evaluation.stats import majority_baseline, wilson_interval
    return {"accuracy": right / n, "n": n, "interval": wilson_interval(right, n), "per_question": per,
            "majority": majority_baseline(labels)}


@pytest.mark.parametrize("a_right, b_right, words", [(10, 30, "better, McNemar p = "),
                                                     (20, 22, "not shown (McNemar p = ")])
def test_comparison_text_words_the_verdict_at_five_percent(a_right, b_right, words):
    n = 40
    a, b = _result([1] * a_right + [0] * (n - a_right)), _result([1] * b_right + [0] * (n - b_right))
    test = exact_mcnemar(a, b)
    text = comparison_text({"a": "A", "b": "B", "result_a": a, "result_b": b, "mcnemar": test,
                            "difference": b["accuracy"] - a["accuracy"], "majority": b["majority"]})
    assert words in text
    assert text.rstrip().endswith(", shown at the 5% level" if test["p_value"] < 0.05 else " at the 5% level")
    assert ("shown at the 5% level" in text) == (test["p_value"] < 0.05)
    assert f"{b_right - a_right} only B gets right, 0 only A" in text


# ------------------------------------------------------------------ the dashboard's section 5
def dashboard(model, eval_fn=None, **kwargs):
    cfg = nb.settings(fast=True, rows=4, steps=3, calibration_batches=2, lr=0.5)
    return nb.Dashboard(model, random_batches(4), settings=cfg, score_fn=fake_score, select_fn=fake_select,
                        predict_fn=fake_predict, lora_parity_fn=fake_lora_parity, train_fn=fake_train,
                        eval_fn=eval_fn, **kwargs)


def test_dashboard_keeps_two_adapters_switches_between_them_and_compares(byte_tokenizer):
    model, rows = model_for(byte_tokenizer, seed=3), questions()
    batch = random_batches(1, seed=9)[0]

    def evaluate_fn(m):
        return evaluate(m, byte_tokenizer, rows, batch_size=8, max_length=64, progress=False)

    dash = dashboard(model, evaluate_fn, background=False)
    panel = dash.adapters
    pretrained, weights = logits(model, batch), frozen(model)
    titles = [c for c in dash.widget.children if hasattr(c, "get_title")]
    assert titles[-1].get_title(0).startswith("5 · Adapters") and titles[-1].selected_index is None

    panel.name.value = "too early"
    assert not panel.keep() and "no rowsft update" in panel.status.message and not panel.adapters
    panel.name.value = ""
    assert dash.launcher.launch(), dash.launcher.status.message      # run A (magnitude rows)
    after_a, direct_a = logits(model, batch), evaluate_fn(model)
    assert not panel.keep() and panel.status.message == "Cannot keep: give the adapter a name"
    panel.name.value = "magnitude rows"
    assert panel.keep(), panel.status.message
    assert panel.choice.options == ("magnitude rows",) and panel.name.value == ""
    panel.name.value = "magnitude rows"
    assert not panel.keep() and "already kept" in panel.status.message
    assert not panel.compare() and "keep two adapters first (1 kept)" in panel.status.message

    dash.chooser.metric.value = "random"                            # a second selection: random rows
    dash.chooser.button.click()
    assert dash.launcher.launch(), dash.launcher.status.message     # A is kept: unloaded, not merged
    assert same_models(frozen(model), weights)
    after_b, direct_b = logits(model, batch), evaluate_fn(model)
    panel.name.value = "random rows"
    assert panel.keep(), panel.status.message
    assert panel.first.value == "magnitude rows" and panel.second.value == "random rows"

    panel.choice.value = "magnitude rows"
    assert panel.use(), panel.status.message
    assert torch.equal(logits(model, batch), after_a)
    assert panel.none(), panel.status.message
    assert torch.equal(logits(model, batch), pretrained) and not tuner.sparse_layers(model)
    panel.choice.value = "random rows"
    assert panel.use() and torch.equal(logits(model, batch), after_b)

    panel.second.value = "magnitude rows"
    assert not panel.compare() and "with itself" in panel.status.message
    panel.first.value, panel.second.value = "magnitude rows", "random rows"
    assert panel.compare(), panel.status.message
    result = panel.wait(60)
    assert panel.error is None and panel.status.kind == "success", panel.status.message
    assert result["result_a"] == direct_a and result["result_b"] == direct_b
    assert result["mcnemar"] == exact_mcnemar(direct_a, direct_b)
    assert describe_accuracy(direct_a) in panel.result.value and "majority class" in panel.result.value
    assert torch.equal(logits(model, batch), after_b)               # compare put B back
    assert same_models(frozen(model), weights)


def test_dashboard_refusals_change_nothing():
    model = model_for()
    batch = random_batches(1, seed=9)[0]
    dash = dashboard(model, eval_fn=lambda m: 0.5, background=False)
    panel = dash.adapters
    dash.launcher.launch()
    panel.name.value = "A"
    assert panel.keep()
    dash.launcher.launch()                                           # same selection: A trained further, unkept
    trained = logits(model, batch)
    state = (tuner.current_selection(model), {n: x.update.detach().clone()
                                              for n, x in tuner.sparse_layers(model).items()})

    def unchanged():
        selection, updates = state
        on_model = tuner.sparse_layers(model)
        return (torch.equal(logits(model, batch), trained) and set(on_model) == set(selection)
                and all(torch.equal(on_model[n].update.detach(), updates[n]) for n in updates))

    panel.choice.value = "A"
    assert not panel.use() and "not kept as an adapter" in panel.status.message and unchanged()
    dash.budget.rows.value = 2                                       # Launch with another selection would merge it
    assert not dash.launcher.launch() and "not kept as an adapter" in dash.launcher.status.message and unchanged()
    panel.name.value = "B"
    assert panel.keep()
    panel.first.value, panel.second.value = "A", "B"
    panel.eval_fn, eval_fn = None, panel.eval_fn
    assert not panel.compare() and "no evaluation" in panel.status.message and unchanged()
    panel.eval_fn = eval_fn                                          # an accuracy only: fails, model put back
    assert panel.compare() and panel.status.kind == "error" and "per-question" in panel.status.message
    assert unchanged() and panel.comparison is None
    assert panel.none() and not tuner.sparse_layers(model)           # B holds the update: no second press needed


def test_dashboard_drops_an_unkept_update_only_on_a_second_none():
    model = model_for()
    dash = dashboard(model, eval_fn=lambda m: 0.5, background=False)
    panel = dash.adapters
    dash.launcher.launch()
    panel.name.value = "A"
    assert panel.keep()
    dash.launcher.launch()                                           # trained further: unkept
    assert not panel.none() and "press None again" in panel.status.message and tuner.sparse_layers(model)
    assert panel.none() and "dropped" in panel.status.message and not tuner.sparse_layers(model)


def test_dashboard_adapters_wait_for_a_run_and_launch_waits_for_a_comparison():
    model = model_for()
    batch = random_batches(1, seed=9)[0]
    release, started = threading.Event(), threading.Event()

    def slow_eval(m):
        started.set()
        release.wait(10)
        return _result([1, 0, 1, 1])

    dash = dashboard(model, eval_fn=slow_eval, background=False)
    panel = dash.adapters
    dash.launcher.eval_fn = None
    for name, rows in (("A", 4), ("B", 2)):
        dash.budget.rows.value = rows
        assert dash.launcher.launch(), dash.launcher.status.message
        panel.name.value = name
        assert panel.keep(), panel.status.message
    dash.launcher.background = True                                 # a slow run in the background
    dash.launcher.train_kwargs["step_delay"] = 0.3
    dash.launcher.steps.value = 50
    assert dash.launcher.launch()
    try:
        panel.name.value = "C"
        for press in (panel.keep, panel.use, panel.none, panel.compare):
            assert not press() and "a run is training this model" in panel.status.message, press
        assert list(panel.adapters) == ["A", "B"]
    finally:
        dash.launcher.stop()
        dash.wait(30)
    del dash.launcher.train_kwargs["step_delay"]
    current = logits(model, batch)
    panel.background = True
    panel.first.value, panel.second.value = "A", "B"
    assert panel.compare() and started.wait(5)
    try:
        assert not dash.launcher.launch() and "being compared" in dash.launcher.status.message
        dash.chooser.button.click()
        assert dash.chooser.status.kind == "error" and "being compared" in dash.chooser.status.message
        assert not panel.use() and "comparison is running" in panel.status.message
    finally:
        release.set()
        panel.wait(30)
    assert panel.status.kind == "success", panel.status.message
    assert torch.equal(logits(model, batch), current)


def test_adapters_trained_by_rowsft_train_come_back_exactly():
    """The real training loop leaves the frozen weights' version counters alone, so Use is allowed and exact."""
    import rowsft
    model, batch = model_for(), random_batches(1, seed=9)[0]
    pretrained = logits(model, batch)
    kept = {}
    for name, rows in (("A", {UP: [1, 2, 3]}), ("B", {"model.layers.1.mlp.down_proj": [0, 4], Q: [7]})):
        use_none(model)
        tuner.apply(model, rows)
        rowsft.train(model, random_batches(4), steps=3, lr=1e-2, progress=False)
        kept[name] = (keep_adapter(model, name, {k: v[0] for k, v in kept.items()}), logits(model, batch))
    for name in ("A", "B", "A"):
        adapter, expected = kept[name]
        use_adapter(model, adapter)
        assert torch.equal(logits(model, batch), expected), name
    use_none(model)
    assert torch.equal(logits(model, batch), pretrained)
