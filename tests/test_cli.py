"""The `rowsft` command: --help everywhere, clear errors for bad input, and a full tiny run end to end."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rowsft.cli import build_parser, main

SUBCOMMANDS = ("run", "train", "score", "eval", "merge")
TINY_RUN = ["--model", "tiny-llama", "--task", "boolq", "--steps", "2", "--max-train", "16", "--eval-examples", "8",
            "--calibration-batches", "1", "--batch-size", "2", "--max-length", "64"]


def offline_env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def rowsft_command() -> list[str]:
    script = Path(sys.executable).with_name("rowsft")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rowsft.cli"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in offline_env().items():
        if key.startswith(("HF_", "TRANSFORMERS_")):
            monkeypatch.setenv(key, value)


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return list(action.choices)


def test_every_subcommand_has_help(capsys):
    names = subcommands()
    assert set(SUBCOMMANDS) <= set(names)
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in SUBCOMMANDS)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        out = capsys.readouterr().out
        assert out.startswith(f"usage: rowsft {name}"), out[:80]
        assert "--model" in out


def test_job_flags_show_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--budget", "--steps", "--calibration-batches", "--eval-examples", "--config"):
        assert flag in out
    assert "lora:8" in out          # the budget help names its forms


@pytest.mark.parametrize("budget", ["lots", "lora:x", "-"])
def test_bad_budget_is_a_clear_error(budget, capsys):
    assert main(["run", *TINY_RUN, "--budget", budget]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and budget in err and "lora:8" in err


def test_bad_numbers_are_clear_errors(capsys):
    assert main(["run", *TINY_RUN[:-2], "--max-length", "0"]) == 2
    assert "max_length must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:        # argparse refuses a non-number itself
        main(["run", "--steps", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_unknown_method_is_a_clear_error(capsys):
    assert main(["run", *TINY_RUN, "--method", "magic"]) == 2
    assert "method 'magic' is unknown" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(capsys):
    code = main(["run", *TINY_RUN[2:], "--model", "no-such-model-xyz"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("rowsft run: error:") and "no-such-model-xyz" in err


def test_missing_config_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "job.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(missing)])
    assert exit_info.value.code not in (0, None)
    assert f"config file {missing} does not exist" in str(exit_info.value.code)


def test_config_file_with_unknown_key_is_a_clear_error(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("model: tiny-llama\nstep: 2\n")          # typo: step instead of steps
    assert main(["run", "--config", str(job)]) == 2
    err = capsys.readouterr().err
    assert "unknown config keys ['step']" in err and "steps" in err


def _accuracy(text: str, when: str) -> float:
    match = re.search(rf"accuracy {when}:\s+([0-9.]+)", text)
    assert match, f"no 'accuracy {when}' in output:\n{text[-2000:]}"
    return float(match[1])


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--budget", "8", "--no-progress"]], ids=["as-documented", "budget-8"])
def test_full_tiny_run_prints_accuracies(extra):
    result = subprocess.run([*rowsft_command(), "run", *TINY_RUN, *extra], capture_output=True, text=True,
                            timeout=85, env=offline_env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for when in ("before", "after"):
        assert 0.0 <= _accuracy(out, when) <= 1.0
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", out)
    assert "== rowsft result" in out
    assert re.search(r"accuracy after:\s+[0-9.]+ \(95% CI [0-9.]+–[0-9.]+, n=8\)", out), out[-1500:]
    assert re.search(r"majority class:\s+[0-9.]+", out)
    assert re.search(r"paired change:\s+[+-][0-9.]+ points \(\d+ questions fixed, \d+ broken; exact McNemar p = ", out)
    assert re.search(r"wall time:\s+[0-9.]+ s", out)


def test_train_refuses_a_file_or_a_foreign_folder_before_loading(tmp_path, capsys, monkeypatch):
    import rowsft.cli.job as job
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the model was loaded before --out was checked"))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert main(["train", *TINY_RUN, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    for method in ("rowsft", "lora", "full"):
        assert main(["train", *TINY_RUN, "--method", method, "--out", str(folder)]) == 2
        err = capsys.readouterr().err
        assert "not empty" in err and "overwrite" in err, err
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rowsft", "lora"])
def test_train_with_overwrite_keeps_the_other_files(method, tmp_path):
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "README.md").write_text("mine")
    (folder / "checkpoint-500").mkdir()
    assert main(["train", *TINY_RUN, "--method", method, "--no-progress", "--out", str(folder), "--overwrite"]) == 0
    names = sorted(p.name for p in folder.iterdir())
    assert {"README.md", "checkpoint-500", "adapter_config.json"} <= set(names), names
    assert (folder / "README.md").read_text() == "mine"
    assert not any(name.startswith(".") for name in names), names


def test_job_flags_without_a_subcommand_run_the_main_job(monkeypatch):
    import rowsft.cli.commands as commands
    seen = []
    monkeypatch.setattr(commands, "cmd_run", lambda args: seen.append(args) or 0)
    build = commands.build_parser

    def parser_with_fake_run():
        parser = build()
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        action.choices["run"].set_defaults(func=commands.cmd_run)
        return parser

    monkeypatch.setattr(commands, "build_parser", parser_with_fake_run)
    assert main(["--steps", "5", "--no-progress"]) == 0 and main([]) == 0
    assert seen[0].steps == 5 and seen[0].progress is False and seen[1].steps is None


def test_bad_quantization_flags_are_refused_before_loading(capsys, monkeypatch):
    import rowsft.cli.job as job
    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the flags"))
    for flags, words in ((["--quantization", "int4"], "quantization must be one of"),
                         (["--quantization", "int8", "--double-quant"], "double_quant=True applies to the 4-bit kinds"),
                         (["--double-quant"], "needs quantization='nf4' or 'fp4'"),
                         (["--quantization", "nf4", "--method", "full"], "full fine-tuning cannot train quantized"),
                         (["--train-in-weight", "--method", "lora"], "it goes with method rowsft, not lora"),
                         (["--quantization", "nf4", "--train-in-weight"], "cannot write rows into a quantized"),
                         (["--autocast", "fp16"], "float16 needs loss scaling")):
        assert main(["run", *TINY_RUN, *flags]) == 2, flags
        assert words in capsys.readouterr().err, flags


def test_a_job_training_rows_in_the_weight_trains_as_the_usual_job(monkeypatch):
    import rowsft.cli.job as job
    models = []

    def recording_load_model(*args, **kwargs):
        models.append(job_load_model(*args, **kwargs)[0])
        return models[-1], job_load_model(*args, **kwargs)[1]
    job_load_model = job.load_model
    monkeypatch.setattr(job, "load_model", recording_load_model)
    results = [job.run_job(job.JobConfig(model="tiny-llama", task="boolq", steps=3, max_train=16, eval_examples=8,
                                         calibration_batches=1, batch_size=2, max_length=64, progress=False,
                                         device="cpu", train_in_weight=inside), log=lambda line: None)
               for inside in (False, True)]
    usual, inside = ([m for m in model.modules() if hasattr(m, "in_weight")] for model in models)
    assert usual and not any(m.in_weight for m in usual) and all(m.in_weight for m in inside)
    for a, b in zip(usual, inside):
        assert a.delta.abs().max() > 0
        torch.testing.assert_close(b.delta, a.delta, rtol=1e-4, atol=1e-6)
    assert results[1].correct_after == results[0].correct_after
    assert results[1].config["train_in_weight"] is True


def test_a_job_under_bf16_autocast_trains_its_rows_in_the_kept_casts(monkeypatch):
    import rowsft.cli.job as job
    from rowsft.layers.cast_weights import kept_copies
    models = []

    def recording_load_model(*args, **kwargs):
        model, tokenizer = job_load_model(*args, **kwargs)
        models.append(model)
        return model, tokenizer
    job_load_model = job.load_model
    monkeypatch.setattr(job, "load_model", recording_load_model)
    result = job.run_job(job.JobConfig(model="tiny-llama", task="boolq", steps=2, max_train=16, eval_examples=8,
                                       calibration_batches=1, batch_size=2, max_length=64, progress=False,
                                       device="cpu", autocast="bf16"), log=lambda line: None)
    model = models[-1]
    assert kept_copies(model) and result.config["autocast"] == "bf16"
    assert result.history["meta"]["autocast"] == "bf16"
    deltas = [m.delta for m in model.modules() if hasattr(m, "in_weight")]
    assert deltas and all(d.dtype == torch.float32 for d in deltas) and any(d.abs().max() > 0 for d in deltas)


@pytest.mark.parametrize("method", ["rowsft", "lora"])
def test_a_job_on_an_nf4_base_trains_over_4bit_layers_and_saves_its_adapter(method, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    import rowsft.cli.job as job
    loaded = {}

    def recording_load_model(*args, **kwargs):
        loaded["kwargs"] = kwargs
        loaded["model"], tokenizer = job_load_model(*args, **kwargs)
        return loaded["model"], tokenizer
    job_load_model = job.load_model
    monkeypatch.setattr(job, "load_model", recording_load_model)
    cfg = job.JobConfig(model="tiny-llama", task="boolq", steps=2, max_train=16, eval_examples=8, calibration_batches=1,
                        batch_size=2, max_length=64, method=method, quantization="NF4", double_quant=True,
                        out=str(tmp_path / "adapter"), progress=False, device="cpu")
    result = job.run_job(cfg, log=lambda line: None)
    assert loaded["kwargs"] == {"quantization": "nf4", "double_quant": True, "device": "cpu"}
    layers = [m for m in loaded["model"].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_state.nested for m in layers)       # trained over double-quantized nf4
    assert 0.0 <= result.accuracy_after <= 1.0 and result.paired is not None
    assert result.config["quantization"] == "nf4" and result.config["double_quant"] is True
    assert any((tmp_path / "adapter").iterdir())


def test_jobs_with_other_seeds_score_the_same_held_out_questions_and_never_train_on_them(monkeypatch):
    # rotten_tomatoes ships as one file: the job splits it. The split follows split_seed, not seed, so runs with
    # several seeds (and `rowsft eval`, which splits with the default) are scored on the same questions.
    import rowsft.cli.job as job
    from rowsft.data import load_dataset
    evaluated, trained = {}, {}
    real_evaluate, real_batches = job.evaluate, job.make_batches

    def recording_evaluate(model, tokenizer, dataset, **kwargs):
        evaluated.setdefault(seed, set()).update(dataset["prompt"])
        return real_evaluate(model, tokenizer, dataset, **kwargs)

    def recording_batches(dataset, *args, **kwargs):
        trained[seed] = set(dataset["prompt"])
        return real_batches(dataset, *args, **kwargs)
    monkeypatch.setattr(job, "evaluate", recording_evaluate)
    monkeypatch.setattr(job, "make_batches", recording_batches)
    for seed in (0, 1):
        job.run_job(job.JobConfig(model="tiny-llama", task="rotten_tomatoes", steps=1, max_train=16, eval_examples=8,
                                  calibration_batches=1, batch_size=2, max_length=32, progress=False, device="cpu",
                                  eval_before=False, seed=seed), log=lambda line: None)
    held_out = set(load_dataset("rotten_tomatoes")["validation"]["prompt"])       # what `rowsft eval` scores
    assert evaluated[0] == evaluated[1] == held_out
    assert not (trained[0] | trained[1]) & held_out
    assert trained[0] == trained[1]                      # the max_train subset too; the seed orders it
    with pytest.raises(SystemExit):
        main(["run", "--split-seed", "x"])
