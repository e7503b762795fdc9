"""The training loop: it learns, is deterministic, reports every step, stops cleanly, and its gradient
accumulation / checkpointing / sparse training agree with independent plain-PyTorch references."""
from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from _reference import dense_loss, random_batches

import rowsft
from rowsft.training import NonFiniteLossError, TrainConfig, lr_at, train
from rowsft.training.history import History

VOCAB = 128


def token_batches(n: int = 4, batch_size: int = 4, seq_len: int = 16, seed: int = 0) -> list[dict]:
    """Random full-length causal-LM batches (every position carries a label)."""
    return random_batches(n, batch_size, seq_len, VOCAB, seed)


def llama(dtype=torch.float32, seed: int = 0):
    return rowsft.tiny_model("llama", vocab_size=VOCAB, seed=seed, dtype=dtype)


def train_mlp_only(model):
    """Hand-picked trainable set: only the MLP weights (no rowsft layers needed)."""
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name)
    return model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


QUIET = dict(progress=False)


# ---------------------------------------------------------------- learning and determinism
def test_loss_decreases_and_only_trainable_parameters_change():
    model = train_mlp_only(llama())
    before = snapshot(model)
    history = train(model, token_batches(n=2, batch_size=2), steps=24, lr=2e-2, schedule="constant", **QUIET)
    assert len(history.steps) == 24 and not history.stopped
    first, last = sum(history.losses[:4]) / 4, sum(history.losses[-4:]) / 4
    assert last < first - 0.3, (first, last)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (".mlp." in name), name
    assert all(p.grad is None for p in model.parameters())  # gradients are freed at the end


def test_same_seed_gives_identical_losses_with_dropout_and_shuffle():
    def run(seed):
        model = rowsft.tiny_model("gpt2", vocab_size=VOCAB, seed=0)   # gpt2 has dropout 0.1
        rowsft.baselines.full_finetune(model)
        return train(model, token_batches(n=3, batch_size=2), steps=4, lr=1e-3, seed=seed, shuffle=True, **QUIET).losses

    a, b, c = run(1), run(1), run(2)
    assert a == b
    assert a != c


def test_epochs_cycle_the_batches_and_count_steps():
    batches = token_batches(n=3)
    h = train(train_mlp_only(llama()), batches, epochs=2, **QUIET)
    assert [s["epoch"] for s in h.steps] == [0, 0, 0, 1, 1, 1]
    h = train(train_mlp_only(llama()), batches, steps=7, grad_accum_steps=2, **QUIET)
    assert len(h.steps) == 7 and h.steps[-1]["epoch"] == 4  # 14 micro-batches over 3 per epoch
    h = train(train_mlp_only(llama()), iter(batches), steps=10, **QUIET)  # a one-shot iterator: one pass
    assert len(h.steps) == 3 and not h.stopped
    h = train(train_mlp_only(llama()), batches, **QUIET)  # neither steps nor epochs: one epoch
    assert len(h.steps) == 3


def test_second_call_continues_from_the_current_weights():
    model = train_mlp_only(llama())
    batches = token_batches(n=2, batch_size=2)
    h1 = train(model, batches, steps=16, lr=2e-2, schedule="constant", **QUIET)
    h2 = train(model, batches, steps=2, lr=2e-2, schedule="constant", **QUIET)
    assert h2.losses[0] < h1.losses[0] - 0.3
    assert abs(h2.losses[0] - h1.losses[-2]) < 0.3


# ---------------------------------------------------------------- callbacks
class Recorder:
    def __init__(self):
        self.calls, self.steps, self.evals = [], [], []

    def on_train_begin(self, state):
        self.calls.append("begin")
        self.max_steps = state.max_steps

    def on_step_end(self, state):
        self.calls.append("step")
        self.steps.append(dict(step=state.step, loss=state.loss, lr=state.lr, epoch=state.epoch, elapsed=state.elapsed,
                               memory=state.memory, has_model=state.model is not None,
                               has_optimizer=state.optimizer is not None, history_len=len(state.history.steps)))

    def on_eval(self, state):
        self.calls.append("eval")
        self.evals.append((state.step, dict(state.metrics)))

    def on_train_end(self, state):
        self.calls.append("end")


