"""Drive a real JupyterLab in the system Chromium, for the browser tests of the tutorials.

Two context managers own every process they start and always clean up, also when a step fails:

- :func:`jupyter_lab` starts ``jupyter lab`` on a random free loopback port with a random token in a
  temporary root (the given files copied there; settings, workspaces, runtime and config folders
  private to it; news, update checks and the extension manager's PyPI calls off) and yields a
  :class:`LabServer`. On exit: SIGTERM to the server's process group, SIGKILL after a grace period,
  then the same for any kernel left over (kernels run in their own sessions), the root removed.
- :func:`chromium_page` launches Debian's ``/usr/bin/chromium`` (never a downloaded browser) through
  Playwright with an empty profile and yields a ``Page``.

The :class:`Notebook` helper opens a notebook, runs all cells through the *Run* menu as a person
would, and finds widgets by their visible labels; :func:`wait_for_plot` waits until a plotly figure is
really drawn (SVG present, traces of the wanted type with points) and raises ``AssertionError`` with
what it saw when that does not happen in time. Screenshots go to ``test-artifacts/browser/``, and so
do a ``failure-<time>.png`` of the page and the server's log when a step fails
(``ROWSFT_BROWSER_KEEP_LOG=1`` keeps the log always).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--no-proxy-server"]
# JupyterLab user settings that keep the page quiet and offline: no news/update toasts.
LAB_SETTINGS = {"@jupyterlab/apputils-extension/notification":
                {"fetchNews": "false", "checkForUpdates": False},
                "@jupyterlab/extensionmanager-extension/plugin": {"enabled": False}}


def browser_unavailable_reason() -> str | None:
    """Why no browser test can run here (``None`` when Chromium and Playwright are there)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return (f"no system Chromium at {CHROMIUM}: install it with "
                "`apt-get update && apt-get install -y chromium chromium-driver` (.ci/run does when it can)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed: `make setup` installs the test extra"
    return None


IN_CI = os.environ.get("CI", "").strip().lower() == "true"


def browser_marks() -> list:
    """The module marks of a browser test: skip where no browser can run, except under ``CI=true``,
    where a missing browser fails every browser test, so that a green CI means the browser was driven."""
    reason = browser_unavailable_reason()
    if reason is not None and IN_CI:
        return [pytest.mark.browser, pytest.mark.usefixtures("fail_without_browser")]
    return [pytest.mark.browser, pytest.mark.skipif(reason is not None, reason=str(reason))]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_open(port: int) -> bool:
    """True when something accepts connections on ``127.0.0.1:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------------------------- server
@dataclass
class LabServer:
    """A running ``jupyter lab``: where it listens, its token, its temporary root and process."""
    port: int
    token: str
    root: Path
    process: subprocess.Popen
    log_path: Path
    kernel_pids: set

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def notebook_url(self, name: str) -> str:
        """The notebook alone in a fresh workspace (no tabs restored from an earlier page)."""
        workspace = re.sub(r"[^A-Za-z0-9]+", "-", Path(name).stem) + "-" + secrets.token_hex(3)
        return f"{self.url}/lab/workspaces/{workspace}/tree/{name}?token={self.token}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def remember_kernels(self) -> None:
        """Note the pids of the server's descendants (kernels live in their own sessions)."""
        with contextlib.suppress(Exception):
            import psutil
            self.kernel_pids |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}


def _lab_command(port: int, token: str, root: Path, private: Path) -> list[str]:
    jupyter = Path(sys.executable).with_name("jupyter")
    head = [str(jupyter), "lab"] if jupyter.exists() else [sys.executable, "-m", "jupyterlab"]
    return head + ["--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                   f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
                   "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
                   "--LabApp.extension_manager=readonly", f"--LabApp.user_settings_dir={private / 'settings'}",
                   f"--LabApp.workspaces_dir={private / 'workspaces'}", "--ServerApp.terminals_enabled=False",
                   ] + (["--allow-root"] if os.geteuid() == 0 else [])


