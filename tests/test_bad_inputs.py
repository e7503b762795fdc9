"""Bad inputs are refused with an error that says what to do, before anything changes.

One row per bad input: the call, the error type, a key word of the fix the message must name.
Every row runs on a copy of a tiny Llama that already trained one step with rowsft row deltas, and
checks afterwards that every parameter (base weights and deltas), every ``requires_grad`` flag and
every merged flag is exactly as before the refused call.
"""
from __future__ import annotations

import copy
import math
import threading

import pytest
import torch
from _reference import random_batches
from transformers import Trainer, TrainingArguments

import rowsft
from rowsft import notebook as nb
from rowsft.cli import main
from rowsft.cli.job import JobConfig, config_from_mapping
from rowsft.evaluation.choices import evaluate
from rowsft.integrations import RowSFTTrainerCallback
from rowsft.layers import tuner
from rowsft.scoring.scorer import score
from rowsft.selection.strategies import select
from rowsft.targets import find_targets
from rowsft.training import TrainConfig, train
from rowsft.training.dynamic import DynamicMask
from rowsft.training.loop import TrainState

VOCAB = 128


def unlabelled(batches: list[dict]) -> list[dict]:
    """The same batches with every label -100 (nothing to learn from)."""
    return [{**b, "labels": torch.full_like(b["labels"], -100)} for b in batches]


class OneShotList:
    """A re-iterable that is not a list (DynamicMask checks lists up front; this reaches reselection)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    batches = random_batches(2, batch_size=2, seq_len=8, vocab_size=VOCAB, seed=0)
    scores = score(model, metric="magnitude")
    rowsft.apply(model, select(scores, 2))
    train(model, batches, steps=1, lr=1e-2, progress=False)
    assert any(float(layer.update.detach().abs().sum()) > 0 for layer in tuner.sparse_layers(model).values())
    return model, batches, scores


def snapshot(model) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "merged": {n: layer.merged for n, layer in tuner.sparse_layers(model).items()}}


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["grad"] == before["grad"] and after["merged"] == before["merged"]
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), f"{name} changed"


def scores_with(scores, value: float):
    """A copy of ``scores`` whose first layer's first entry is ``value``."""
    values = {n: scores[n].clone() for n in scores}
    first = next(iter(values))
    values[first][0] = value
    return type(scores)(values, scores.metric, scores.unit, scores.normalize, scores.shapes, scores.groups,
                        scores.scales, scores.meta)


def reselect_now(model, batches, metric):
    dynamic = DynamicMask(OneShotList(batches), metric=metric, every=1)
    optimizer = torch.optim.AdamW(tuner.parameters_to_train(model))
    return dynamic.reselect(TrainState(step=1, model=model, optimizer=optimizer))


def merged_then_train(model, batches):
    merged = rowsft.merge(copy.deepcopy(model))      # (merge + unmerge would round the base weights)
    before = snapshot(merged)
    try:
        train(merged, batches, steps=1, progress=False)
    finally:
        assert_unchanged(merged, before)


def trainer_without_apply(tmp_path):
    plain = rowsft.tiny_model("llama", vocab_size=VOCAB)
    before = snapshot(plain)
    rows = [{"input_ids": b["input_ids"][0], "attention_mask": b["attention_mask"][0], "labels": b["labels"][0]}
            for b in random_batches(4, batch_size=1, seq_len=8, vocab_size=VOCAB, seed=3)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=plain, args=args, train_dataset=rows, callbacks=[RowSFTTrainerCallback()])
    try:
        trainer.train()
    finally:
        assert_unchanged(plain, before)


INF, NAN = float("inf"), float("nan")
ROW = {"prompt": "Q?", "choices": ["a", "b"], "label": 0}