def test_callbacks_receive_every_step_with_the_right_fields():
    rec, plain = Recorder(), []
    evaluated_modes = []

    def eval_fn(model):
        evaluated_modes.append(model.training)
        return {"accuracy": 0.5, "n": 3}

    cfg = TrainConfig(lr=1e-3, warmup_steps=2, schedule="linear")
    h = train(train_mlp_only(llama()), token_batches(n=2), steps=6, config=cfg, callbacks=[rec, plain.append],
              eval_data=eval_fn, eval_every=4, **QUIET)
    assert rec.calls == ["begin"] + ["step"] * 4 + ["eval"] + ["step"] * 2 + ["eval", "end"]
    assert rec.max_steps == 6
    assert [s["step"] for s in rec.steps] == list(range(1, 7))
    assert [s["loss"] for s in rec.steps] == h.losses
    assert [s["lr"] for s in rec.steps] == pytest.approx([lr_at(k, cfg, 6) for k in range(1, 7)])
    assert [s["epoch"] for s in rec.steps] == [0, 0, 1, 1, 2, 2]
    assert all(s["has_model"] and s["has_optimizer"] and s["memory"] == {} for s in rec.steps)
    assert [s["history_len"] for s in rec.steps] == list(range(1, 7))  # the step is in History when callbacks run
    elapsed = [s["elapsed"] for s in rec.steps]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert [s.step for s in plain] == [6] * 6  # a plain function is an on_step_end (it gets the live state)
    assert rec.evals == [(4, {"accuracy": 0.5, "n": 3}), (6, {"accuracy": 0.5, "n": 3})]
    assert [e["step"] for e in h.evals] == [4, 6] and h.evals[0]["accuracy"] == 0.5
    assert evaluated_modes == [False, False]


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, warmup_steps=3, schedule="linear")
    assert [lr_at(k, cfg, 10) for k in (1, 2, 3)] == pytest.approx([0.25, 0.5, 0.75])
    assert lr_at(4, cfg, 10) == 1.0 and lr_at(10, cfg, 10) == pytest.approx(1 / 7)
    cos = TrainConfig(lr=1.0, schedule="cosine")
    assert lr_at(1, cos, 5) == 1.0 and lr_at(3, cos, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.4)))
    assert lr_at(7, TrainConfig(lr=2.0, schedule="constant", warmup_ratio=0.2), 10) == 2.0
    assert lr_at(1, TrainConfig(lr=1.0, warmup_ratio=0.2), 10) == pytest.approx(1 / 3)


# ---------------------------------------------------------------- stopping
def test_stop_event_set_from_a_callback_stops_after_that_step():
    event = threading.Event()
    ended = []

    def stopper(state):
        if state.step == 3:
            event.set()

    class EndRecorder:
        def on_train_end(self, state):
            ended.append(state.step)

    model = train_mlp_only(llama()).eval()
    h = train(model, token_batches(), steps=10, callbacks=[stopper, EndRecorder()], stop_event=event, **QUIET)
    assert len(h.steps) == 3 and h.stopped and h.stop_reason == "stop_event"
    assert ended == [3] and not model.training


def test_request_stop_from_state():
    h = train(train_mlp_only(llama()), token_batches(), steps=10,
              callbacks=[lambda s: s.request_stop() if s.step == 2 else None], **QUIET)
    assert len(h.steps) == 2 and h.stopped and h.stop_reason == "request_stop"
    event = threading.Event()
    event.set()
    h = train(train_mlp_only(llama()), token_batches(), steps=10, stop_event=event, **QUIET)
    assert len(h.steps) == 0 and h.stopped


