"""Writing a figure to a file that opens anywhere: interactive HTML, or a static PNG/SVG/PDF.

HTML carries plotly.js inside the file, so it opens offline in any browser. Static formats go
through kaleido 1.x (plotly's own exporter), which drives a Chromium-based browser with no network:
the one named by the ``BROWSER_PATH`` environment variable, else the first of ``chromium``,
``google-chrome``, ... on ``PATH`` (Debian's ``/usr/bin/chromium``, which ``make setup`` installs).
:func:`static_export_problem` says why static export cannot work here (``None`` when it can).

In notebooks, :func:`static_renderer` registers a plotly renderer that stores a PNG beside each
interactive figure, so that the figure still shows where plotly's JavaScript does not run
(``jupyter nbconvert --to html``, GitHub, nbviewer). It keeps one Chromium open for the session
(a figure then takes a fraction of a second) and, when a figure cannot be rendered, stores the
interactive figure alone and warns once; every render has a timeout, so a browser that fails never
blocks a cell.
"""
from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import os
import shutil
import threading
import warnings
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer

from rowsft.io_utils import atomic_write_bytes

STATIC_FORMATS = (".png", ".svg", ".pdf")
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
SYSTEM_CHROMIUM = "/usr/bin/chromium"


def chromium_path() -> str | None:
    """The browser kaleido will drive: ``$BROWSER_PATH``, else the first of :data:`BROWSER_NAMES` on
    ``PATH``, else Debian's ``/usr/bin/chromium``; ``None`` when there is none."""
    named = os.environ.get("BROWSER_PATH")
    if named:
        return named if os.path.isfile(named) and os.access(named, os.X_OK) else None
    for name in BROWSER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    if os.path.isfile(SYSTEM_CHROMIUM) and os.access(SYSTEM_CHROMIUM, os.X_OK):
        return SYSTEM_CHROMIUM
    return None


def static_export_problem() -> str | None:
    """Why PNG/SVG/PDF export cannot run here, in one sentence; ``None`` when kaleido 1.x and a
    Chromium are both there (nothing is started to find out)."""
    try:
        import kaleido
    except ImportError:
        return "kaleido is not installed (`pip install kaleido`, or `pip install 'rowsft[notebook]'`)"
    version = getattr(kaleido, "__version__", "1")
    if not str(version).split(".")[0].isdigit() or int(str(version).split(".")[0]) < 1:
        return f"kaleido {version} is too old for plotly 6+ (`pip install 'kaleido>=1'`)"
    if chromium_path() is None:
        where = f"BROWSER_PATH={os.environ['BROWSER_PATH']} is not an executable" if os.environ.get("BROWSER_PATH") \
            else f"no Chromium on PATH nor at {SYSTEM_CHROMIUM}"
        return (f"{where}; install one (`apt-get install chromium`, which `make setup` does as root) "
                "or point BROWSER_PATH at a Chromium or Chrome")
    return None


def _point_kaleido_at_the_browser() -> None:
    """Name the browser for kaleido when it would not find it alone (not on PATH)."""
    path = chromium_path()
    if path and not os.environ.get("BROWSER_PATH") and not any(shutil.which(n) for n in BROWSER_NAMES):
        os.environ["BROWSER_PATH"] = path


def one_line(error: BaseException) -> str:
    """The first line of an error's message (kaleido packs several into a tuple)."""
    first = error.args[0] if error.args else ""
    while isinstance(first, (tuple, list)) and first:
        first = first[0]
    text = str(first or error).strip().splitlines()
    return text[0] if text else type(error).__name__


def to_static(fig, fmt: str = "png", width: int | None = None, height: int | None = None, scale: float = 1.0) -> bytes:
    """The figure as ``fmt`` bytes (png, svg, pdf) through kaleido; raises ``ImportError`` saying
    what is missing."""
    problem = static_export_problem()
    if problem:
        raise ImportError(f"writing {fmt} needs kaleido and a Chromium it can drive: {problem}; "
                          "or save as .html instead")
    _point_kaleido_at_the_browser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "kopts is ignored if using a server"
        try:
            return pio.to_image(fig, format=fmt, width=width, height=height, scale=scale)
        except Exception as e:  # noqa: BLE001 - kaleido and choreographer raise their own kinds
            raise ImportError(f"writing {fmt} needs kaleido and a Chromium it can drive ({one_line(e)}); "
                              "`pip install kaleido`, or save as .html instead") from None


def check_figure_path(path) -> Path:
    """``path`` as a figure file: a ValueError unless it ends in ``.html`` or one of :data:`STATIC_FORMATS`
    and is not a folder (checked before a figure is made, e.g. by ``rowsft explore --figure``)."""
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix != ".html" and suffix not in STATIC_FORMATS:
        raise ValueError(f"{str(path)!r}: give a file ending in .html or one of {STATIC_FORMATS}")
    if target.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name such as {target / ('figure' + (suffix or '.html'))}")
    return target


