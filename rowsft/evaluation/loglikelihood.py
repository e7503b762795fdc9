"""Summed log-likelihood of each verbalised choice given its prompt, for causal LMs.

Both paths cut a prompt alike for all choices of an example (its start goes first, so that the
longest choice fits ``max_length``; a choice that alone does not fit is cut at its end), and run
rows LEFT-padded with explicit position ids, so every context ends at the last position.

- :func:`cached_loglikelihoods` (``fast=True``, the default, for groups where
  :func:`prompt_sharing_pays`; other groups run packed): each prompt runs ONCE; its last
  logits score every choice's first token, and its key/value cache, gathered once per choice that
  has more tokens, scores the rest of each choice as a short continuation. BoolQ's one-token
  " no"/" yes" need no continuation at all. Examples are grouped so that one forward pass holds at
  most ``batch_size`` prompts and at most ``batch_size`` continuations (copies of a prompt's cache).
- :func:`packed_loglikelihoods` (``fast=False``, the reference): prompt + choice per sequence (one
  sequence scores all choices of an example when each is a single token), only the logits of the
  last ``max choice length + 1`` positions computed (``logits_to_keep``). Examples are grouped so
  that one pass holds at most ``batch_size`` sequences, counting each choice.

Both give ``[[loglik of each choice] for each example]``. Per token they agree to ~1e-6 in float32;
the cached path adds the token log-likelihoods in float64, the packed one in float32, so sums over
hundreds of tokens (|sum| ~ 1000) differ by up to ~1e-4, the float32 rounding of the packed sum.
"""
from __future__ import annotations

import inspect

import torch

from rowsft.data.batching import encode_causal, rows_at

_READ_AHEAD = 256  # rows read (and, on the fast path, length-sorted) at a time


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def example_groups(dataset, n, batch_size, tokenizer=None):
    """Lists of ``(index, row)`` of the first ``n`` rows whose work fits one forward pass (at least one row).

    Without ``tokenizer`` (the packed path) a row counts once per choice, in dataset order. With
    it (the cached path) a row counts once per choice of more than one token (at least once), and
    each block of :data:`_READ_AHEAD` rows is sorted by prompt length so that little is padded.
    """
    group, width = [], 0
    for start in range(0, n, _READ_AHEAD):
        indices = list(range(start, min(n, start + _READ_AHEAD)))
        block = list(zip(indices, rows_at(dataset, indices)))
        for _, row in block:
            k = len(row["choices"])
            if not 0 <= int(row["label"]) < k:
                raise ValueError(f"label {row['label']} is out of range for {k} choices in row {row!r:.200}")
        if tokenizer is not None:
            block.sort(key=lambda item: len(item[1]["prompt"]))
            tokens = tokenizer([c for _, row in block for c in row["choices"]], add_special_tokens=False)["input_ids"]
        k = 0
        for index, row in block:
            if tokenizer is None:
                cost = len(row["choices"])
            else:
                cost = max(1, sum(len(t) > 1 for t in tokens[k:k + len(row["choices"])]))
                k += len(row["choices"])
            if group and width + cost > batch_size:
                yield group
                group, width = [], 0
            group.append((index, row))
            width += cost
    if group:
        yield group


def encode_examples(tokenizer, rows, prefix, max_length) -> list[tuple[list[int], list[list[int]]]]:
    """Per row, ``(context, answers)``: prefix + the (start-cut) prompt, and each choice's ids, cut to fit."""
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    choice_ids = tokenizer([c for r in rows for c in r["choices"]], add_special_tokens=False)["input_ids"]
    examples, k = [], 0
    for row, prompt in zip(rows, prompts):
        answers = choice_ids[k:k + len(row["choices"])]
        k += len(row["choices"])
        if any(not a for a in answers):
            raise ValueError(f"an empty choice in row {row!r:.200}; every choice needs at least one token")
        _, n_context = encode_causal(prefix, prompt, [0] * max(len(a) for a in answers), max_length)
        if n_context == 0:
            raise ValueError(f"an empty prompt in row {row!r:.200}; a choice needs some context to be scored")
        context = list(prefix) + (prompt[len(prompt) - (n_context - len(prefix)):] if n_context > len(prefix) else [])
        examples.append((context, [a[:max_length - len(context)] for a in answers]))
    return examples


def choice_sequences(tokenizer, rows, prefix, max_length):
    """``[(example, input_ids, answers)]`` for the packed path: the sequences to run, the answers scored on each.

    A sequence is context + ``answers[0]``. When every choice of an example is a single token (BoolQ's
    " no"/" yes"), one sequence scores them all from the same next-token distribution; otherwise each
    choice gets its own sequence.
    """
    return packed_sequences(encode_examples(tokenizer, rows, prefix, max_length))


def packed_sequences(examples):
    """:func:`choice_sequences` from :func:`encode_examples`' ``(context, answers)``."""
    sequences = []
    for i, (context, answers) in enumerate(examples):
        groups = [answers] if max(len(a) for a in answers) == 1 else [[a] for a in answers]
        sequences.extend((i, context + scored[0], scored) for scored in groups)
    return sequences