def test_keyboard_interrupt_in_a_callback_is_handled_cleanly():
    model = train_mlp_only(llama()).eval()
    rec = Recorder()
    seen = {}

    def interrupt(state):
        if state.step == 2:
            seen["weights"] = snapshot(state.model)
            raise KeyboardInterrupt

    h = train(model, token_batches(), steps=10, callbacks=[interrupt, rec], **QUIET)
    assert h.stopped and h.stop_reason == "keyboard_interrupt" and len(h.steps) == 2
    assert rec.calls[-1] == "end" and not model.training
    assert all(torch.equal(seen["weights"][n], p) for n, p in model.named_parameters())


def test_keyboard_interrupt_inside_the_forward_abandons_the_step():
    model = train_mlp_only(llama())
    seen, count = {}, {"forward": 0}

    def record(state):
        seen["after_step"] = state.step
        seen["weights"] = snapshot(state.model)

    def hook(module, args):
        count["forward"] += 1
        if count["forward"] == 3:
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_pre_hook(hook)
    h = train(model, token_batches(), steps=10, callbacks=[record], **QUIET)
    handle.remove()
    assert h.stopped and h.stop_reason == "keyboard_interrupt"
    assert len(h.steps) == 2 and seen["after_step"] == 2
    assert all(torch.equal(seen["weights"][n], p) for n, p in model.named_parameters())  # no half step
    assert all(p.grad is None for p in model.parameters())


def test_errors_are_clear():
    model = llama()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters: call rowsft.apply"):
        train(model, token_batches(), steps=1, **QUIET)
    with pytest.raises(ValueError, match="the dataset gave no batches"):
        train(train_mlp_only(llama()), [], steps=3, **QUIET)
    with pytest.raises(ValueError, match="the dataset gave no batches"):
        train(train_mlp_only(llama()), iter([]), steps=3, **QUIET)
    with pytest.raises(TypeError, match="unknown options"):
        train(train_mlp_only(llama()), token_batches(), steps=1, learning_rate=1.0)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in token_batches()]
    with pytest.raises(ValueError, match="labels"):
        train(train_mlp_only(llama()), no_labels, steps=1, **QUIET)


def test_nan_loss_stops_with_the_step_or_is_skipped():
    batches = token_batches(n=3)
    batches[1] = dict(batches[1], labels=torch.full_like(batches[1]["labels"], -100))  # mean over no token: NaN
    model = train_mlp_only(llama())
    with pytest.raises(NonFiniteLossError, match="at step 2") as info:
        train(model, batches, steps=5, **QUIET)
    assert info.value.step == 2 and info.value.history.stopped and len(info.value.history.steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="skipped"):
        h = train(train_mlp_only(llama()), batches, steps=5, nan_policy="skip", **QUIET)
    assert len(h.steps) == 5 and h.steps[1].get("skipped") and math.isnan(h.losses[1])
    json.dumps(h.to_dict(), allow_nan=False)  # NaN becomes null


def test_history_round_trip(tmp_path):
    h = train(train_mlp_only(llama()), token_batches(n=2), steps=3, eval_data=lambda m: {"accuracy": 1.0}, **QUIET)
    h.save(tmp_path / "h.json")
    back = History.load(tmp_path / "h.json")
    assert back.losses == h.losses and back.evals == h.evals and back.config["lr"] == 1e-4
    assert back.meta["trainable_parameters"] == sum(p.numel() for n, p in llama().named_parameters() if ".mlp." in n)
    assert "3 steps" in repr(h)


# ---------------------------------------------------------------- exactness against plain PyTorch
def reference_steps(model, big_batches, optimizer, max_grad_norm=None):
    """Plain PyTorch: one optimizer step per batch, loss = the model's mean loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in big_batches:
        optimizer.zero_grad(set_to_none=True)
        dense_loss(model, batch).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_grad_accumulation_equals_one_big_batch(optimizer):
    """2 micro-batches of B with grad_accum_steps=2 == one batch of 2B (same token count per micro-batch,
    so the mean of the micro-batch means is the big batch's mean)."""
    small = token_batches(n=4, batch_size=2, seq_len=8)
    big = [{k: torch.cat([small[i][k], small[i + 1][k]]) for k in small[0]} for i in (0, 2)]
    ours = train_mlp_only(llama(torch.float64))
    train(ours, small, steps=2, lr=1e-2, optimizer=optimizer, grad_accum_steps=2, schedule="constant",
          max_grad_norm=0.5, **QUIET)
    ref = train_mlp_only(llama(torch.float64))
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2) if optimizer == "sgd" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    reference_steps(ref, big, opt, max_grad_norm=0.5)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), name


