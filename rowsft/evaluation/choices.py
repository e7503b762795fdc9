"""Accuracy of a model on a task split: choice log-likelihoods for causal LMs, argmax for classifiers.

Beside the accuracy, ``choice_loss`` is the mean cross-entropy of the right answer over the choices
(``-log softmax(choice scores)[label]``; the logits for a classifier): a held-out measure that moves
continuously where accuracy moves in steps of ``1/n`` and saturates at a majority-class answer.

Causal LMs score every choice of an example by the sum of its token log-likelihoods given the
prompt, and predict the best one (lm-evaluation-harness' ``acc``); ``acc_norm`` divides each sum
by the length of the choice's text in UTF-8 bytes first (the harness' length normalisation). How
the log-likelihoods are computed (each prompt once, choices as cached continuations; or the packed
reference) is in :mod:`rowsft.evaluation.loglikelihood`. Sequence classifiers predict the argmax of
their logits.

Error bars: ``interval`` (Wilson 95 %), ``majority`` (always answering the most frequent label of
the evaluated questions) and ``per_question`` for paired comparisons of two models on the same
questions (:mod:`rowsft.evaluation.stats`).
"""
from __future__ import annotations

from typing import Mapping

import torch
from tqdm import tqdm  # plain tqdm: the core never pulls in ipywidgets

from rowsft.checks import check_count
from rowsft.data.batching import Batches, column_names, ensure_pad_token, rows_at, special_tokens
from rowsft.evaluation.loglikelihood import (
    cached_loglikelihoods,
    encode_examples,
    example_groups,
    model_device,
    packed_loglikelihoods,
    packed_sequences,
    prompt_sharing_pays,
)
from rowsft.evaluation.stats import majority_baseline, wilson_interval