def prompt_sharing_pays(examples, ratio: float = 1.5) -> bool:
    """Whether running each prompt once saves enough tokens to pay for a second (continuation) pass.

    True when no choice has more than one token (one pass, as packed), or when the packed sequences
    hold at least ``ratio`` times the tokens of prompts + choices (long prompts, short choices: BoolQ,
    SIQA); False for short prompts with long choices (PIQA), where the packed pass is quicker.
    """
    if all(len(a) == 1 for _, answers in examples for a in answers):
        return True
    packed = sum(len(ids) for _, ids, _ in packed_sequences(examples))
    shared = sum(len(context) + sum(len(a) for a in answers) for context, answers in examples)
    return packed >= ratio * shared


def _left_padded(sequences: list[list[int]], pad_id: int) -> dict:
    """``input_ids``/``attention_mask``/``position_ids``, each ``(N, T)``, padded on the left."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)                  # (N, T)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)                    # (N, T)
    for i, ids in enumerate(sequences):
        input_ids[i, width - len(ids):] = torch.as_tensor(ids)
        attention_mask[i, width - len(ids):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                               # (N, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}


def _forward(model, inputs: dict, keep: int, **extra):
    """The model's output on ``inputs`` (moved to its device), logits of the last ``keep`` positions at least."""
    device = model_device(model)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    try:
        return model(**inputs, logits_to_keep=keep, **extra)
    except TypeError:  # a model without logits_to_keep: compute all positions
        return model(**inputs, **extra)


def packed_loglikelihoods(model, sequences, pad_id) -> list[list[float]]:
    """Per example, the summed log-likelihood of each choice; one left-padded forward pass."""
    keep = max(len(answers[0]) for _, _, answers in sequences)
    logits = _forward(model, _left_padded([ids for _, ids, _ in sequences], pad_id), keep + 1).logits
    # position j of the window predicts the token at absolute position T - keep + j
    logp = torch.log_softmax(logits[:, -(keep + 1):-1].float(), dim=-1).cpu()                 # (N, keep, V)
    scores: dict[int, list[float]] = {}
    for i, (example, _, answers) in enumerate(sequences):
        for answer in answers:
            positions = torch.arange(keep - len(answer), keep)                                # (L,)
            value = logp[i, positions, torch.as_tensor(answer)].sum()
            scores.setdefault(example, []).append(float(value))
    return [scores[e] for e in sorted(scores)]


def _cache_keyword(model) -> str:
    """The forward argument taking a key/value cache: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The key/value cache of a model output (``cache`` or, before transformers 5.x, ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _gather_cache(cache, index: torch.Tensor):
    """The prompt cache with its batch rows picked (and repeated) by ``index``; the input is consumed."""
    if hasattr(cache, "batch_select_indices"):       # transformers Cache objects
        cache.batch_select_indices(index)
        return cache
    return tuple(tuple(t[index.to(t.device)] for t in layer) for layer in cache)   # legacy tuples


def cached_loglikelihoods(model, examples, pad_id) -> list[list[float]]:
    """Per example ``(context, answers)``, the summed log-likelihood of each answer; prompts run once."""
    tails = [(e, j, a) for e, (_, answers) in enumerate(examples) for j, a in enumerate(answers) if len(a) > 1]
    prompts = _left_padded([context for context, _ in examples], pad_id)
    out = _forward(model, prompts, 1, use_cache=bool(tails))              # no cache for one-token choices
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1).double().cpu()               # (E, V)
    scores = [[first[e, a[0]] for a in answers] for e, (_, answers) in enumerate(examples)]
    if tails:
        cache = _returned_cache(out)
        if cache is None:
            raise RuntimeError(f"{type(model).__name__} returned no key/value cache; evaluate it with fast=False")
        owners = torch.tensor([e for e, _, _ in tails])                                       # (C,)
        cache = _gather_cache(cache, owners.to(model_device(model)))
        width = max(len(a) - 1 for _, _, a in tails)
        input_ids = torch.full((len(tails), width), pad_id, dtype=torch.long)                 # (C, L)
        mask = torch.zeros((len(tails), width), dtype=torch.long)                             # (C, L), padded right
        for c, (_, _, a) in enumerate(tails):
            input_ids[c, :len(a) - 1] = torch.as_tensor(a[:-1])
            mask[c, :len(a) - 1] = 1
        lengths = torch.tensor([len(examples[e][0]) for e, _, _ in tails])                   # (C,)
        continuation = {"input_ids": input_ids,
                        "attention_mask": torch.cat([prompts["attention_mask"][owners], mask], dim=1),  # (C, T+L)
                        "position_ids": lengths[:, None] + torch.arange(width)[None, :]}       # (C, L)
        logits = _forward(model, continuation, width, **{_cache_keyword(model): cache}).logits[:, -width:]  # (C, L, V)
        logp = torch.log_softmax(logits.float(), dim=-1).double().cpu()                       # (C, L, V)
        for c, (e, j, a) in enumerate(tails):
            rest = logp[c, torch.arange(len(a) - 1), torch.as_tensor(a[1:])]                   # (len(a) - 1,)
            scores[e][j] = scores[e][j] + rest.sum()
    return [[float(s) for s in row] for row in scores]
