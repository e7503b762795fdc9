"""Stage 0, the inputs: models by name (bundled, tiny or any transformers id), the bundled datasets,
and batches for training.

- :mod:`rowsft.data.assets`: the pip packages that ship weights and data, and the cache folder;
- :mod:`rowsft.data.models`: ``load_model``, ``tiny_model``;
- :mod:`rowsft.data.quantization`: the bitsandbytes settings behind ``load_model(..., quantization=...)``;
- :mod:`rowsft.data.tasks`: ``load_dataset``, prompt templates and verbalizers;
- :mod:`rowsft.data.batching`: ``batches`` (tokenise, truncate, pad, label only the answer).
"""
from __future__ import annotations

from rowsft.data.assets import ASSET_PACKAGES, MissingAssetError, asset_dir, cache_dir
from rowsft.data.batching import IGNORE_INDEX, Batches, batches, ensure_pad_token, to_device
from rowsft.data.models import bundled_models, load_model, tiny_model
from rowsft.data.tasks import DATASETS, load_dataset

__all__ = ["ASSET_PACKAGES", "Batches", "DATASETS", "IGNORE_INDEX", "MissingAssetError", "asset_dir", "batches",
           "bundled_models", "cache_dir", "ensure_pad_token", "load_dataset", "load_model", "tiny_model", "to_device"]
