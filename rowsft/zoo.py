"""Models and datasets rowsft knows by name: the bundled real assets, tiny test models, batching.

(Skeleton: tiny models only; the bundled assets, datasets and batching are filled in by issue 2.)
"""
from __future__ import annotations

import torch

TINY_VOCAB = {"llama": 49152, "gpt2": 49152, "bert": 30522}


def tiny_model(arch: str, vocab_size: int | None = None, seed: int = 0, num_labels: int = 2,
               dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 64):
    """A randomly initialised, seeded, few-layer model built from a config (no weights downloaded).

    ``arch``: ``"llama"`` (causal LM, grouped-query attention 4 heads / 2 kv heads), ``"gpt2"``
    (causal LM with HF ``Conv1D`` layers) or ``"bert"`` (sequence classification, ``num_labels``).
    """
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
                              LlamaConfig, LlamaForCausalLM)
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
    elif arch == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=2 * hidden, max_position_embeddings=512, num_labels=num_labels)
        model = BertForSequenceClassification(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose 'llama', 'gpt2' or 'bert'")
    model.config.name_or_path = f"tiny-{arch}"
    return model.to(dtype).eval()