def is_sequence_classifier(model) -> bool:
    """True for ``*ForSequenceClassification`` models (also inside a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any("SequenceClassification" in type(m).__name__ for m in (model, inner))


def evaluate(model, tokenizer, dataset, batch_size: int = 8, max_length: int = 256, max_examples: int | None = None,
             progress: bool = True, fast: bool = True) -> dict:
    """Accuracy and friends of ``model`` on one split (the first ``max_examples`` rows).

    Returns ``{"accuracy", "choice_loss", "n", "interval", "acc_norm", "majority", "per_question"}``
    (see :func:`summarize`).

    ``dataset``: a ``datasets.Dataset`` or list of dicts with ``prompt``/``choices``/``label`` (causal
    LMs) or ``text``/``label`` (classifiers; see :mod:`rowsft.data.batching`). ``batch_size``: sequences
    per forward pass; a causal LM example's choices are never split. ``fast`` (causal LMs only): run
    each prompt once and its choices as cached continuations (a pass holds ``batch_size`` prompts and
    ``batch_size`` continuations); ``fast=False``: the packed reference, an example counting once per
    choice (:mod:`rowsft.evaluation.loglikelihood`). Both give the same log-likelihoods.
    Runs under ``torch.no_grad()`` in eval mode and restores the model's training mode afterwards.
    """
    if isinstance(dataset, Mapping):
        raise TypeError("evaluate() takes one split, e.g. data['validation'], not the whole DatasetDict")
    check_count("batch_size", batch_size, 1)
    check_count("max_length", max_length, 1)
    if max_examples is not None:
        check_count("max_examples", max_examples, 1, "(or None for all)")
    n = len(dataset) if max_examples is None else min(len(dataset), int(max_examples))
    if n == 0:
        raise ValueError("nothing to evaluate: the dataset is empty")
    ensure_pad_token(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if is_sequence_classifier(model):
                questions = _classifier_questions(model, tokenizer, dataset, n, batch_size, max_length, progress)
            else:
                questions = _causal_questions(model, tokenizer, dataset, n, batch_size, max_length, progress, fast)
    finally:
        model.train(was_training)
    return summarize(questions)


def summarize(questions: list[dict]) -> dict:
    """The result of :func:`evaluate` from its per-question records (in question order).

    - ``accuracy``, ``n``: right answers / questions; ``interval``: its Wilson 95 % ``(low, high)``;
    - ``choice_loss``: mean ``-log softmax(scores)[label]``;
    - ``acc_norm``: accuracy of the argmax of log-likelihood / choice length in bytes (causal LMs;
      ``None`` for classifiers, whose classes have no text);
    - ``majority``: ``{"label", "accuracy", "interval"}`` of always answering the most frequent
      label of these questions (:func:`rowsft.evaluation.stats.majority_baseline`);
    - ``per_question``: one dict per question, ``{"index", "label", "predicted", "correct", "scores"}``
      (``scores``: each choice's summed log-likelihood, or the classifier's logits), plus
      ``"predicted_norm"`` for causal LMs.
    """
    n = len(questions)
    correct = sum(q["correct"] for q in questions)
    loss = sum(choice_loss(q["scores"], q["label"]) for q in questions)
    normed = [q["predicted_norm"] == q["label"] for q in questions if "predicted_norm" in q]
    return {"accuracy": correct / n, "choice_loss": loss / n, "n": n,
            "interval": wilson_interval(correct, n),
            "acc_norm": sum(normed) / n if len(normed) == n else None,
            "majority": majority_baseline([q["label"] for q in questions]),
            "per_question": questions}


def choice_loss(scores: list[float], label: int) -> float:
    """One question's loss over its choices: ``−log softmax(scores)[label]`` (``evaluate``'s ``choice_loss`` is the
    mean over the questions)."""
    return -float(torch.log_softmax(torch.tensor(scores, dtype=torch.float64), dim=0)[label])


def _argmax(values: list[float]) -> int:
    return int(torch.tensor(values, dtype=torch.float64).argmax())


def _question(index: int, label: int, scores: list[float], choices: list[str] | None = None) -> dict:
    """One per-question record; with ``choices``, also the byte-length normalised prediction."""
    predicted = _argmax(scores)
    record = {"index": index, "label": label, "predicted": predicted, "correct": predicted == label,
              "scores": scores}
    if choices is not None:
        record["predicted_norm"] = _argmax([s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, choices)])
    return record


def _progress(total: int, enabled: bool, what: str):
    return tqdm(total=total, disable=not enabled, desc=what, unit="ex", leave=False)


def _classifier_questions(model, tokenizer, dataset, n, batch_size, max_length, progress) -> list[dict]:
    """Per-question records (``scores``: the logits) over the first ``n`` rows."""
    rows = rows_at(dataset, list(range(n)))
    collate = Batches(rows, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=False,
                      kind="classification").collate
    device, questions = model_device(model), []
    with _progress(n, progress, "evaluate") as bar:
        for start in range(0, n, batch_size):
            batch = collate(rows[start:start + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits   # (B, num_labels)
            for i, (row_logits, label) in enumerate(zip(logits.double().cpu().tolist(), batch["labels"].tolist())):
                questions.append(_question(start + i, int(label), row_logits))
            bar.update(len(batch["labels"]))
    return questions


def _causal_questions(model, tokenizer, dataset, n, batch_size, max_length, progress, fast) -> list[dict]:
    """Per-question records (``scores``: summed choice log-likelihoods) over the first ``n`` rows."""
    missing = {"prompt", "choices", "label"} - column_names(dataset)
    if missing:
        raise ValueError(f"a causal LM is evaluated on prompt/choices/label rows; the dataset lacks {sorted(missing)}")
    prefix, _ = special_tokens(tokenizer)
    questions = []
    with _progress(n, progress, "evaluate") as bar:
        for group in example_groups(dataset, n, batch_size, tokenizer if fast else None):
            rows = [row for _, row in group]
            examples = encode_examples(tokenizer, rows, prefix, max_length)
            if fast and prompt_sharing_pays(examples):
                scores = cached_loglikelihoods(model, examples, tokenizer.pad_token_id)
            else:
                scores = packed_loglikelihoods(model, packed_sequences(examples), tokenizer.pad_token_id)
            for (index, row), row_scores in zip(group, scores):
                questions.append(_question(index, int(row["label"]), row_scores, list(row["choices"])))
            bar.update(len(group))
    return sorted(questions, key=lambda q: q["index"])
