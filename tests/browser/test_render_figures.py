"""benchmarks/render_figures.py turns a plotly figure file into an SVG in the system Chromium, offline."""
from __future__ import annotations

import importlib.util
import xml.etree.ElementTree as ET

import plotly.graph_objects as go
import pytest

from .jupyter_harness import REPO, browser_marks

pytestmark = browser_marks()


def load_renderer():
    spec = importlib.util.spec_from_file_location("render_figures", REPO / "benchmarks" / "render_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_figure_file_becomes_an_svg_with_its_marks_and_title(tmp_path):
    figure = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2], mode="markers", name="row taylor"))
    figure.update_layout(title="accuracy vs peak memory")
    source = tmp_path / "study-acc_vs_memory.fig.json"
    figure.write_json(source)

    [svg] = load_renderer().render([source], tmp_path / "out")

    assert svg.name == "study-acc_vs_memory.svg"
    root = ET.fromstring(svg.read_text())
    assert root.tag.endswith("svg")
    assert "accuracy vs peak memory" in svg.read_text()
    points = [e for e in root.iter() if e.get("class") == "point"]
    assert len(points) == 3
