"""Live curves and the Launch / Stop launcher: throttled, thread-safe, one point per step, clean stops.

Runs use the fake trainer of ``test_notebook_fakes`` and, where ``rowsft.training`` exists, the real
``rowsft.train`` on the tiny Llama (vocab 128, random tokens) with sparse rows applied by the tuner.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch
from test_notebook_fakes import FakeState, fake_score, fake_select, fake_train, random_batches, tiny_llama

from rowsft import notebook as nb


def sparse_model(rows: int = 4):
    from rowsft.layers import tuner
    model = tiny_llama()
    tuner.apply(model, fake_select(fake_score(model, [], num_batches=1), rows))
    return model


def figure_points(curves, run, metric):
    t = [t for t in curves.figure.data if t.meta == {"run": run, "metric": metric}]
    assert len(t) == 1
    return list(t[0].x), list(t[0].y)


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


# ------------------------------------------------------------------ live curves
def test_live_curves_throttle_and_final_flush():
    curves = nb.LiveCurves(("loss", "memory"), min_interval=3600)
    cb = curves.callback("row-sparse")
    state = FakeState(None, 5)
    cb.on_train_begin(state)
    for step in range(1, 6):
        state.step, state.loss, state.memory = step, 10.0 / step, {"total": step * 2 ** 20}
        cb.on_step_end(state)
    assert curves.points("row-sparse", "loss") == ([1, 2, 3, 4, 5], [10.0, 5.0, 10 / 3, 2.5, 2.0])
    assert figure_points(curves, "row-sparse", "loss")[0] == []      # throttled: not drawn yet
    cb.on_train_end(state)                                            # final flush
    x, y = figure_points(curves, "row-sparse", "loss")
    assert x == [1, 2, 3, 4, 5] and y == pytest.approx([10.0, 5.0, 10 / 3, 2.5, 2.0], rel=1e-4)
    assert figure_points(curves, "row-sparse", "memory")[1] == pytest.approx([1, 2, 3, 4, 5])   # MiB


def test_live_curves_overlay_runs_and_restart_a_name():
    curves = nb.LiveCurves(("loss",), min_interval=0)
    for run, losses in (("row-sparse", [3.0, 2.0]), ("LoRA", [3.5, 2.5, 2.0]), ("full", [3.0])):
        cb = curves.callback(run)
        state = FakeState(None, len(losses))
        cb.on_train_begin(state)
        for step, loss in enumerate(losses, start=1):
            state.step, state.loss = step, loss
            cb.on_step_end(state)
        cb.on_train_end(state)
    assert curves.runs == ["row-sparse", "LoRA", "full"]
    assert [len(figure_points(curves, r, "loss")[0]) for r in curves.runs] == [2, 3, 1]
    colors = [t.line.color for t in curves.figure.data]
    assert len(set(colors)) == 3
    again = curves.callback("LoRA")
    again.on_train_begin(FakeState(None, 1))                          # same name: a fresh curve
    assert figure_points(curves, "LoRA", "loss")[0] == []
    assert len([t for t in curves.figure.data if t.meta.get("kind", "raw") == "raw"]) == 3


def test_live_curves_draw_a_running_mean_once_a_run_is_long_enough():
    curves = nb.LiveCurves(("loss", "memory"), min_interval=0)
    cb = curves.callback("rows")
    state = FakeState(None, 40)
    cb.on_train_begin(state)
    losses = [3.0 - 0.05 * i + (0.4 if i % 2 else -0.4) for i in range(40)]
    mean = [t for t in curves.figure.data if t.meta.get("kind") == "mean"]
    assert [t.meta["metric"] for t in mean] == ["loss"]          # memory is not noisy: no mean trace
    for step, loss in enumerate(losses[:5], start=1):
        state.step, state.loss = step, loss
        cb.on_step_end(state)
    cb.on_train_end(state)
    assert list(mean[0].x) == []                                  # 5 points: too short for a mean
    for step, loss in enumerate(losses[5:], start=6):
        state.step, state.loss = step, loss
        cb.on_step_end(state)
    cb.on_train_end(state)
    window = 4                                                    # 40 points // 10
    by_hand = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1]) for i in range(40)]
    assert list(mean[0].x) == list(range(1, 41))
    assert list(mean[0].y) == pytest.approx(by_hand, rel=1e-3)
    assert mean[0].line.color == figure_line_color(curves, "rows", "loss")
    raw = [t for t in curves.figure.data if t.meta == {"run": "rows", "metric": "loss"}][0]
    assert raw.mode == "markers" and raw.opacity < 1              # the raw points turn faint


def figure_line_color(curves, run, metric):
    return [t for t in curves.figure.data if t.meta == {"run": run, "metric": metric}][0].line.color


def test_live_curves_accept_points_from_many_threads():
    curves = nb.LiveCurves(("loss",), min_interval=0.001)

    def feed(run):
        cb = curves.callback(run)
        state = FakeState(None, 200)
        for step in range(1, 201):
            state.step, state.loss = step, float(step)
            cb.on_step_end(state)
        cb.on_train_end(state)
    threads = [threading.Thread(target=feed, args=(f"run{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert figure_points(curves, f"run{i}", "loss")[0] == list(range(1, 201))


# ------------------------------------------------------------------ launcher
def test_launch_trains_the_requested_steps_and_summarises():
    model = sparse_model()
    curves = nb.LiveCurves(("loss", "memory"), min_interval=0.5)
    accuracies = iter([0.25, 0.75])
    calls = []

    def train_fn(*args, **kwargs):
        calls.append(kwargs)
        return fake_train(*args, **kwargs)
    launcher = nb.TrainLauncher(model, random_batches(3), steps=7, lr=1e-2, curves=curves, train_fn=train_fn,
                                eval_fn=lambda m: {"accuracy": next(accuracies)})
    launcher.launch_button.click()
    history = launcher.wait(timeout=60)
    assert len(history.steps) == 7 and not launcher.running
    assert isinstance(calls[0]["stop_event"], threading.Event)
    x, y = figure_points(curves, "row-sparse", "loss")
    assert x == list(range(1, 8)) and y == pytest.approx(history.losses, rel=1e-4)   # one point per step
    assert len(figure_points(curves, "row-sparse", "memory")[0]) == 7
    s = launcher.summary
    assert (s.steps, s.max_steps, s.stopped) == (7, 7, False)
    assert (s.accuracy_before, s.accuracy_after) == (0.25, 0.75)
    assert s.peak_memory == 7 * 2 ** 20 and s.seconds > 0
    assert "25.0 % → 75.0 %" in launcher.summary_html.value
    assert launcher.status.kind == "success" and launcher.progress.value == 7


def test_launch_while_running_says_so_and_starts_nothing():
    model = sparse_model()
    gate = threading.Event()
    calls = []

    def slow_train(*args, **kwargs):
        calls.append(1)
        gate.wait(30)
        return fake_train(*args, **kwargs)
    launcher = nb.TrainLauncher(model, random_batches(2), steps=2, train_fn=slow_train)
    assert launcher.launch() is True
    launcher.launch_button.click()
    assert launcher.status.kind == "error" and "already in progress" in launcher.status.message
    gate.set()
    launcher.wait(60)
    assert len(calls) == 1 and launcher.history is not None
    assert launcher.launch() is True                      # usable again afterwards
    launcher.wait(60)
    assert len(calls) == 2


def test_errors_before_and_during_a_run_show_a_message():
    model = sparse_model()

    def no_selection(model):
        raise ValueError("no layer picked: tick at least one module type and one block")
    launcher = nb.TrainLauncher(model, random_batches(2), steps=2, train_fn=fake_train, prepare=no_selection)
    assert launcher.launch() is False and launcher._thread is None
    assert launcher.status.kind == "error" and "no layer picked" in launcher.status.message

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    launcher = nb.TrainLauncher(model, random_batches(2), steps=2, train_fn=broken)
    launcher.launch()
    launcher.wait(60)
    assert launcher.status.kind == "error" and "out of memory (simulated)" in launcher.status.message
    assert isinstance(launcher.error, RuntimeError) and not launcher.running
    assert launcher.stop_button.disabled
    launcher.steps.value = 1
    launcher.lr.value = -1.0
    assert launcher.launch() is False and "lr > 0" in launcher.status.message
    launcher.stop()                                       # nothing running: a note, no error
    assert launcher.status.kind == "info"


def test_foreground_mode_trains_without_a_thread():
    launcher = nb.TrainLauncher(sparse_model(), random_batches(2), steps=3, train_fn=fake_train, background=False)
    assert launcher.launch() and launcher._thread is None and len(launcher.history.steps) == 3


def _stop_within_one_step(train_fn, model, **train_kwargs):
    """Launch a long run, press Stop after a few steps; return (steps when pressed, history, snapshots)."""
    curves = nb.LiveCurves(("loss",), min_interval=0)
    snapshots = {}

    class Snapshot:
        """Trainable weights after every completed step (taken in the training thread)."""

        def on_step_end(self, state):
            snapshots[state.step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    launcher = nb.TrainLauncher(model, random_batches(3), steps=100_000, lr=1e-2, curves=curves,
                                train_fn=lambda *a, callbacks=(), **k: train_fn(*a, callbacks=[*callbacks, Snapshot()], **k),
                                train_kwargs=train_kwargs)
    launcher.launch()
    wait_for(lambda: len(curves.points("row-sparse", "loss")[0]) >= 3)
    pressed_at = len(curves.points("row-sparse", "loss")[0])
    launcher.stop_button.click()
    history = launcher.wait(60)
    assert not launcher.running
    return pressed_at, history, snapshots, launcher


def check_consistent_after_stop(model, history, pressed_at, snapshots, launcher):
    last = len(history.steps)
    assert history.stopped and pressed_at <= last <= pressed_at + 1      # within one step
    assert launcher.summary.stopped and launcher.status.kind == "success"
    now = [p.detach() for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(now, snapshots[last]))  # no update after the last reported step
    assert all(torch.isfinite(p).all() for p in now)
    out = model(**random_batches(1)[0])
    assert torch.isfinite(out.loss)


def test_stop_ends_a_fake_run_within_one_step():
    model = sparse_model()
    slow = lambda *a, **k: fake_train(*a, step_delay=0.02, **k)  # noqa: E731
    pressed_at, history, snapshots, launcher = _stop_within_one_step(slow, model)
    check_consistent_after_stop(model, history, pressed_at, snapshots, launcher)


def test_real_train_launch_and_stop_on_tiny_llama():
    training = pytest.importorskip("rowsft.training")
    model = sparse_model()
    curves = nb.LiveCurves(("loss", "memory"), min_interval=0.5)
    launcher = nb.TrainLauncher(model, random_batches(3), steps=5, lr=1e-2, curves=curves)
    launcher.launch()
    history = launcher.wait(120)
    assert launcher.error is None, launcher.status.message
    assert len(history.steps) == 5 and figure_points(curves, "row-sparse", "loss")[0] == [1, 2, 3, 4, 5]
    # memory per step from rowsft.memory.MemoryCallback: its analytic total, in MiB
    x, y = figure_points(curves, "row-sparse", "memory")
    assert x == [1, 2, 3, 4, 5]
    assert y == pytest.approx([r["memory_total"] / 2 ** 20 for r in history.steps], rel=1e-3)
    assert launcher.summary.peak_memory == max(r["memory_total"] for r in history.steps)
    pressed_at, history, snapshots, launcher = _stop_within_one_step(training.train, model)
    check_consistent_after_stop(model, history, pressed_at, snapshots, launcher)
    assert history.stop_reason == "stop_event"


def test_second_launch_starts_its_progress_at_zero():
    """A caller polling ``progress.value`` right after Launch must not see the previous run's last step."""
    seen = []

    def recording_train(model, batches, steps=None, **kwargs):
        seen.append((launcher.progress.value, launcher.progress.max))
        return fake_train(model, batches, steps=steps, **kwargs)

    launcher = nb.TrainLauncher(sparse_model(), random_batches(2), steps=3, train_fn=recording_train, background=False)
    assert launcher.launch() and launcher.progress.value == 3
    launcher.steps.value = 5
    assert launcher.launch()
    assert seen == [(0, 3), (0, 5)] and launcher.progress.value == 5