def _wait_until_ready(server: LabServer, timeout: float) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback only, never a proxy
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {server.process.returncode} before it was ready:\n"
                               f"{server.log_tail()}")
        with contextlib.suppress(OSError):
            with opener.open(f"{server.url}/api/status?token={server.token}", timeout=2) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.25)
    raise TimeoutError(f"jupyter lab did not answer on {server.url} within {timeout:.0f} s:\n{server.log_tail()}")


def _end(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _alive(pids: Iterable[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        with contextlib.suppress(Exception):               # a zombie child of ours counts as ended
            import psutil
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue
        alive.append(pid)
    return alive


def stop_server(server: LabServer, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after ``grace`` s, kernels included."""
    server.remember_kernels()
    proc = server.process
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError):          # stragglers in the server's group
        os.killpg(proc.pid, signal.SIGKILL)
    kernels = _alive(server.kernel_pids)
    _end(kernels, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while _alive(kernels) and time.monotonic() < deadline:
        time.sleep(0.1)
    _end(_alive(kernels), signal.SIGKILL)


@contextlib.contextmanager
def jupyter_lab(files: Iterable[Path | str], env: dict | None = None, startup_timeout: float = 90.0,
                ) -> Iterator[LabServer]:
    """Start ``jupyter lab`` serving copies of ``files`` (their names kept) in a temporary root.

    ``env``: extra environment for the server and so for its kernels (e.g. ``{"ROWSFT_FAST": "1"}``).
    Everything is stopped and removed on exit, whatever happened inside the ``with`` block.
    """
    base = Path(tempfile.mkdtemp(prefix="rowsft-lab-"))
    root, private = base / "root", base / "private"
    for folder in (root, private / "settings", private / "workspaces", private / "config", private / "runtime",
                   private / "ipython"):
        folder.mkdir(parents=True)
    for plugin, values in LAB_SETTINGS.items():
        target = private / "settings" / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    for f in map(Path, files):
        shutil.copy2(f, root / f.name)
    port, token = free_port(), secrets.token_hex(16)
    full_env = {**os.environ, "JUPYTER_CONFIG_DIR": str(private / "config"), "JUPYTER_RUNTIME_DIR": str(private / "runtime"),
                "IPYTHONDIR": str(private / "ipython"), "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    log_path = base / "jupyter.log"
    server = None
    try:
        with open(log_path, "wb") as log:
            process = subprocess.Popen(_lab_command(port, token, root, private), cwd=root, env=full_env,
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        server = LabServer(port, token, root, process, log_path, set())
        _wait_until_ready(server, startup_timeout)
        yield server
    except BaseException:
        failed = True
        raise
    else:
        failed = False
    finally:
        try:
            if server is not None:
                stop_server(server)
                if failed or os.environ.get("ROWSFT_BROWSER_KEEP_LOG"):      # the server's side of a failure
                    ARTIFACTS.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(log_path, ARTIFACTS / f"jupyter-{port}.log")
                    print(f"jupyter lab log: {ARTIFACTS / f'jupyter-{port}.log'}")
        finally:
            shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- browser
@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright ``Page`` in the system Chromium with a fresh, empty profile; closed on exit
    (after a ``failure-<time>.png`` screenshot when the ``with`` block raised)."""
    from playwright.sync_api import sync_playwright
    profile = tempfile.mkdtemp(prefix="rowsft-chromium-")
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                profile, executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True,
                viewport={"width": width, "height": height}, device_scale_factor=1, service_workers="block")
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.set_default_timeout(30_000)
                try:
                    yield page
                except BaseException:
                    with contextlib.suppress(Exception):     # what the browser showed when the step failed
                        screenshot(page, time.strftime("failure-%Y%m%d-%H%M%S"))
                    raise
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(target, name: str) -> Path:
    """Save a PNG of a page or locator as ``test-artifacts/browser/<name>.png`` and print its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    _page(target).mouse.move(0, 0)                        # no hover tooltips or plotly mode bars in the picture
    target.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return path


# ---------------------------------------------------------------------------------------------- notebook
KERNEL_IDLE = re.compile(r"^(?!No Kernel).+ \| Idle$")


class Notebook:
    """One notebook open in JupyterLab, driven through its menus and widgets as a person would."""

    def __init__(self, page, server: LabServer, name: str):
        self.page, self.server, self.name = page, server, name

    def open(self, timeout: float = 90) -> "Notebook":
        """Load the notebook and wait until its kernel is connected and idle."""
        self.page.goto(self.server.notebook_url(self.name), timeout=timeout * 1000)
        self.page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=timeout * 1000)
        self.wait_for_kernel_idle(timeout)
        self.server.remember_kernels()
        return self

    def kernel_status(self) -> str:
        return self.page.evaluate("""() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]
            .map(e => e.textContent.trim()).find(t => / \\| [A-Z][a-z]+/.test(t)) || ''""")

    def wait_for_kernel_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not KERNEL_IDLE.match(status := self.kernel_status()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the kernel of {self.name} is not idle after {timeout:.0f} s "
                                   f"(status bar: {status!r})\n{self.server.log_tail()}")
            time.sleep(0.25)

    def prompts(self) -> list[str]:
        """The execution prompts of the code cells, e.g. ``['[1]:', '[*]:', '[ ]:']``."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
            .map(e => e.textContent.trim())""")

    def error_outputs(self) -> list[str]:
        """Text of the tracebacks shown in the notebook."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')]
            .map(e => e.innerText).filter(t => /Traceback|Error[^\\n]*\\n/.test(t) && /^-{5,}|Traceback/m.test(t))""")

    def menu(self, menu: str, item: str) -> None:
        """Click ``item`` (the start of its label) in the main menu ``menu``."""
        self.page.get_by_role("menuitem", name=menu, exact=True).click()
        self.page.get_by_role("menuitem", name=re.compile(rf"^{re.escape(item)}")).click()

    def run_all(self, timeout: float = 120) -> None:
        """Edit → Clear Outputs of All Cells, Run → Run All Cells, then wait until every code cell has
        a fresh execution count (saved outputs cannot pass for new ones); a traceback fails at once."""
        self.menu("Edit", "Clear Outputs of All Cells")
        self.page.wait_for_function("""() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')]
            .every(e => !/\\d/.test(e.textContent))""")
        self.menu("Run", "Run All Cells")
        deadline, quiet = time.monotonic() + timeout, 0
        while True:
            prompts, errors = self.prompts(), self.error_outputs()
            if errors:
                raise AssertionError(f"a cell of {self.name} failed:\n" + "\n".join(e[-2500:] for e in errors))
            done = prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
            quiet = quiet + 1 if done and KERNEL_IDLE.match(self.kernel_status()) else 0
            if quiet >= 2:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not finish running within {timeout:.0f} s; prompts {prompts}")
            time.sleep(0.5)

    def cell_output(self, source_text: str):
        """The output area of the code cell whose source contains ``source_text`` (a Locator)."""
        cell = self.page.locator(".jp-Notebook .jp-CodeCell").filter(
            has=self.page.locator(".jp-InputArea-editor", has_text=source_text))
        return cell.first.locator(".jp-OutputArea").first

    def widget_errors(self) -> list[str]:
        """Outputs where JupyterLab could not show a widget ("Error displaying widget: ...")."""
        return self.page.locator(".jp-Notebook .jp-OutputArea-output", has_text="Error displaying widget").all_inner_texts()


# ---------------------------------------------------------------------------------------------- plots
PLOTS_JS = """(root) => [...root.querySelectorAll('.js-plotly-plot')].map(gd => {
  const count = t => t.type === 'heatmap' ? (t.z || []).reduce((n, row) => n + (row.length || 0), 0)
                                          : (t._length ?? (t.x || t.y || []).length ?? 0);
  const box = gd.getBoundingClientRect();
  const title = gd.layout && gd.layout.title;
  return {
    title: (title && (title.text ?? title)) || (gd.querySelector('.gtitle') || {}).textContent || '',
    figure: (((gd.layout || {}).meta || {}).rowsft || {}).figure || null,
    svg: gd.querySelectorAll('.main-svg').length, width: box.width, height: box.height,
    marks: {heatmap: gd.querySelectorAll('.hm image').length, bar: gd.querySelectorAll('.bars .point path').length,
            scatter: gd.querySelectorAll('.scatterlayer .trace path.js-line, .scatterlayer .trace .point').length},
    traces: (gd._fullData || []).filter(t => t.visible !== false).map(t => ({
      type: t.type, name: t.name || '', meta: t.meta || null, points: count(t)})),
  };
})"""


def plots_in(scope) -> list[dict]:
    """What every plotly figure under ``scope`` (Page or Locator) shows: title, size, traces, drawn marks."""
    if hasattr(scope, "evaluate_all"):
        return scope.evaluate(PLOTS_JS) if scope.count() else []
    return scope.evaluate(f"() => ({PLOTS_JS})(document)")


def _drawn(plot: dict, trace_type: str, min_points: int) -> bool:
    mark = "scatter" if trace_type.startswith("scatter") else trace_type
    return (plot["svg"] > 0 and plot["width"] > 0 and plot["height"] > 0 and plot["marks"].get(mark, 1) > 0
            and any(t["type"] == trace_type and t["points"] >= min_points for t in plot["traces"]))


def wait_for_plot(scope, *, title: str | None = None, trace_type: str = "heatmap", min_points: int = 1,
                  timeout: float = 30.0) -> dict:
    """Wait until a plotly figure under ``scope`` whose title contains ``title`` is drawn with a
    ``trace_type`` trace of at least ``min_points`` points; returns its :func:`plots_in` entry.

    Raises ``AssertionError`` after ``timeout`` s, listing the figures that were seen.
    """
    deadline, seen = time.monotonic() + timeout, []
    while True:
        seen = plots_in(scope)
        for plot in seen:
            if (title is None or title in plot["title"]) and _drawn(plot, trace_type, min_points):
                return plot
        if time.monotonic() > deadline:
            summary = [{k: p[k] for k in ("title", "svg", "marks")} | {"traces": [(t["type"], t["name"], t["points"])
                       for t in p["traces"]]} for p in seen]
            raise AssertionError(f"no plotly figure{f' titled {title!r}' if title else ''} drew a {trace_type} trace "
                                 f"with >= {min_points} point(s) within {timeout:.0f} s; figures seen: {summary or 'none'}")
        time.sleep(0.25)


def trace_points(scope, title: str, trace_type: str = "scatter", meta: dict | None = None) -> int:
    """Points of the ``trace_type`` traces of the figure titled ``title`` whose ``meta`` has the given items."""
    return sum(t["points"] for p in plots_in(scope) if title in p["title"] for t in p["traces"]
               if t["type"] == trace_type and all((t["meta"] or {}).get(k) == v for k, v in (meta or {}).items()))

# ---------------------------------------------------------------------------------------------- widgets
def _labelled(scope, widget_class: str, label: str):
    exact = re.compile(rf"^\s*{re.escape(label)}\s*$")
    return scope.locator(widget_class).filter(has=_page(scope).locator(".widget-label", has_text=exact)).first


def set_slider(scope, label: str, value) -> None:
    """Type ``value`` into the readout of the ipywidgets slider labelled ``label`` and press Enter."""
    slider = _labelled(scope, ".widget-slider", label)
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.press("Control+a")
    readout.type(str(value))
    readout.press("Enter")


def slider_value(scope, label: str) -> str:
    """The readout of the ipywidgets slider labelled ``label``."""
    return _labelled(scope, ".widget-slider", label).locator(".widget-readout").inner_text().strip()


def set_text(scope, label: str, value) -> None:
    """Fill the ipywidgets text box labelled ``label`` with ``value`` and press Enter."""
    box = _labelled(scope, ".widget-text", label).locator("input").first
    box.fill(str(value))
    box.press("Enter")


def button(scope, text: str):
    """The ipywidgets button whose label starts with ``text`` (a Locator)."""
    return scope.locator("button.jupyter-button", has_text=re.compile(rf"^\s*{re.escape(text)}")).first


def scroll_to(locator) -> None:
    """Scroll the notebook so that ``locator``'s top is at the top of the window."""
    locator.evaluate("e => e.scrollIntoView({block: 'start'})")
    time.sleep(0.3)


def html_text(scope, contains: str) -> str:
    """The visible text of the ipywidgets HTML widget containing ``contains``."""
    return scope.locator(".widget-html", has_text=contains).first.inner_text()


def _page(scope):
    return getattr(scope, "page", scope)