@pytest.mark.parametrize("trainable", ["mlp", "all"])
def test_gradient_checkpointing_gives_the_same_weights(trainable):
    def run(checkpointing):
        model = llama(torch.float64)
        if trainable == "mlp":
            train_mlp_only(model)
        else:
            rowsft.baselines.full_finetune(model)
        train(model, token_batches(n=2), steps=2, lr=1e-2, optimizer="sgd", gradient_checkpointing=checkpointing,
              **QUIET)
        assert not model.is_activation_checkpointing and not getattr(model, "_require_grads_hooks", None)
        return model

    a, b = run(False), run(True)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, rtol=0, atol=1e-12), name


def test_row_sparse_training_equals_masked_dense_sgd():
    """rowsft.apply + train == dense float64 SGD whose weight gradient is masked to the selected rows."""
    from rowsft.selection.choice import LayerChoice, Selection
    from rowsft.targets import find_targets, linear_shape, weight_out_in
    model = llama(torch.float64)
    rows = {n: torch.tensor([0, 3, 5]) for n in find_targets(model, ["up_proj", "q_proj"])}
    selection = Selection({n: LayerChoice("row", r, linear_shape(model.get_submodule(n))) for n, r in rows.items()})
    rowsft.apply(model, selection)
    batches = token_batches(n=3)
    train(model, batches, steps=3, lr=0.5, optimizer="sgd", schedule="constant", max_grad_norm=None, **QUIET)

    ref = llama(torch.float64)
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = {n: weight_out_in(ref.get_submodule(n)) for n in rows}
    for w in weights.values():
        w.requires_grad_(True)
    ref.train()
    for batch in batches:
        loss = dense_loss(ref, batch)
        grads = torch.autograd.grad(loss, list(weights.values()))
        with torch.no_grad():
            for (n, w), g in zip(weights.items(), grads):
                mask = torch.zeros_like(g)
                mask[rows[n]] = 1
                w -= 0.5 * g * mask
    rowsft.merge(model)
    for n in rows:
        ours = weight_out_in(model.get_submodule(n))
        assert torch.allclose(ours, weights[n], rtol=0, atol=1e-12), n
        assert not torch.equal(ours, weight_out_in(llama(torch.float64).get_submodule(n)))


@pytest.mark.parametrize("fused", [None, False])
def test_row_sparse_adamw_equals_a_hand_written_masked_dense_adamw(fused):
    """rowsft.apply + train with AdamW (fused by default on CPU, or torch's loop) == a hand-written float64 AdamW on
    the dense weight whose gradient, moments and decoupled decay act on the selected rows' update only."""
    from rowsft.selection.choice import LayerChoice, Selection
    from rowsft.targets import find_targets, linear_shape, weight_out_in
    model = llama(torch.float64)
    rows = {n: torch.tensor([1, 2, 6]) for n in find_targets(model, ["down_proj", "k_proj"])}
    selection = Selection({n: LayerChoice("row", r, linear_shape(model.get_submodule(n))) for n, r in rows.items()})
    rowsft.apply(model, selection)
    batches = token_batches(n=3)
    lr, (b1, b2), eps, decay = 0.05, (0.8, 0.95), 1e-6, 0.1
    train(model, batches, steps=3, lr=lr, betas=(b1, b2), eps=eps, weight_decay=decay, fused=fused,
          schedule="constant", max_grad_norm=None, **QUIET)

    ref = llama(torch.float64)
    for p in ref.parameters():
        p.requires_grad_(False)
    weights = {n: weight_out_in(ref.get_submodule(n)) for n in rows}
    start = {n: w.detach().clone() for n, w in weights.items()}
    moments = {n: (torch.zeros_like(w), torch.zeros_like(w)) for n, w in weights.items()}
    for w in weights.values():
        w.requires_grad_(True)
    ref.train()
    for t, batch in enumerate(batches, start=1):
        grads = torch.autograd.grad(dense_loss(ref, batch), list(weights.values()))
        with torch.no_grad():
            for (n, w), g in zip(weights.items(), grads):
                mask = torch.zeros_like(g)
                mask[rows[n]] = 1
                g, (m, v) = g * mask, moments[n]
                w -= lr * decay * (w - start[n]) * mask                     # decay pulls the update toward 0
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                w -= lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) * mask
    rowsft.merge(model)
    for n in rows:
        ours = weight_out_in(model.get_submodule(n))
        assert torch.allclose(ours, weights[n], rtol=0, atol=1e-10), n
        assert not torch.equal(ours, start[n])


