"""Small pieces every control shares: the status area, error guarding, byte formatting, and
refreshing a live ``FigureWidget`` from a freshly built figure.

Bad input must never end in a traceback wall: handlers run inside :meth:`StatusArea.guard`, which
turns an exception into one readable red line (the full traceback goes to the
``rowsft.notebook`` logger at DEBUG level) and leaves every widget usable.
"""
from __future__ import annotations

import functools
import html
import logging
import threading

import ipywidgets as widgets
import plotly.graph_objects as go

log = logging.getLogger("rowsft.notebook")

STYLES = {
    "info": "color:#1b3a57;background:#eef5fb;border-left:4px solid #1f77b4",
    "success": "color:#1e4620;background:#edf7ed;border-left:4px solid #2ca02c",
    "error": "color:#611a15;background:#fdecea;border-left:4px solid #d62728",
}


def error_message(exc: BaseException) -> str:
    """The message of an exception without its traceback (KeyError's quotes removed)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text) or type(exc).__name__


class StatusArea(widgets.HTML):
    """One line of feedback: ``info``, ``success`` or ``error`` (styled red). Thread-safe."""

    def __init__(self, **kwargs):
        super().__init__(value="", **kwargs)
        self.kind: str | None = None
        self.message: str = ""
        self._status_lock = threading.Lock()

    def show(self, kind: str, message: str) -> None:
        with self._status_lock:
            self.kind, self.message = kind, message
            self.value = (f'<div style="{STYLES[kind]};padding:4px 8px;margin:2px 0;white-space:pre-wrap">'
                          f"{html.escape(message)}</div>")

    def info(self, message: str) -> None:
        self.show("info", message)

    def success(self, message: str) -> None:
        self.show("success", message)

    def error(self, message: str) -> None:
        self.show("error", message)

    def clear(self) -> None:
        with self._status_lock:
            self.kind, self.message, self.value = None, "", ""

    def guard(self, what: str):
        """Decorator: run the handler; on an exception show ``"<what>: <message>"`` and return None."""
        def wrap(fn):
            @functools.wraps(fn)
            def guarded(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - shown to the user instead of a traceback
                    log.debug("%s failed", what, exc_info=True)
                    self.error(f"{what}: {error_message(exc)}")
                    return None
            return guarded
        return wrap


def format_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def format_count(n: int) -> str:
    return f"{n:,}"


def refresh_figure(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Make ``widget`` show ``figure``: update traces in place when they match by name and type
    (one batched message), else replace them; the layout is updated too."""
    same = len(widget.data) == len(figure.data) and all(
        a.name == b.name and a.type == b.type for a, b in zip(widget.data, figure.data))
    if same:
        with widget.batch_update():
            for old, new in zip(widget.data, figure.data):
                old.update(new.to_plotly_json(), overwrite=True)
            widget.layout.update(figure.layout.to_plotly_json(), overwrite=True)
    else:
        with widget.batch_update():
            widget.data = ()
        widget.add_traces(list(figure.data))
        widget.layout = figure.layout


def section(title: str) -> widgets.HTML:
    return widgets.HTML(f"<h3 style='margin:12px 0 4px 0'>{html.escape(title)}</h3>")


LIVE_KERNEL_NOTE = ("{name}: an interactive widget, shown only while a Jupyter kernel runs this notebook "
                    "(the static HTML, GitHub and nbviewer show this line instead; run the notebook to use it)")


class Displayable:
    """Mixin: an object whose ``.widget`` is shown when it is the last expression of a cell.

    Its plain-text form (what nbconvert's HTML, GitHub and nbviewer show of a widget whose state is
    not saved) is a one-line note that the widget needs a live kernel, not the widget tree's repr.
    """
    widget: widgets.Widget

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        data, metadata = bundle if isinstance(bundle, tuple) else (bundle or {}, None)   # (data, metadata) or data
        data = {**data, "text/plain": LIVE_KERNEL_NOTE.format(name=type(self).__name__)}
        return data if metadata is None else (data, metadata)
