"""rowsft under an unchanged transformers.Trainer: only deltas train, rowsft callbacks listen,
checkpoints carry an adapter that reloads into a fresh base model with identical outputs."""
from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

import rowsft
from rowsft.data.models import tiny_model
from rowsft.integrations import RowSFTModel, RowSFTTrainerCallback
from rowsft.selection.choice import LayerChoice, Selection
from rowsft.targets import find_targets, linear_shape

VOCAB, SEQ = 128, 12


def random_selection(model, k=4, seed=0) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in find_targets(model).items():
        d_out, d_in = linear_shape(module)
        layers[name] = LayerChoice("row", torch.sort(torch.randperm(d_out, generator=gen)[:k]).values, (d_out, d_in))
    return Selection(layers)


def dataset(n=8, seed=1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=gen)
    mask = torch.ones(SEQ, dtype=torch.long)
    return [{"input_ids": row, "attention_mask": mask, "labels": row.clone()} for row in ids]


def probe_batch() -> dict:
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                dataloader_num_workers=0, lr_scheduler_type="constant", weight_decay=0.0)
    base.update(kw)
    return TrainingArguments(**base)


class Recorder:
    def __init__(self, stop_at=None):
        self.events, self.steps, self.stop_at = [], [], stop_at

    def on_train_begin(self, state):
        self.events.append("begin")

    def on_step_end(self, state):
        self.steps.append({"step": state.step, "loss": state.loss, "lr": state.lr, "memory": dict(state.memory),
                           "max_steps": state.max_steps})
        if self.stop_at is not None and state.step >= self.stop_at:
            state.request_stop("test")

    def on_train_end(self, state):
        self.events.append("end")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trainer")
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    selection = random_selection(model)
    rowsft.apply(model, selection)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    recorder = Recorder()
    from rowsft.memory import MemoryCallback
    bridge = RowSFTTrainerCallback([MemoryCallback(measure_cpu=False), recorder])
    trainer = Trainer(model=model, args=make_args(tmp_path, save_strategy="steps", save_steps=3),
                      train_dataset=dataset(), callbacks=[bridge])
    trainer.train()
    return dict(model=model, selection=selection, before=before, recorder=recorder, bridge=bridge, trainer=trainer,
                out=tmp_path / "out")


def test_only_deltas_are_optimised(trained):
    model, trainer = trained["model"], trained["trainer"]
    deltas = {id(layer.delta) for layer in rowsft.layers.tuner.sparse_layers(model).values()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == deltas
    for name, p in model.named_parameters():
        if name in trained["before"]:
            assert torch.equal(p, trained["before"][name]), f"frozen {name} changed"
    assert all(float(layer.delta.detach().abs().sum()) > 0 for layer in rowsft.layers.tuner.sparse_layers(model).values())


def test_rowsft_callbacks_hear_the_trainer(trained):
    rec, trainer = trained["recorder"], trained["trainer"]
    assert rec.events == ["begin", "end"]
    assert [s["step"] for s in rec.steps] == [1, 2, 3]
    assert all(s["max_steps"] == 3 for s in rec.steps)
    assert all(math.isfinite(s["loss"]) and s["loss"] > 0 for s in rec.steps)
    assert all(s["lr"] == pytest.approx(1e-2) for s in rec.steps)
    # the memory callback filled state.memory from the Trainer's model and optimizer
    mem = rec.steps[-1]["memory"]
    n_delta = sum(layer.delta.numel() for layer in rowsft.layers.tuner.sparse_layers(trained["model"]).values())
    assert mem["trainable"] == n_delta * 4 and mem["optimizer"] == 2 * n_delta * 4 and mem["activations"] > 0
    # the per-step loss equals the Trainer's own logged loss (computed by the Trainer, not by the bridge)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3
    assert [s["loss"] for s in rec.steps] == pytest.approx(logged, rel=1e-3)
    history = trained["bridge"].history
    assert history.losses == [s["loss"] for s in rec.steps] and "memory_trainable" in history.steps[-1]


def test_checkpoint_adapter_reloads_into_fresh_model(trained):
    checkpoint = trained["out"] / "checkpoint-3"
    assert (checkpoint / "adapter_config.json").is_file() and (checkpoint / "adapter_model.safetensors").is_file()
    model = trained["model"].eval()
    batch = probe_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        fresh_plain = tiny_model("llama", vocab_size=VOCAB, seed=0).eval()
        base_logits = fresh_plain(**batch).logits
        assert not torch.allclose(expected, base_logits, atol=1e-4), "training changed nothing: the test cannot fail"
        reloaded = rowsft.load_adapter(fresh_plain, checkpoint)
        assert torch.equal(reloaded(**batch).logits, expected)
        wrapped = RowSFTModel.from_pretrained(tiny_model("llama", vocab_size=VOCAB, seed=0).eval(), checkpoint)
        assert torch.equal(wrapped(**batch).logits, expected)
        assert not any(p.requires_grad for p in wrapped.parameters())   # PEFT: inference unless is_trainable


def test_request_stop_ends_the_trainer(tmp_path):
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    rowsft.apply(model, random_selection(model, k=2))
    recorder = Recorder(stop_at=2)
    bridge = RowSFTTrainerCallback([recorder])
    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=6), train_dataset=dataset(), callbacks=[bridge])
    trainer.train()
    assert trainer.state.global_step == 2
    assert bridge.history.stopped and bridge.history.stop_reason == "test"
    assert recorder.events == ["begin", "end"]


def test_stop_event_and_plain_function_callbacks(tmp_path):
    import threading
    torch.set_num_threads(1)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    rowsft.apply(model, random_selection(model, k=2))
    stop = threading.Event()
    seen = []

    def on_step(state):
        seen.append(state.step)
        stop.set()

    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=5), train_dataset=dataset(),
                      callbacks=[RowSFTTrainerCallback([on_step], stop_event=stop)])
    trainer.train()
    assert seen == [1] and trainer.state.global_step == 1


def test_checkpoint_without_adapter_gives_clear_error(tmp_path):
    from rowsft.integrations import trainer_checkpoint_adapter
    os.makedirs(tmp_path / "checkpoint-1")
    with pytest.raises(FileNotFoundError, match="RowSFTTrainerCallback"):
        trainer_checkpoint_adapter(tmp_path / "checkpoint-1")