# id -> (call(model, batches, scores, tmp_path), error type, a key word of the fix in the message)
CASES = {
    # 1. non-finite optimiser settings
    "lr-inf": (lambda m, b, s, t: train(m, b, steps=1, lr=INF, progress=False), ValueError, "finite lr"),
    "lr-nan": (lambda m, b, s, t: train(m, b, steps=1, lr=NAN, progress=False), ValueError, "finite lr"),
    "eps-nan": (lambda m, b, s, t: train(m, b, steps=1, eps=NAN, progress=False), ValueError, "finite eps"),
    "weight_decay-inf": (lambda m, b, s, t: train(m, b, steps=1, weight_decay=INF), ValueError, "finite weight_decay"),
    "max_grad_norm-nan": (lambda m, b, s, t: train(m, b, steps=1, max_grad_norm=NAN), ValueError, "max_grad_norm"),
    "momentum-inf": (lambda m, b, s, t: TrainConfig(momentum=INF), ValueError, "finite momentum"),
    "betas-nan": (lambda m, b, s, t: TrainConfig(betas=(NAN, 0.9)), ValueError, "(0.9, 0.999)"),
    "lr-text": (lambda m, b, s, t: TrainConfig(lr="1e-3"), ValueError, "lr=0.001"),
    "lr-huge": (lambda m, b, s, t: train(m, b, steps=1, lr=1e37, progress=False), ValueError, "lr_range_test"),
    "lr-overflows-float32": (lambda m, b, s, t: train(m, b, steps=1, lr=1e300, progress=False), ValueError, "try 1e-3"),
    # 2. gradient metrics on batches without a labelled token
    **{f"score-{metric}-unlabelled": (lambda m, b, s, t, metric=metric: score(m, unlabelled(b), metric=metric,
                                                                             num_perturbations=2),
                                      ValueError, "labelled")
       for metric in ("taylor", "hessian", "fisher", "gradient", "zo-taylor")},
    "dynamic-unlabelled-list": (lambda m, b, s, t: DynamicMask(unlabelled(b), metric="taylor"), ValueError,
                                "labelled"),
    "dynamic-unlabelled-reselect": (lambda m, b, s, t: reselect_now(m, unlabelled(b), "gradient"), ValueError,
                                    "labelled"),
    # 3. non-finite scores
    "select-inf": (lambda m, b, s, t: select(scores_with(s, INF), 2), ValueError, "rescore"),
    "select-minus-inf": (lambda m, b, s, t: select(scores_with(s, -INF), 2), ValueError, "rescore"),
    # 4. negative or meaningless counts
    "evaluate-max_examples-negative": (lambda m, b, s, t: evaluate(m, None, [ROW], max_examples=-1), ValueError,
                                       "max_examples"),
    "evaluate-max_examples-zero": (lambda m, b, s, t: evaluate(m, None, [ROW], max_examples=0), ValueError,
                                   "max_examples"),
    "evaluate-batch_size-negative": (lambda m, b, s, t: evaluate(m, None, [ROW], batch_size=-2), ValueError,
                                     "batch_size"),
    "evaluate-max_length-zero": (lambda m, b, s, t: evaluate(m, None, [ROW], max_length=0), ValueError, "max_length"),
    "train-steps-negative": (lambda m, b, s, t: train(m, b, steps=-1), ValueError, "steps"),
    "train-steps-float": (lambda m, b, s, t: train(m, b, steps=2.5), ValueError, "steps"),
    "train-grad_accum-zero": (lambda m, b, s, t: train(m, b, steps=1, grad_accum_steps=0), ValueError,
                              "grad_accum_steps"),
    "train-log_every-negative": (lambda m, b, s, t: train(m, b, steps=1, log_every=-1), ValueError, "log_every"),
    "score-num_batches-negative": (lambda m, b, s, t: score(m, b, num_batches=-1), ValueError, "num_batches"),
    "score-num_batches-float": (lambda m, b, s, t: score(m, b, num_batches=1.5), ValueError, "num_batches"),
    "score-num_perturbations-zero": (lambda m, b, s, t: score(m, b, metric="zo-taylor", num_perturbations=0),
                                     ValueError, "num_perturbations"),
    "batches-batch_size-negative": (lambda m, b, s, t: rowsft.batches([ROW], None, batch_size=-1), ValueError,
                                    "batch_size"),
    "batches-batch_size-float": (lambda m, b, s, t: rowsft.batches([ROW], None, batch_size=2.7), ValueError,
                                 "batch_size must be a whole number"),
    "batches-max_length-float": (lambda m, b, s, t: rowsft.batches([ROW], None, max_length=64.5), ValueError,
                                 "max_length must be a whole number"),
    "batches-max_length-one": (lambda m, b, s, t: rowsft.batches([ROW], None, max_length=1), ValueError,
                               "max_length must be >= 2"),
    "dynamic-every-negative": (lambda m, b, s, t: DynamicMask(b, every=-5), ValueError, "every"),
    "dynamic-num_batches-zero": (lambda m, b, s, t: DynamicMask(b, num_batches=0), ValueError, "num_batches"),
    # 5. unknown or non-integer layers / module types, bad targets
    "find_targets-layer-999": (lambda m, b, s, t: find_targets(m, layers=[0, 999]), ValueError, "[999]"),
    "score-layer-999": (lambda m, b, s, t: score(m, metric="magnitude", layers=[0, 999]), ValueError, "[999]"),
    "select-layer-999": (lambda m, b, s, t: select(s, 2, layers=[0, 999]), ValueError, "[999]"),
    "find_targets-layer-float": (lambda m, b, s, t: find_targets(m, layers=[0.7]), ValueError, "whole"),
    "select-layer-float": (lambda m, b, s, t: select(s, 2, layers=[0.7]), ValueError, "whole"),
    "select-module_types-unknown": (lambda m, b, s, t: select(s, 2, module_types=["q_proj", "nonexistent"]),
                                    ValueError, "nonexistent"),
    "targets-int": (lambda m, b, s, t: find_targets(m, targets=123), TypeError, "list of module types"),
    "score-targets-int": (lambda m, b, s, t: score(m, metric="magnitude", targets=123), TypeError,
                          "list of module types"),
    # 6. job configs read per field type
    "job-steps-float": (lambda m, b, s, t: config_from_mapping({"steps": 2.7}), ValueError, "steps"),
    "job-bool-word": (lambda m, b, s, t: config_from_mapping({"eval_before": "perhaps"}), ValueError, "true or false"),
    "job-lr-word": (lambda m, b, s, t: config_from_mapping({"lr": "fast"}), ValueError, "2e-4"),
    "job-lr-inf": (lambda m, b, s, t: config_from_mapping({"lr": "inf"}), ValueError, "finite"),
    "job-metric": (lambda m, b, s, t: config_from_mapping({"metric": "tailor"}), ValueError, "taylor"),
    "job-budget": (lambda m, b, s, t: config_from_mapping({"budget": "lots"}), ValueError, "lora:8"),
    "job-targets-regex": (lambda m, b, s, t: config_from_mapping({"targets": "(("}), ValueError, "regular expression"),
    "job-method": (lambda m, b, s, t: JobConfig(method="magic"), ValueError, "choose one of"),
    # 7. progress takes True/False/callables only
    "score-progress-text": (lambda m, b, s, t: score(m, b, progress="yes"), TypeError, "False/None"),
    # 8. merged model, CUDA on a CPU-only torch
    "train-merged": (lambda m, b, s, t: merged_then_train(m, b), ValueError, "rowsft.unmerge(model)"),
    # 9. empty calibration, Trainer callback without rowsft.apply
    "dynamic-empty": (lambda m, b, s, t: DynamicMask([]), ValueError, "at least one batch"),
    "dynamic-empty-iterator": (lambda m, b, s, t: DynamicMask(iter([])), ValueError, "at least one batch"),
    "trainer-without-apply": (lambda m, b, s, t: trainer_without_apply(t), ValueError, "rowsft.apply"),
}
if not torch.cuda.is_available():
    CASES["train-cuda-without-cuda"] = (lambda m, b, s, t: train(m, b, steps=1, device="cuda"), ValueError,
                                        "device='cpu'")
    CASES["job-cuda-without-cuda"] = (lambda m, b, s, t: config_from_mapping({"device": "cuda"}), ValueError,
                                      "--device cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_and_changes_nothing(case, trained, tmp_path):
    torch.set_num_threads(1)
    model, batches, scores = trained
    model = copy.deepcopy(model)
    call, error, fix = CASES[case]
    before = snapshot(model)
    with pytest.raises(error) as info:
        call(model, batches, scores, tmp_path)
    assert fix in str(info.value), str(info.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--max-examples", "-3"], "--max-examples"),
    (["eval", "--batch-size", "0"], "--batch-size"),
    (["score", "--num-batches", "-1"], "--num-batches"),
])
def test_cli_refuses_negative_counts_before_loading(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "positive whole number" in err


@pytest.mark.parametrize("text, field", [("steps: 2.7\n", "steps"), ("lr: fast\n", "lr"),
                                         ("eval_before: perhaps\n", "eval_before")])
def test_cli_config_errors_come_before_the_model_loads(text, field, tmp_path, capsys, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was checked")
    monkeypatch.setattr("rowsft.cli.job.load_model", no_load)
    job = tmp_path / "job.yaml"
    job.write_text("model: tiny-llama\n" + text)
    assert main(["run", "--config", str(job)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rowsft run: error:") and field in err and "Traceback" not in err


def test_job_config_reads_each_field_by_its_type():
    cfg = config_from_mapping({"lr": "1e-3", "eval_before": "no", "progress": "false", "measure_peak": "0",
                               "steps": "3", "budget": 64, "eval_examples": "null", "targets": ["q_proj", "v_proj"]})
    assert cfg.lr == 0.001 and cfg.eval_before is False and cfg.progress is False and cfg.measure_peak is False
    assert cfg.steps == 3 and cfg.budget == "64" and cfg.eval_examples is None and cfg.targets == ["q_proj", "v_proj"]
    assert config_from_mapping({"eval_before": "yes", "steps": 4.0}).eval_before is True


def test_score_takes_progress_false_true_and_a_function(trained):
    model, batches, _ = trained
    seen = []
    for progress in (False, True, None, lambda stage, done, total: seen.append((stage, done, total))):
        result = score(copy.deepcopy(model), batches, metric="taylor", num_batches=2, progress=progress)
        assert all(torch.isfinite(v).all() for v in result.values())
    assert seen and seen[-1][1:] == (2, 2)


def test_dashboard_refuses_to_score_or_reselect_while_training():
    model = rowsft.tiny_model("llama", vocab_size=VOCAB)
    release, started = threading.Event(), threading.Event()

    def slow_train(model, batches, steps, lr, callbacks, stop_event, **kwargs):
        started.set()
        release.wait(30)
        return None

    cfg = nb.settings(fast=True, rows=2, steps=1, calibration_batches=1, lr=1e-2, lora_rank=2)
    dash = nb.Dashboard(model, random_batches(2, vocab_size=VOCAB), settings=cfg, metric="magnitude",
                        train_fn=slow_train, eval_fn=None)
    assert dash.chooser.status.kind == "success"
    scores_before, selection_before = dash.scores, dash.selection
    assert dash.launcher.launch() and started.wait(10)
    try:
        assert dash.is_training
        before = snapshot(model)
        dash.chooser.metric.value = "taylor"
        dash.chooser.button.click()                                  # Score during the run
        assert dash.chooser.status.kind == "error" and "training" in dash.chooser.status.message
        assert "Stop" in dash.chooser.status.message
        dash.budget.rows.value = 1                                   # a new budget during the run
        assert dash.budget.status.kind == "error" and "training" in dash.budget.status.message
        assert dash.scores is scores_before and dash.selection is selection_before and dash.budget.pending
        assert_unchanged(model, before)
        assert dash.launcher.running                                 # the run was not killed
    finally:
        release.set()
        dash.wait(30)
    assert dash.launcher.error is None, dash.launcher.status.message
    assert not dash.is_training and dash.chooser.run() is not None   # free again once the run ended
    assert math.isfinite(float(next(iter(dash.scores.values())).sum()))


@pytest.mark.parametrize("text, what", [("lr: [1\n", "not valid YAML"), ("{'lr': 1}", "not valid JSON")])
def test_cli_config_that_does_not_parse_names_the_file(text, what, tmp_path, capsys):
    job = tmp_path / ("job.yaml" if "YAML" in what else "job.json")
    job.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(job)])
    assert what in str(exit_info.value) and str(job) in str(exit_info.value)


@pytest.mark.parametrize("extra", [["--budget", "1000"], ["--targets", "nonexistent"], ["--method", "lora",
                                                                                          "--targets", "nonexistent"]])
def test_cli_budget_and_target_errors_come_before_the_first_evaluation(extra, capsys, monkeypatch):
    def no_eval(*args, **kwargs):
        raise AssertionError("evaluated before the budget and targets were checked")
    monkeypatch.setattr("rowsft.cli.job.evaluate", no_eval)
    argv = ["run", "--model", "tiny-llama", "--task", "boolq", "--steps", "1", "--max-train", "16", "--eval-examples",
            "4", "--calibration-batches", "1", "--batch-size", "2", "--max-length", "32", "--no-progress", *extra]
    assert main(argv) == 2
    assert "error" in capsys.readouterr().err


def test_explore_refuses_a_folder_as_cache_before_any_run(tmp_path):
    from rowsft.explore.budgets import ExploreConfig
    with pytest.raises(ValueError, match="is a folder"):
        ExploreConfig(model="tiny-llama", cache=str(tmp_path))
