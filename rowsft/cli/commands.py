"""The ``rowsft`` command.

``rowsft`` alone runs the main job on the bundled defaults (SmolLM2-135M-Instruct, Rotten Tomatoes
as an LM task): score rows, select 2 per layer by Taylor importance, fine-tune 80 steps, evaluate
400 held-out reviews before and after, and print accuracy with 95% intervals, the majority class,
the paired change with its exact McNemar p-value, trainable parameters, memory and wall time. Sub-commands serve scripted use::

    rowsft run   [--config job.yaml] [--task boolq --budget lora:8 ...]  # the main job, any settings
    rowsft score --model smollm2-135m --task rotten_tomatoes --metric taylor --out scores/
    rowsft train --config job.yaml --out runs/rt                      # score, select, train, save adapter
    rowsft eval  --model smollm2-135m --task rotten_tomatoes [--adapter runs/rt]
    rowsft merge --model smollm2-135m --adapter runs/rt --out merged/
    rowsft explore --budgets 1 2 4 lora:8 --metrics taylor random --seeds 0 1 2 --cache explore.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from rowsft.cli.job import JobConfig, config_from_mapping


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse then names the flag in its one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number (1 or more), got {value}")
    return value


def _add_config_flags(p: argparse.ArgumentParser, config_class, whole=int) -> None:
    """One flag per field of the dataclass ``config_class`` (``--max-train`` for ``max_train``), its help
    and default from the field; booleans as ``--x/--no-x``, lists as several values, whole numbers read
    with ``whole``. Every flag defaults to None: only the flags given override the config."""
    for f in fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{f.metadata.get('help', '')} (default {shown})"
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            kind = int if f.name in ("seeds", "lora_ranks") else str
            p.add_argument(flag, dest=f.name, nargs="*" if f.name == "lora_ranks" else "+", type=kind, default=None,
                           help=help_text)
        else:
            caster = {"int": whole, "int | None": whole, "float": float, "float | None": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=caster, default=None, help=help_text)


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with JobConfig fields; flags override it")
    _add_config_flags(p, JobConfig)


def _job_config(args: argparse.Namespace) -> JobConfig:
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise SystemExit(f"rowsft: config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml
                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as e:  # noqa: BLE001 - yaml's and json's parse errors, shown with the file named
            raise SystemExit(f"rowsft: {path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: "
                             f"{str(e).splitlines()[0]}; fix the file (one 'field: value' per line)") from None
        if not isinstance(values, dict):
            raise SystemExit(f"rowsft: {path} must hold a mapping of JobConfig fields")
    for f in fields(JobConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return config_from_mapping(values)


def _print_result(result) -> None:
    from rowsft.cli.job import describe_accuracy
    print("\n== rowsft result")
    total = max(1, result.total_parameters)
    print(f"trainable params: {result.trainable_parameters:,} || all params: {result.total_parameters:,} || "
          f"trainable%: {100 * result.trainable_parameters / total:.4f}")
    if result.eval_before is not None:
        print(f"accuracy before: {describe_accuracy(result.eval_before)}")
    print(f"accuracy after:  {describe_accuracy(result.eval_after)}")
    majority = result.eval_after["majority"]
    print(f"majority class:  {majority['accuracy']:.4f} (always answering choice {majority['label']} on these questions)")
    if result.paired is not None:
        fixed, broken, p = result.paired["b_only"], result.paired["a_only"], result.paired["p_value"]
        gain = result.accuracy_after - result.accuracy_before
        verdict = "a real change at the 5% level" if p < 0.05 else "not shown to differ from before (p >= 0.05)"
        print(f"paired change:   {100 * gain:+.1f} points ({fixed} questions fixed, {broken} broken; exact McNemar "
              f"p = {p:.2g}): {verdict}")
    print(f"train time: {result.train_seconds:.1f} s, median step {result.median_step_seconds or float('nan'):.3f} s, "
          f"final loss {result.final_loss if result.final_loss is not None else float('nan'):.4f}")
    print(f"wall time:  {result.wall_seconds:.1f} s (loading, scoring, evaluations and training)")


def cmd_run(args) -> int:
    from rowsft.cli.job import run_job
    cfg = _job_config(args)
    _print_result(run_job(cfg))
    return 0


def cmd_train(args) -> int:
    from rowsft.cli.job import run_job
    cfg = _job_config(args)
    if not cfg.out:
        raise SystemExit("rowsft train: give --out FOLDER to save the adapter into (or use `rowsft run`)")
    cfg.eval_before = bool(args.eval_before) if args.eval_before is not None else False
    _print_result(run_job(cfg))
    return 0


def cmd_score(args) -> int:
    from rowsft.data import batches as make_batches
    from rowsft.data import load_dataset, load_model
    from rowsft.scoring import scorer as scoring
    from rowsft.scoring.scores import check_scores_target
    if scoring.ALIASES.get(args.metric, (args.metric,))[0] not in scoring.allowed_metrics(args.unit):
        raise ValueError(f"metric {args.metric!r} is unknown for unit {args.unit!r}; choose one of "
                         f"{scoring.allowed_metrics(args.unit)}")
    if args.out:
        check_scores_target(args.out, args.overwrite)           # refused before the model is loaded
    model, tokenizer = load_model(args.model)
    data = load_dataset(args.task, seed=args.split_seed)
    batches = make_batches(data["train"], tokenizer, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    scores = scoring.score(model, batches, metric=args.metric, unit=args.unit, targets=args.targets,
                           num_batches=args.num_batches)
    print(scores.summary().to_string(index=False))
    if args.out:
        scores.save(args.out, overwrite=args.overwrite)
        print(f"scores saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from rowsft.data import load_dataset, load_model
    from rowsft.evaluation.choices import evaluate
    from rowsft.layers import adapters
    model, tokenizer = load_model(args.model)
    if args.adapter:
        adapters.load_adapter(model, args.adapter)
    data = load_dataset(args.task, seed=args.split_seed)
    res = evaluate(model, tokenizer, data["validation"], batch_size=args.batch_size, max_length=args.max_length,
                   max_examples=args.max_examples)
    summary = {k: v for k, v in res.items() if k != "per_question"}      # per-question results: evaluate() in Python
    print(json.dumps(summary, default=str))
    return 0


def cmd_merge(args) -> int:
    from rowsft.cli.outputs import check_model_folder, save_model_folder
    from rowsft.data import load_model
    from rowsft.layers import adapters, tuner
    check_model_folder(args.out, args.overwrite)
    model, tokenizer = load_model(args.model)
    adapters.load_adapter(model, args.adapter)
    model = tuner.merge_and_unload(model)
    save_model_folder(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"merged model saved to {args.out}")
    return 0


def _add_explore_flags(p: argparse.ArgumentParser) -> None:
    from rowsft.explore.budgets import ExploreConfig
    _add_config_flags(p, ExploreConfig, whole=positive_int)
    p.add_argument("--figure", help="also write the figure: .html, or .png/.svg/.pdf (static, through kaleido)")


def cmd_explore(args) -> int:
    from rowsft.explore.budgets import ExploreConfig, explore_budgets
    from rowsft.explore.summary import summary_text
    values = {f.name: getattr(args, f.name) for f in fields(ExploreConfig) if getattr(args, f.name, None) is not None}
    cfg = ExploreConfig(**values)
    if args.figure:
        from rowsft.viz.export import check_figure_path
        check_figure_path(args.figure)                 # refused before any fine-tune runs
    records = explore_budgets(cfg)
    print(summary_text(records))
    if args.figure:
        from rowsft.viz import budget_explorer, save_figure
        save_figure(budget_explorer(records), args.figure)
        print(f"figure saved to {args.figure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rowsft", description="Row-based sparse fine-tuning of transformers. "
                                     "With no sub-command: the main job on the bundled SmolLM2-135M and Rotten Tomatoes.")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="score → select → train → evaluate before/after (the main job)")
    _add_job_flags(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("train", help="like run, and saves the adapter to --out; no evaluation before")
    _add_job_flags(p)
    p.set_defaults(func=cmd_train)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2-135m")
    common.add_argument("--task", default="rotten_tomatoes")
    common.add_argument("--batch-size", type=positive_int, default=8)
    common.add_argument("--max-length", type=positive_int, default=96)
    common.add_argument("--split-seed", type=int, default=JobConfig.split_seed, help="seed of the train/validation "
                        "split of single-file tasks, as the job's --split-seed (the job's default by default): the same "
                        "held-out questions")
    p = sub.add_parser("score", parents=[common], help="neuron importance scores, printed per layer and saved")
    p.add_argument("--metric", default="taylor")
    p.add_argument("--unit", default="row", choices=["row", "column", "group", "element"])
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--num-batches", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder to save the scores into (scores.safetensors + scores.json; other files kept)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that holds no scores")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("eval", parents=[common], help="accuracy on the task's validation split")
    p.add_argument("--adapter", help="adapter folder to load first")
    p.add_argument("--max-examples", type=positive_int, default=None, help="validation examples (default: all)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("merge", parents=[common], help="fold an adapter into the weights and save a plain model")
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True, help="folder for the merged model; other files in it are kept")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty folder that holds no model (its other files are kept)")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("explore", help="short fine-tunes over budgets and metrics: accuracy with intervals, memory, "
                                       "paired tests (taylor vs random, LoRA at parity)")
    _add_explore_flags(p)
    p.set_defaults(func=cmd_explore)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a small shared machine spinning made steps
    # several times slower. Must be set before torch loads; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]                      # `rowsft --steps 20` is the main job with one setting changed
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"rowsft {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rowsft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
