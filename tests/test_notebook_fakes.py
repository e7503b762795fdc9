"""Small stand-ins for rowsft's verbs, following the contracts of the shared brief exactly.

The notebook controls take their verbs as arguments (``score_fn``, ``select_fn``, ``predict_fn``,
``lora_parity_fn``, ``train_fn``), so they can be tested before and independently of the real
scoring, selection, memory and training modules. The fakes are deliberately simple and
predictable (magnitude scores, top-k rows, analytic bytes, plain SGD), which lets the tests
compute the expected selection, memory and curves on their own. The tests at the bottom check
that the fakes keep to the contracts (types, shapes, callback order, stop semantics).
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass

import pytest
import torch
from _reference import random_batches as zoo_random_batches

from rowsft.scoring.scores import Scores
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, layer_index, linear_shape, module_type, weight_out_in

VOCAB = 128


def tiny_llama(seed: int = 0):
    from rowsft.data.models import tiny_model
    return tiny_model("llama", vocab_size=VOCAB, seed=seed)


def random_batches(n: int = 4, batch_size: int = 2, seq_len: int = 12, seed: int = 0) -> list[dict]:
    """Causal-LM batches of random tokens (labels = inputs)."""
    return zoo_random_batches(n, batch_size, seq_len, VOCAB, seed)


# ------------------------------------------------------------------ scoring
UNAVAILABLE = {("activation", "element"): "the activation metric scores neurons, not single weights; "
                                          "choose unit row, column or group"}


def fake_score(model, batches, metric="magnitude", unit="row", targets="all-linear", num_batches=8, **kwargs):
    """Row/column L2 norms of the weights (magnitude) or seeded noise (random); draws ``num_batches`` batches."""
    if (metric, unit) in UNAVAILABLE:
        raise ValueError(UNAVAILABLE[(metric, unit)])
    if metric not in ("magnitude", "random", "activation"):
        raise ValueError(f"unknown metric {metric!r}")
    for i, _batch in enumerate(batches):
        if i + 1 >= num_batches:
            break
    modules = find_targets(model, targets)
    g = torch.Generator().manual_seed(0)
    values, shapes = {}, {}
    for name, m in modules.items():
        w = weight_out_in(m).detach().float()
        shapes[name] = linear_shape(m)
        if metric == "random":
            v = torch.rand(w.shape, generator=g)
        else:
            v = w.abs() ** 2
        values[name] = {"row": v.sum(1), "column": v.sum(0), "element": v}[unit]
    return Scores(values, metric, unit, "none", shapes)


# ------------------------------------------------------------------ selection
@dataclass(frozen=True)
class FakeLoraParity:
    rank: int


def fake_lora_parity(rank: int) -> FakeLoraParity:
    return FakeLoraParity(int(rank))


def parity_rows(rank: int, shape) -> int:
    d_out, d_in = shape
    return min(d_out, math.ceil(rank * (d_out + d_in) / d_in))


def fake_select(scores, budget, strategy="per-layer", multiple_of=1, min_per_layer=None, max_per_layer=None,
                module_types=None, layers=None):
    """Top-k rows of each chosen layer: k = budget (int), round(budget * d_out) (float), LoRA parity."""
    chosen = {}
    for name, v in scores.items():
        if module_types is not None and module_type(name) not in module_types:
            continue
        if layers is not None and layer_index(name) not in layers:
            continue
        shape = scores.shapes[name]
        n = v.numel()
        if isinstance(budget, FakeLoraParity):
            k = parity_rows(budget.rank, shape)
        elif isinstance(budget, float):
            k = max(1, round(budget * n))
        else:
            k = int(budget)
        if k > n:
            raise ValueError(f"budget {k} is larger than {name} ({n} rows)")
        idx = torch.sort(torch.topk(v.reshape(-1), k).indices).values
        chosen[name] = LayerChoice(scores.unit, idx, shape)
    if not chosen:
        raise ValueError("no layer matches module_types/layers")
    return Selection(chosen, {"budget": repr(budget)})


# ------------------------------------------------------------------ memory
@dataclass
class FakeMemoryReport:
    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int
    indices: int
    method: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.gradients + self.optimizer + self.activations + self.indices

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def fake_predict(model, what, batch_size, seq_len, rank=8, targets=None):
    """4-byte parameters, AdamW (2 states), activations = batch·seq·hidden·layers·16 bytes; LoRA on ``targets``.
    (Unlike rowsft.memory's report, ``weights`` here excludes the trainable bytes; both forms are drawn.)"""
    n_total = sum(p.numel() for p in model.parameters())
    hidden, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    activations = batch_size * seq_len * hidden * n_layers * 16
    if what == "full":
        trainable, indices, method = n_total, 0, "full"
    elif what == "lora":
        shapes = [linear_shape(m) for m in find_targets(model, targets or "all-linear").values()]
        trainable, indices, method = sum(rank * (o + i) for o, i in shapes), 0, f"lora-r{rank}"
    else:
        trainable, indices, method = what.trainable_parameters, 8 * sum(c.k for c in what.layers.values()), "rowsft"
    extra = trainable if what == "full" else 0
    return FakeMemoryReport(weights=4 * (n_total - extra), trainable=4 * trainable, gradients=4 * trainable,
                            optimizer=8 * trainable, activations=activations, indices=indices, method=method)


# ------------------------------------------------------------------ training
class FakeState:
    """The fields of TrainState that callbacks read."""

    def __init__(self, model, max_steps):
        self.step, self.max_steps, self.loss, self.lr, self.epoch, self.elapsed = 0, max_steps, math.nan, 0.0, 0, 0.0
        self.memory, self.metrics, self.history, self.model, self.stop_reason = {}, {}, None, model, None

    def request_stop(self, reason="request_stop"):
        self.stop_reason = self.stop_reason or reason


class FakeHistory:
    def __init__(self):
        self.steps, self.evals, self.stopped, self.stop_reason, self.wall_time = [], [], False, None, 0.0

    @property
    def losses(self):
        return [s["loss"] for s in self.steps]


def fake_train(model, batches, steps=None, epochs=None, lr=1e-4, config=None, callbacks=(), eval_data=None,
               stop_event=None, step_delay: float = 0.0, **overrides):
    """Plain SGD on the parameters that require grad, reporting memory = 1 MiB × step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no parameter requires grad: apply a selection first")
    state, history = FakeState(model, steps), FakeHistory()
    state.history = history
    hooks = lambda name: [getattr(c, name) for c in callbacks if hasattr(c, name)]  # noqa: E731
    start = time.perf_counter()
    for h in hooks("on_train_begin"):
        h(state)
    batches = list(batches)
    while state.step < steps:
        if (stop_event is not None and stop_event.is_set()) or state.stop_reason:
            state.request_stop("stop_event")
            break
        batch = batches[state.step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad
                p.grad = None
        time.sleep(step_delay)
        state.step += 1
        state.loss, state.lr, state.elapsed = float(loss.detach()), lr, time.perf_counter() - start
        state.memory = {"total": float(2 ** 20 * state.step)}
        history.steps.append({"step": state.step, "loss": state.loss, "lr": lr, "elapsed": state.elapsed,
                              "memory_total": state.memory["total"]})
        for h in hooks("on_step_end"):
            h(state)
    history.stopped = state.stop_reason is not None
    history.stop_reason = state.stop_reason
    for h in hooks("on_train_end"):
        h(state)
    return history


# ------------------------------------------------------------------ the fakes keep to the contracts
def test_fake_score_and_select_follow_the_contracts():
    model = tiny_llama()
    scores = fake_score(model, random_batches(2), metric="magnitude", unit="row", num_batches=2)
    up = "model.layers.0.mlp.up_proj"
    assert scores[up].shape == (scores.shapes[up][0],) and scores[up].dtype == torch.float32
    selection = fake_select(scores, 4)
    assert isinstance(selection, Selection)
    selection.validate()
    expected = torch.sort(torch.topk(scores[up], 4).indices).values
    assert torch.equal(selection[up], expected)
    with pytest.raises(ValueError, match="larger than"):
        fake_select(scores, 10_000)
    with pytest.raises(ValueError, match="not single weights"):
        fake_score(model, [], metric="activation", unit="element")


def test_fake_train_calls_hooks_in_order_and_stops_on_event():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(True)
    seen = []

    class Recorder:
        def on_train_begin(self, state):
            seen.append(("begin", state.step))

        def on_step_end(self, state):
            seen.append(("step", state.step))

        def on_train_end(self, state):
            seen.append(("end", state.step))

    event = threading.Event()
    event.set()
    history = fake_train(model, random_batches(2), steps=3, callbacks=[Recorder()], stop_event=event)
    assert seen == [("begin", 0), ("end", 0)] and history.stopped
    seen.clear()
    history = fake_train(model, random_batches(2), steps=3, callbacks=[Recorder()])
    assert seen == [("begin", 0), ("step", 1), ("step", 2), ("step", 3), ("end", 3)]
    assert len(history.steps) == 3 and not history.stopped