def save_figure(fig: go.Figure, path, width: int | None = None, height: int | None = None, scale: float = 2.0) -> Path:
    """Write ``fig`` to ``path`` (``.html`` or one of :data:`STATIC_FORMATS`), atomically; returns the path."""
    target = check_figure_path(path)
    suffix = target.suffix.lower()
    if suffix == ".html":
        data = fig.to_html(include_plotlyjs=True, full_html=True).encode("utf-8")
    else:
        data = to_static(fig, suffix[1:], width=width, height=height, scale=scale)
    atomic_write_bytes(target, data)
    return target


# ---------------------------------------------------------------------------------------------- notebooks
class SessionBrowser:
    """One kaleido Chromium kept open in a background thread for a session's renders (~0.2 s a figure
    instead of ~3 s for a browser per figure). Every call waits at most ``timeout`` seconds, so a
    browser that dies or hangs fails a render instead of blocking the notebook."""

    def __init__(self, timeout: float = 120.0):
        import kaleido
        self.timeout = float(timeout)
        self.closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rowsft-kaleido", daemon=True)
        self._thread.start()
        try:
            self._kaleido = self._call(self._open(kaleido), self.timeout)
        except BaseException:
            self._stop()
            raise
        atexit.register(self.close)

    async def _open(self, kaleido):
        browser = kaleido.Kaleido(n=1, timeout=self.timeout)
        await browser.__aenter__()
        return browser

    def _call(self, coroutine, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the browser gave no answer in {timeout:.0f} s") from None

    def render(self, fig_dict: dict, fmt: str = "png", width: int | None = None, height: int | None = None,
               scale: float = 1.0) -> bytes:
        if self.closed:
            raise RuntimeError("the session's browser is closed")
        layout = fig_dict.get("layout", {}) or {}
        opts = dict(format=fmt, scale=scale,
                    width=width or layout.get("width") or pio.defaults.default_width,
                    height=height or layout.get("height") or pio.defaults.default_height)
        return self._call(self._kaleido.calc_fig(fig_dict, opts=opts), self.timeout + 10)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._call(self._kaleido.__aexit__(None, None, None), 15)
        except Exception:  # noqa: BLE001 - closing a dead browser
            pass
        self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class StaticImageRenderer(MimetypeRenderer):
    """A plotly renderer adding a static image (``image/png`` or ``image/svg+xml``) to a figure's
    output; combine it with the interactive one: ``pio.renderers.default = "plotly_mimetype+rowsft_png"``.
    Renders go to one :class:`SessionBrowser`. A figure that cannot be rendered gets no image (the
    interactive output stays), with one warning; the figures after it are not tried."""

    MIMETYPES = {"png": "image/png", "svg": "image/svg+xml"}

    def __init__(self, fmt: str = "png", scale: float = 1.0, width: int | None = None, height: int | None = None,
                 timeout: float = 120.0):
        if fmt not in self.MIMETYPES:
            raise ValueError(f"fmt must be one of {sorted(self.MIMETYPES)}, got {fmt!r}")
        self.fmt, self.scale, self.width, self.height, self.timeout = fmt, scale, width, height, timeout
        self.failed: str | None = None
        self.browser: SessionBrowser | None = None

    def render(self, fig_dict: dict) -> bytes:
        problem = static_export_problem()
        if problem:
            raise ImportError(problem)
        _point_kaleido_at_the_browser()
        if self.browser is None:
            self.browser = SessionBrowser(self.timeout)
        return self.browser.render(fig_dict, self.fmt, self.width, self.height, self.scale)

    def to_mimebundle(self, fig_dict) -> dict:
        if self.failed:
            return {}
        try:
            data = self.render(fig_dict)
        except Exception as e:  # noqa: BLE001 - a missing image must never break the cell
            self.failed = one_line(e)
            if self.browser is not None:
                self.browser.close()
            warnings.warn(f"rowsft: figures are stored without a static image ({self.failed})", stacklevel=2)
            return {}
        if self.fmt == "svg":
            return {self.MIMETYPES["svg"]: data.decode("utf-8")}
        return {self.MIMETYPES["png"]: base64.b64encode(data).decode("ascii")}


def static_renderer(interactive: str = "plotly_mimetype", fmt: str = "png", scale: float = 1.0) -> str:
    """Register :class:`StaticImageRenderer` as ``rowsft_<fmt>`` and return the renderer string to
    make default: ``"<interactive>+rowsft_<fmt>"``, or ``interactive`` alone (with a one-line warning)
    when static export cannot work here (:func:`static_export_problem`)."""
    problem = static_export_problem()
    if problem:
        warnings.warn(f"rowsft: figures are stored interactive only, with no static image ({problem})", stacklevel=2)
        return interactive
    name = f"rowsft_{fmt}"
    pio.renderers[name] = StaticImageRenderer(fmt, scale=scale)
    return f"{interactive}+{name}"
