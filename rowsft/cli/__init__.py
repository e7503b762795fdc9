"""The ``rowsft`` command: :mod:`rowsft.cli.commands` (sub-commands and their arguments) and
:mod:`rowsft.cli.job` (one fine-tuning job from start to end, as a ``JobConfig``)."""
from __future__ import annotations

from rowsft.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