def test_adamw_runs_fused_where_torch_can_and_refuses_fused_where_it_cannot():
    from rowsft.training.parts import build_optimizer
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(cpu, TrainConfig()).defaults["fused"] is True        # as transformers' Trainer defaults
    assert not build_optimizer(cpu, TrainConfig(fused=False)).defaults["fused"]
    meta = [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert not build_optimizer(meta, TrainConfig()).defaults["fused"]           # None: torch's loop where no kernel
    with pytest.raises(ValueError, match="fused=True.*meta.*fused=None"):
        build_optimizer(meta, TrainConfig(fused=True))
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        TrainConfig(fused="yes")


def test_ctrl_c_during_the_optimizer_step_is_held_until_the_step_is_complete():
    """A real SIGINT that arrives in the middle of optimizer.step() does not cut the update in half."""
    import os
    import signal

    class SlowSGD(torch.optim.SGD):
        """Updates parameter by parameter and gets a Ctrl-C after the first one."""

        def step(self, closure=None):
            with torch.no_grad():
                for i, p in enumerate(self.param_groups[0]["params"]):
                    p -= self.param_groups[0]["lr"] * p.grad
                    if i == 0 and self.state.setdefault("calls", [0]) == [0]:
                        self.state["calls"] = [1]
                        os.kill(os.getpid(), signal.SIGINT)

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)    # as in a terminal (a background job ignores it)
    try:
        model = train_mlp_only(llama(torch.float64))
        reference = train_mlp_only(llama(torch.float64))
        batch = token_batches(n=1)
        h = train(model, batch, steps=5, lr=0.1, optimizer=lambda ps: SlowSGD(ps, lr=0.1), max_grad_norm=None,
                  schedule="constant", **QUIET)
        assert h.stopped and h.stop_reason == "keyboard_interrupt" and len(h.steps) == 1
        train(reference, batch, steps=1, lr=0.1, optimizer="sgd", max_grad_norm=None, schedule="constant", **QUIET)
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-12), name  # every parameter got its update
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the caller's handler is back
    finally:
        signal.signal(signal.SIGINT, outer)


def test_training_leaves_an_ignored_ctrl_c_ignored():
    """A caller that ignores SIGINT (a background job, nohup) keeps ignoring it during every step."""
    import signal

    seen = []

    class Watching(torch.optim.SGD):
        def step(self, closure=None):
            seen.append(signal.getsignal(signal.SIGINT))
            return super().step(closure)

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model = train_mlp_only(llama(torch.float64))
        h = train(model, token_batches(n=1), steps=2, lr=0.1, optimizer=lambda ps: Watching(ps, lr=0.1),
                  max_grad_norm=None, schedule="constant", **QUIET)
        assert not h.stopped and len(h.steps) == 2
        assert seen == [signal.SIG_IGN, signal.SIG_IGN]
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_config_help_and_overrides():
    assert "grad_accum_steps" in TrainConfig.help() and "clip" in TrainConfig.help()
    cfg = TrainConfig(lr=3e-4, warmup_steps=5)
    h = train(train_mlp_only(llama()), token_batches(n=1), steps=1, config=cfg, lr=1e-3, **QUIET)
    assert h.config["lr"] == 1e-3 and h.config["warmup_steps"] == 5
    assert rowsft.TrainConfig is TrainConfig and rowsft.History is History


