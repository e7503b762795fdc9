"""benchmarks/study.py bookkeeping: resumable rows, merged saves from several processes, settings fingerprints."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module                      # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_saves_from_two_processes_merge_and_runs_done_are_not_planned_again(tmp_path):
    study = load_study()
    mode = study.MODES["reduced"]
    plan = study.plan(mode, ["boolq", "piqa"])
    assert len(plan) == 2 * (1 + 7 + 3 * 3)            # zero-shot, 7 single-seed methods, 3 methods × 3 seeds
    out = tmp_path / "study.jsonl"
    first, second = dict(plan[0], accuracy=0.5), dict(plan[-1], accuracy=0.6)
    study.save_rows(out, [first])                       # process A
    merged = study.save_rows(out, [second])             # process B, which never saw A's row
    assert [r["accuracy"] for r in merged] == [0.5, 0.6]
    assert study.save_rows(out, [first]) == merged      # saving a row twice keeps one
    done = {study.key(r) for r in study.load_rows(out)}
    assert len([r for r in plan if study.key(r) not in done]) == len(plan) - 2
    assert all(json.loads(line) for line in out.read_text().splitlines())


def test_rows_from_other_settings_are_kept_but_not_matched():
    study = load_study()
    reduced = study.MODES["reduced"]
    other = study.Mode(**{**reduced.__dict__, "steps": reduced.steps + 1})
    assert reduced.fingerprint() != other.fingerprint()
    assert study.Mode(**{**reduced.__dict__, "seeds": 5}).fingerprint() == reduced.fingerprint()   # seeds add rows
    a, b = study.plan(reduced, ["boolq"])[1], study.plan(other, ["boolq"])[1]
    assert study.key(a) != study.key(b)
