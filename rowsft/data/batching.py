"""Turning task rows into training batches: tokenisation, truncation, padding, epochs.

``batches(dataset, tokenizer, ...)`` returns a :class:`Batches`: re-iterable, ``len()`` = batches
per epoch, each ``iter()`` = one more epoch, shuffled by ``seed + epoch``. Rows are tokenised
lazily, one batch at a time, so building it is instant even for large datasets. Each batch is a
dict of CPU tensors for ``model(**batch)``:

- ``causal-lm``: ``input_ids`` = prompt + correct choice, ``labels`` = ``input_ids`` with -100 on
  prompt and padding (loss on the answer only); when too long, the START of the prompt is cut so
  the end of the question and the whole answer always fit ``max_length``.
- ``classification``: ``input_ids`` = the ``text`` column (or, if there is none, the ``prompt`` of a
  task whose choices are the same in every row, cut from the start), ``labels`` of shape ``(B,)``.

Padding is on the right, to the longest row of the batch.
"""
from __future__ import annotations

import math
import random
from typing import Any, Iterator, Mapping, Sequence

import torch

from rowsft.checks import check_count

KINDS = ("auto", "causal-lm", "classification")
IGNORE_INDEX = -100


def ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token its eos token as pad token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token first")
        tokenizer.pad_token = tokenizer.eos_token


def resolve_kind(tokenizer, kind: str = "auto") -> str:
    """``auto`` → ``classification`` for tokenizers with a CLS token (BERT-like), else ``causal-lm``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        return "classification" if getattr(tokenizer, "cls_token", None) is not None else "causal-lm"
    return kind


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (``[CLS]``/``[SEP]``, a BOS, or nothing)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


def encode_causal(prefix: Sequence[int], prompt: Sequence[int], answer: Sequence[int], max_length: int):
    """``(input_ids, n_context)``: prefix + prompt + answer in at most ``max_length`` tokens.

    The start of the prompt is cut first (the prefix, e.g. BOS, stays); an answer that alone does not
    fit is cut at its end, keeping one prompt token. ``n_context`` = tokens before the answer.
    """
    prefix, prompt, answer = list(prefix), list(prompt), list(answer)
    room = max_length - len(prefix)
    if room < 2:
        raise ValueError(f"max_length={max_length} leaves no room for a prompt and an answer")
    answer = answer[:room - 1]
    keep = room - len(answer)
    prompt = prompt[len(prompt) - keep:] if len(prompt) > keep else prompt
    context = prefix + prompt
    return context + answer, len(context)


def pad_right(sequences: list[list[int]], pad_id: int, value_for_pad: int | None = None) -> torch.Tensor:
    """``(B, T)`` long tensor, right-padded with ``pad_id`` to the longest sequence."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id if value_for_pad is None else value_for_pad, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