def test_trains_on_rowsft_batches_with_rowsft_evaluate(byte_tokenizer, mc_rows):
    """The real pieces together: Batches (re-iterable, padded, -100 on prompts) and evaluate as eval_data."""
    model = rowsft.tiny_model("llama", vocab_size=len(byte_tokenizer) + 4)
    rowsft.baselines.full_finetune(model)
    batches = rowsft.batches(mc_rows, byte_tokenizer, batch_size=2, max_length=48)
    evals = []

    def eval_fn(m):
        evals.append(rowsft.evaluate(m, byte_tokenizer, mc_rows, batch_size=4, max_length=48, progress=False))
        return evals[-1]

    h = train(model, batches, epochs=2, lr=1e-3, eval_data=eval_fn, eval_every=3, **QUIET)
    assert len(h.steps) == 2 * len(batches) and all(math.isfinite(x) for x in h.losses)
    assert [e["step"] for e in h.evals] == [3, 6] and h.evals[-1]["n"] == len(mc_rows)
    assert 0.0 <= h.evals[-1]["accuracy"] <= 1.0


# ---------------------------------------------------------------- bf16 autocast
def row_model():
    from rowsft.selection.choice import LayerChoice, Selection
    from rowsft.targets import find_targets, linear_shape
    model = llama()
    rows = {n: torch.tensor([0, 3, 5]) for n in find_targets(model, ["q_proj", "k_proj", "down_proj"])}
    return rowsft.apply(model, Selection({n: LayerChoice("row", r, linear_shape(model.get_submodule(n)))
                                          for n, r in rows.items()}))


def test_autocast_bf16_trains_as_a_hand_written_autocast_loop():
    """train(autocast="bf16") == a plain loop: forward and loss under torch.autocast to bf16, backward and a fused
    AdamW step outside it: the same losses and the same deltas, bit for bit; the weights stay float32, the rows
    train in the kept bf16 casts, and the run differs from a float32 one."""
    from rowsft.layers.cast_weights import kept_copies
    batches = token_batches(n=3)
    ours = row_model()
    history = train(ours, batches, steps=3, lr=1e-2, autocast="bf16", schedule="constant", max_grad_norm=None,
                    lean_logits=False, **QUIET)
    assert history.meta["autocast"] == "bf16" and kept_copies(ours)        # the rows went into the kept casts

    ref = row_model()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, fused=True)
    ref.train()
    losses = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = ref(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert history.losses == losses
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    for name, p in ref.named_parameters():
        assert p.dtype == torch.float32, name
        if p.requires_grad:
            assert torch.equal(mine[name], p) and p.abs().sum() > 0, name
    plain = train(row_model(), batches, steps=3, lr=1e-2, schedule="constant", max_grad_norm=None, lean_logits=False,
                  **QUIET)
    assert plain.losses[1:] != history.losses[1:]                          # float32 is another run


def test_autocast_refuses_what_it_cannot_run_before_anything_changes():
    from rowsft.training.parts import check_autocast
    for bad in ("fp16", "float16"):
        with pytest.raises(ValueError, match="loss scaling.*bf16"):
            TrainConfig(autocast=bad)
    with pytest.raises(ValueError, match="autocast must be None or 'bf16'"):
        TrainConfig(autocast="bfloat")
    with pytest.raises(ValueError, match="autocast=None"):
        check_autocast("bf16", torch.device("meta"))
    check_autocast("bf16", torch.device("cpu"))
    model = row_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="autocast"):
        train(model, token_batches(), steps=1, autocast="fp16", **QUIET)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
