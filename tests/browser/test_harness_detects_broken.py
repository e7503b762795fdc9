"""The browser harness itself: it sees working widgets, fails on broken ones, and always cleans up.

Small fixture notebooks (``tests/browser/fixtures/``) stand in for the product, so the product is
never broken on purpose:

- ``widgets_ok.ipynb``: a FigureWidget heatmap, a *rows* slider driving a parameter count, and a
  *Launch* button appending points to a live curve from a thread — the helpers must see all of it;
- ``figure_never_renders.ipynb``: a widget view whose model never arrives and a FigureWidget with no
  trace — ``wait_for_plot`` must raise a clear ``AssertionError`` within its short timeout;
- ``cell_raises.ipynb``: ``Notebook.run_all`` must report the traceback instead of waiting;
- and ``jupyter_lab`` must stop the server and its kernels, close the port and remove the temporary
  root when a step inside it fails.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from .jupyter_harness import (
    Notebook,
    browser_marks,
    button,
    chromium_page,
    html_text,
    jupyter_lab,
    port_is_open,
    screenshot,
    set_slider,
    trace_points,
    wait_for_plot,
)

pytestmark = browser_marks()

FIXTURES = Path(__file__).with_name("fixtures")
SHORT = 5.0          # seconds wait_for_plot gets before it must give up on a broken figure


@pytest.fixture(scope="module")
def lab_page():
    with jupyter_lab(sorted(FIXTURES.glob("*.ipynb"))) as lab, chromium_page() as page:
        yield lab, page


def test_helpers_see_working_widgets(lab_page):
    lab, page = lab_page
    nb = Notebook(page, lab, "widgets_ok.ipynb").open()
    nb.run_all(timeout=90)
    out = nb.cell_output("widgets.VBox(")
    plot = wait_for_plot(out, title="Fixture heatmap", trace_type="heatmap", min_points=6)
    assert plot["marks"]["heatmap"] >= 1 and plot["traces"][0]["points"] == 6
    wait_for_plot(nb.cell_output("Fixture static bars"), title="Fixture static bars", trace_type="bar", min_points=2)
    assert "256" in html_text(out, "trainable parameters")                  # 4 rows × 64
    set_slider(out, "rows", 9)
    deadline = time.monotonic() + 20
    while "576" not in html_text(out, "trainable parameters"):
        assert time.monotonic() < deadline, html_text(out, "trainable parameters")
        time.sleep(0.2)
    button(out, "Launch").click()
    seen = []
    while not out.locator(".widget-html", has_text="final loss").count():
        assert time.monotonic() < deadline + 30, f"no summary; points seen {seen}"
        seen.append(trace_points(out, "Fixture live curve", "scatter"))
        time.sleep(0.3)
    assert any(0 < n < 12 for n in seen), f"the helper did not see the curve grow: {seen}"
    assert trace_points(out, "Fixture live curve", "scatter") == 12
    screenshot(page, "harness-widgets-ok")


def test_wait_for_plot_fails_fast_on_figures_that_never_render(lab_page):
    lab, page = lab_page
    nb = Notebook(page, lab, "figure_never_renders.ipynb").open()
    nb.run_all(timeout=90)
    assert any("model not found" in e for e in nb.widget_errors()), nb.widget_errors()

    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"no plotly figure drew a heatmap trace .* within 5 s; figures seen: none"):
        wait_for_plot(nb.cell_output("model_id"), trace_type="heatmap", timeout=SHORT)
    assert time.monotonic() - start < SHORT + 10

    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"'Fixture empty figure' drew a scatter trace.*'traces': \[\]"):
        wait_for_plot(nb.cell_output("FigureWidget("), title="Fixture empty figure", trace_type="scatter",
                      timeout=SHORT)
    assert time.monotonic() - start < SHORT + 10
    screenshot(page, "harness-figure-never-renders")


def test_run_all_reports_the_failing_cell(lab_page):
    lab, page = lab_page
    nb = Notebook(page, lab, "cell_raises.ipynb").open()
    start = time.monotonic()
    with pytest.raises(AssertionError, match="RuntimeError: fixture cell failed on purpose"):
        nb.run_all(timeout=90)
    assert time.monotonic() - start < 60


def _start_kernel(lab) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{lab.url}/api/kernels", data=json.dumps({"name": "python3"}).encode(),
                                     headers={"Authorization": f"token {lab.token}"}, method="POST")
    with opener.open(request, timeout=30) as reply:
        assert reply.status == 201


def test_server_kernels_port_and_root_are_gone_after_a_failing_step():
    psutil = pytest.importorskip("psutil")
    with pytest.raises(RuntimeError, match="a step failed"):
        with jupyter_lab([FIXTURES / "widgets_ok.ipynb"]) as lab:
            port, root, server_pid = lab.port, lab.root, lab.process.pid
            assert port_is_open(port) and (root / "widgets_ok.ipynb").is_file()
            _start_kernel(lab)
            deadline = time.monotonic() + 30
            while not (kernels := psutil.Process(server_pid).children(recursive=True)):
                assert time.monotonic() < deadline, "the kernel process did not appear"
                time.sleep(0.2)
            raise RuntimeError("a step failed")
    assert not port_is_open(port), f"port {port} is still open"
    assert not root.exists(), f"{root} was not removed"
    assert not psutil.pid_exists(server_pid), f"the server (pid {server_pid}) is still running"
    alive = [p.pid for p in kernels if _running(psutil, p)]
    assert not alive, f"kernel processes {alive} outlived the server"


def _running(psutil, process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
