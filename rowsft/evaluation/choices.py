"""Accuracy of a model on a task split: choice log-likelihoods for causal LMs, argmax for classifiers.

Beside the accuracy, ``choice_loss`` is the mean cross-entropy of the right answer over the choices
(``-log softmax(choice scores)[label]``; the logits for a classifier): a held-out measure that moves
continuously where accuracy moves in steps of ``1/n`` and saturates at a majority-class answer.

Causal LMs score every choice of an example by the sum of its token log-likelihoods given the
prompt, and predict the best one (lm-evaluation-harness' ``acc``). All choices of several examples
run in one forward pass; rows are padded on the LEFT with explicit position ids, so every answer
ends at the last position and only the logits of the last ``max answer length + 1`` positions are
computed (``logits_to_keep``) instead of ``(batch, seq, vocab)``. All choices of an example see the
same (start-truncated) prompt. Sequence classifiers predict the argmax of their logits.
"""
from __future__ import annotations

from typing import Mapping

import torch

from rowsft.data.batching import Batches, column_names, encode_causal, ensure_pad_token, rows_at, special_tokens


def is_sequence_classifier(model) -> bool:
    """True for ``*ForSequenceClassification`` models (also inside a PEFT wrapper)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return any("SequenceClassification" in type(m).__name__ for m in (model, inner))


def evaluate(model, tokenizer, dataset, batch_size: int = 8, max_length: int = 256, max_examples: int | None = None,
             progress: bool = True) -> dict:
    """``{"accuracy": float, "choice_loss": float, "n": int}`` of ``model`` on one split (the first ``max_examples`` rows).

    ``dataset``: a ``datasets.Dataset`` or list of dicts with ``prompt``/``choices``/``label`` (causal
    LMs) or ``text``/``label`` (classifiers; see :mod:`rowsft.data.batching`). ``batch_size``: sequences
    per forward pass (a causal LM example counts once per choice; its choices are never split).
    Runs under ``torch.no_grad()`` in eval mode and restores the model's training mode afterwards.
    """
    if isinstance(dataset, Mapping):
        raise TypeError("evaluate() takes one split, e.g. data['validation'], not the whole DatasetDict")
    n = len(dataset) if max_examples is None else min(len(dataset), int(max_examples))
    if n == 0:
        raise ValueError("nothing to evaluate: the dataset is empty (or max_examples is 0)")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    ensure_pad_token(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if is_sequence_classifier(model):
                correct, loss = _classifier_correct(model, tokenizer, dataset, n, batch_size, max_length, progress)
            else:
                correct, loss = _causal_correct(model, tokenizer, dataset, n, batch_size, max_length, progress)
    finally:
        model.train(was_training)
    return {"accuracy": correct / n, "choice_loss": loss / n, "n": n}


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _progress(total: int, enabled: bool, what: str):
    from tqdm import tqdm  # plain tqdm: the core never pulls in ipywidgets
    return tqdm(total=total, disable=not enabled, desc=what, unit="ex", leave=False)


def _classifier_correct(model, tokenizer, dataset, n, batch_size, max_length, progress) -> tuple[int, float]:
    """Right answers and the summed cross-entropy of the labels over the first ``n`` rows."""
    rows = rows_at(dataset, list(range(n)))
    collate = Batches(rows, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=False,
                      kind="classification").collate
    device, correct, loss = _device(model), 0, 0.0
    with _progress(n, progress, "evaluate") as bar:
        for start in range(0, n, batch_size):
            batch = collate(rows[start:start + batch_size])
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits   # (B, num_labels)
            logits = logits.float().cpu()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            bar.update(len(batch["labels"]))
    return correct, loss


def _causal_correct(model, tokenizer, dataset, n, batch_size, max_length, progress) -> tuple[int, float]:
    """Right answers and the summed ``-log softmax(choice scores)[label]`` over the first ``n`` rows."""
    missing = {"prompt", "choices", "label"} - column_names(dataset)
    if missing:
        raise ValueError(f"a causal LM is evaluated on prompt/choices/label rows; the dataset lacks {sorted(missing)}")
    prefix, _ = special_tokens(tokenizer)
    correct, loss = 0, 0.0
    with _progress(n, progress, "evaluate") as bar:
        for group in _example_groups(dataset, n, batch_size):
            sequences = _choice_sequences(tokenizer, group, prefix, max_length)
            scores = _choice_loglikelihoods(model, sequences, tokenizer.pad_token_id)
            for i, row in enumerate(group):
                row_scores = torch.tensor(scores[i], dtype=torch.float64)                  # (num_choices,)
                correct += int(int(row_scores.argmax()) == int(row["label"]))
                loss -= float(torch.log_softmax(row_scores, dim=0)[int(row["label"])])
            bar.update(len(group))
    return correct, loss


def _example_groups(dataset, n, batch_size):
    """Consecutive rows whose choices together fit ``batch_size`` sequences (at least one row)."""
    group, width = [], 0
    for start in range(0, n, 256):
        for row in rows_at(dataset, list(range(start, min(n, start + 256)))):
            k = len(row["choices"])
            if not 0 <= int(row["label"]) < k:
                raise ValueError(f"label {row['label']} is out of range for {k} choices in row {row!r:.200}")
            if group and width + k > batch_size:
                yield group
                group, width = [], 0
            group.append(row)
            width += k
    if group:
        yield group


def _choice_sequences(tokenizer, rows, prefix, max_length):
    """``[(example, input_ids, answers)]``: the sequences to run and the answers scored on each.

    A sequence is context + ``answers[0]``. When every choice of an example is a single token (BoolQ's
    " no"/" yes"), one sequence scores them all from the same next-token distribution; otherwise each
    choice gets its own sequence. The prompt is cut alike for all choices of an example.
    """
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    choice_ids = tokenizer([c for r in rows for c in r["choices"]], add_special_tokens=False)["input_ids"]
    sequences, k = [], 0
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        answers = choice_ids[k:k + len(row["choices"])]
        k += len(row["choices"])
        if any(not a for a in answers):
            raise ValueError(f"an empty choice in row {row!r:.200}; every choice needs at least one token")
        longest = max(len(a) for a in answers)
        _, n_context = encode_causal(prefix, prompt, [0] * longest, max_length)
        if n_context == 0:
            raise ValueError(f"an empty prompt in row {row!r:.200}; a choice needs some context to be scored")
        context = prompt[len(prompt) - (n_context - len(prefix)):] if n_context > len(prefix) else []
        groups = [answers] if longest == 1 else [[a] for a in answers]
        for scored in groups:
            ids, _ = encode_causal(prefix, context, scored[0], max_length)
            truncated = len(ids) - len(prefix) - len(context)
            sequences.append((i, ids, [a[:truncated] for a in scored]))
    return sequences


def _choice_loglikelihoods(model, sequences, pad_id) -> list[list[float]]:
    """Per example, the summed log-likelihood of each choice; one left-padded forward pass."""
    width = max(len(ids) for _, ids, _ in sequences)
    keep = max(len(answers[0]) for _, _, answers in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)                  # (N, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)                    # (N, T)
    for i, (_, ids, _) in enumerate(sequences):
        input_ids[i, width - len(ids):] = torch.as_tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                               # (N, T)
    device = _device(model)
    inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
              "position_ids": position_ids.to(device)}
    try:
        logits = model(**inputs, logits_to_keep=keep + 1).logits                              # (N, keep+1, V)
    except TypeError:  # a model without logits_to_keep: compute all positions
        logits = model(**inputs).logits                                                       # (N, T, V)
    # position j of the window predicts the token at absolute position T - keep + j
    logp = torch.log_softmax(logits[:, -(keep + 1):-1].float(), dim=-1).cpu()                 # (N, keep, V)
    scores: dict[int, list[float]] = {}
    for i, (example, _, answers) in enumerate(sequences):
        for answer in answers:
            positions = torch.arange(keep - len(answer), keep)                                # (L,)
            value = logp[i, positions, torch.as_tensor(answer)].sum()
            scores.setdefault(example, []).append(float(value))
    return [scores[e] for e in sorted(scores)]
