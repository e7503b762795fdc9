"""The ``rowsft`` command.

``rowsft`` alone runs the main job on the bundled defaults (SmolLM2-135M-Instruct, BoolQ): score
rows, select, fine-tune briefly, evaluate before and after, print trainable parameters and a
memory breakdown. Sub-commands serve scripted use::

    rowsft run   [--config job.yaml] [--steps 60 --budget lora:8 ...]   # the main job, any settings
    rowsft score --model smollm2-135m --task boolq --metric taylor --out scores.safetensors
    rowsft train --config job.yaml --out runs/boolq                   # score, select, train, save adapter
    rowsft eval  --model smollm2-135m --task boolq [--adapter runs/boolq]
    rowsft merge --model smollm2-135m --adapter runs/boolq --out merged/
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


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with JobConfig fields; flags override it")
    for f in fields(JobConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_text} (default {default})")
        else:
            caster = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, type=caster, default=None, help=f"{help_text} (default {default})")


def _job_config(args: argparse.Namespace) -> JobConfig:
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.exists():
            raise SystemExit(f"rowsft: config file {path} does not exist")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml
            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise SystemExit(f"rowsft: {path} must hold a mapping of JobConfig fields")
    for f in fields(JobConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return config_from_mapping(values)


def _print_result(result) -> None:
    print("\n== rowsft result")
    total = max(1, result.total_parameters)
    print(f"trainable params: {result.trainable_parameters:,} || all params: {result.total_parameters:,} || "
          f"trainable%: {100 * result.trainable_parameters / total:.4f}")
    if result.accuracy_before is not None:
        print(f"accuracy before: {result.accuracy_before:.4f}")
    print(f"accuracy after:  {result.accuracy_after:.4f}")
    print(f"train time: {result.train_seconds:.1f} s, median step {result.median_step_seconds or float('nan'):.3f} s, "
          f"final loss {result.final_loss if result.final_loss is not None else float('nan'):.4f}")


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
    if scoring.ALIASES.get(args.metric, (args.metric,))[0] not in scoring.allowed_metrics(args.unit):
        raise ValueError(f"metric {args.metric!r} is unknown for unit {args.unit!r}; choose one of "
                         f"{scoring.allowed_metrics(args.unit)}")
    model, tokenizer = load_model(args.model)
    data = load_dataset(args.task)
    batches = make_batches(data["train"], tokenizer, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
    scores = scoring.score(model, batches, metric=args.metric, unit=args.unit, targets=args.targets,
                           num_batches=args.num_batches)
    print(scores.summary().to_string(index=False))
    if args.out:
        scores.save(args.out)
        print(f"scores saved to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from rowsft.data import load_dataset, load_model
    from rowsft.evaluation.choices import evaluate
    from rowsft.layers import adapters
    model, tokenizer = load_model(args.model)
    if args.adapter:
        adapters.load_adapter(model, args.adapter)
    data = load_dataset(args.task)
    res = evaluate(model, tokenizer, data["validation"], batch_size=args.batch_size, max_length=args.max_length,
                   max_examples=args.max_examples)
    summary = {k: v for k, v in res.items() if k != "per_question"}      # per-question results: evaluate() in Python
    print(json.dumps(summary, default=str))
    return 0


def cmd_merge(args) -> int:
    from rowsft.data import load_model
    from rowsft.layers import adapters, tuner
    model, tokenizer = load_model(args.model)
    adapters.load_adapter(model, args.adapter)
    model = tuner.merge_and_unload(model)
    _save_model_folder(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"merged model saved to {args.out}")
    return 0


# weight files of a transformers model folder: a new save replaces them as a whole (no stale shard is kept)
_WEIGHTS_FILE = r"(?:model|pytorch_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)|(?:model\.safetensors|pytorch_model\.bin)\.index\.json"


def _check_model_folder(out, overwrite: bool) -> bool:
    """Refuse a file, and without ``overwrite`` a non-empty folder that is no model folder (no
    config.json); returns whether ``out`` already is a model folder."""
    from rowsft.io_utils import refuse_file
    target = refuse_file(out, "model folder")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if (target / "config.json").is_file() or not entries:
        return bool(entries)
    if overwrite:
        return False
    raise ValueError(f"{str(target)!r} is not empty ({entries[:3]}{' ...' if len(entries) > 3 else ''}) and holds "
                     f"no model (config.json); give a new or empty folder, or pass --overwrite to write the model "
                     f"files beside those (nothing else there is deleted)")


def _save_model_folder(model, tokenizer, out, overwrite: bool = False) -> None:
    """Write the model (and tokenizer) into ``out``, replacing only a model folder's own files, config.json
    last; old weight shards a previous model save left there (and this one did not write) are removed."""
    import re

    from rowsft.io_utils import atomic_files_into
    was_model = _check_model_folder(out, overwrite)
    weights = re.compile(_WEIGHTS_FILE)
    stale = (lambda name: weights.fullmatch(name) is not None) if was_model else None
    with atomic_files_into(out, last=["config.json"], stale=stale) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rowsft", description="Row-based sparse fine-tuning of transformers. "
                                     "With no sub-command: the main job on the bundled SmolLM2-135M and BoolQ.")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("run", help="score → select → train → evaluate before/after (the main job)")
    _add_job_flags(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("train", help="like run, and saves the adapter to --out; no evaluation before")
    _add_job_flags(p)
    p.set_defaults(func=cmd_train)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="smollm2-135m")
    common.add_argument("--task", default="boolq")
    common.add_argument("--batch-size", type=positive_int, default=8)
    common.add_argument("--max-length", type=positive_int, default=256)
    p = sub.add_parser("score", parents=[common], help="neuron importance scores, printed per layer and saved")
    p.add_argument("--metric", default="taylor")
    p.add_argument("--unit", default="row", choices=["row", "column", "group", "element"])
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--num-batches", type=positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="save the scores (safetensors)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a small shared machine spinning made steps
    # several times slower. Must be set before torch loads; a user's own setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["run", *(argv or [])])
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