class Batches:
    """Re-iterable batches over a dataset; each ``iter()`` is one epoch (shuffled by ``seed + epoch``).

    ``len(batches)`` = batches per epoch. ``batches.epoch`` = the next epoch's number;
    ``batches.iter_epoch(e)`` gives epoch ``e`` without moving the counter; ``batches.first()`` is
    the first batch of epoch 0 (handy for memory estimates and shape checks).
    """

    def __init__(self, dataset, tokenizer, batch_size: int = 8, max_length: int = 256, shuffle: bool = True,
                 seed: int = 0, kind: str = "auto", drop_last: bool = False):
        if isinstance(dataset, Mapping):
            raise TypeError("batches() takes one split, e.g. data['train'], not the whole DatasetDict")
        check_count("batch_size", batch_size, 1, "(rows per batch)")
        check_count("max_length", max_length, 2, "(tokens per row: room for a prompt and an answer)")
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.kind = resolve_kind(tokenizer, kind)
        self.num_examples = len(dataset)
        if self.num_examples == 0:
            raise ValueError("the dataset is empty; load more rows (e.g. a larger max_train)")
        if drop_last and self.num_examples < self.batch_size:
            raise ValueError(f"drop_last=True with {self.num_examples} rows and batch_size={self.batch_size} "
                             "gives no batch; lower batch_size or set drop_last=False")
        ensure_pad_token(tokenizer)
        self.prefix, self.suffix = special_tokens(tokenizer)
        self.text_column = self._text_column() if self.kind == "classification" else None
        missing = {"prompt", "choices", "label"} - column_names(dataset) if self.kind == "causal-lm" else set()
        if missing:
            raise ValueError(f"causal-lm batches need the columns prompt, choices, label; missing {sorted(missing)} "
                             "(rowsft.load_dataset gives them; for a text classifier use kind='classification')")
        self.epoch = 0

    def _text_column(self) -> str:
        columns = column_names(self.dataset)
        if "text" in columns:
            return "text"
        if "prompt" in columns and "choices" in columns:
            choices = _column(self.dataset, "choices")
            if all(list(c) == list(choices[0]) for c in choices):
                return "prompt"
            raise ValueError("this dataset has different choices in every row (multiple choice); a sequence "
                             "classifier cannot score them: use a causal LM (kind='causal-lm')")
        raise ValueError(f"classification needs a 'text' (or 'prompt') column; the dataset has {sorted(columns)}")

    def __len__(self) -> int:
        n = self.num_examples / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self) -> Iterator[dict]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.iter_epoch(epoch)

    def iter_epoch(self, epoch: int) -> Iterator[dict]:
        order = list(range(self.num_examples))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.collate(rows_at(self.dataset, order[start:start + self.batch_size]))

    def first(self) -> dict:
        return next(self.iter_epoch(0))

    def collate(self, rows: list[Mapping]) -> dict:
        """One batch from a list of rows (dicts with the task columns)."""
        if self.kind == "causal-lm":
            return self._collate_causal(rows)
        return self._collate_classification(rows)

    def _collate_causal(self, rows):
        tok = self.tokenizer
        prompts = tok([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        answers = tok([_correct_choice(r) for r in rows], add_special_tokens=False)["input_ids"]
        sequences, labels = [], []
        for prompt, answer in zip(prompts, answers):
            ids, n_context = encode_causal(self.prefix, prompt, answer, self.max_length)
            sequences.append(ids)
            labels.append([IGNORE_INDEX] * n_context + ids[n_context:])
        input_ids = pad_right(sequences, tok.pad_token_id)               # (B, T)
        return {"input_ids": input_ids,
                "attention_mask": pad_right([[1] * len(s) for s in sequences], 0),  # (B, T)
                "labels": pad_right(labels, IGNORE_INDEX)}                # (B, T), -100 on prompt and padding

    def _collate_classification(self, rows):
        tok = self.tokenizer
        texts = tok([r[self.text_column] for r in rows], add_special_tokens=False)["input_ids"]
        room = self.max_length - len(self.prefix) - len(self.suffix)
        from_start = self.text_column == "prompt"   # prompts end with the question: keep the end
        sequences = [self.prefix + (t[-room:] if from_start else t[:room]) + self.suffix if len(t) > room
                     else self.prefix + t + self.suffix for t in texts]
        return {"input_ids": pad_right(sequences, tok.pad_token_id),            # (B, T)
                "attention_mask": pad_right([[1] * len(s) for s in sequences], 0),  # (B, T)
                "labels": torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)}  # (B,)

    def __repr__(self) -> str:
        return (f"Batches({self.num_examples} rows, kind={self.kind!r}, batch_size={self.batch_size}, "
                f"max_length={self.max_length}, {len(self)} batches per epoch, next epoch {self.epoch})")


def batches(dataset, tokenizer, batch_size: int = 8, max_length: int = 256, shuffle: bool = True, seed: int = 0,
            kind: str = "auto", drop_last: bool = False) -> Batches:
    """Re-iterable training batches over one split (see :class:`Batches` and the module docstring).

    ``dataset``: a ``datasets.Dataset`` or a list of dicts with the task columns (``prompt``,
    ``choices``, ``label``; or ``text``, ``label`` for classification). ``kind``: ``"causal-lm"``,
    ``"classification"`` or ``"auto"`` (classification when the tokenizer has a CLS token).
    ``batch_size`` (>= 1) and ``max_length`` (>= 2) must be whole numbers: ``2.7`` is refused with a
    ValueError, never rounded.
    """
    return Batches(dataset, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=shuffle, seed=seed,
                   kind=kind, drop_last=drop_last)


# ----------------------------------------------------------------------------------------------
# row access for datasets.Dataset and plain lists of dicts


def column_names(dataset) -> set:
    if hasattr(dataset, "column_names"):
        return set(dataset.column_names)
    return set(dataset[0]) if len(dataset) else set()


def _column(dataset, name: str) -> list:
    if hasattr(dataset, "column_names"):
        return list(dataset[name])
    return [row[name] for row in dataset]


def rows_at(dataset, indices: list[int]) -> list[dict]:
    if hasattr(dataset, "column_names"):
        columns = dataset[indices]            # dict of lists
        return [{k: v[i] for k, v in columns.items()} for i in range(len(indices))]
    return [dataset[i] for i in indices]


def _correct_choice(row: Mapping) -> str:
    choices, label = row["choices"], int(row["label"])
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is out of range for {len(choices)} choices in row {dict(row)!r:.200}")
    return choices[label]


def to_device(batch: Any, device: torch.device) -> dict:
    if not isinstance(batch, dict):
        raise TypeError(f"each batch must be a dict of tensors the model takes as model(**batch), got {type(batch).__name__}")
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
