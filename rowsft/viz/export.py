"""Writing a figure to a file that opens anywhere: interactive HTML, or a static PNG/SVG/PDF.

HTML carries plotly.js inside the file, so it opens offline in any browser. Static formats go
through kaleido (plotly's own exporter); without it the error says how to install it.
"""
from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from rowsft.io_utils import atomic_write_bytes

STATIC_FORMATS = (".png", ".svg", ".pdf")


def save_figure(fig: go.Figure, path, width: int | None = None, height: int | None = None, scale: float = 2.0) -> Path:
    """Write ``fig`` to ``path`` (``.html`` or one of :data:`STATIC_FORMATS`), atomically; returns the path."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix != ".html" and suffix not in STATIC_FORMATS:
        raise ValueError(f"{str(path)!r}: give a file ending in .html or one of {STATIC_FORMATS}")
    if target.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name such as {target / ('figure' + (suffix or '.html'))}")
    if suffix == ".html":
        data = fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    else:
        try:
            data = fig.to_image(format=suffix[1:], width=width, height=height, scale=scale)
        except (ImportError, ValueError, RuntimeError) as e:
            raise ImportError(f"writing {suffix} needs kaleido and a Chromium it can drive ({e}); "
                              f"`pip install kaleido`, or save as .html instead") from None
    atomic_write_bytes(target, data)
    return target
