"""The tutorial notebooks' shape, checked without running them (running them is nbval's job).

``ROWSFT_FAST=1 .venv/bin/python -m pytest --nbval-lax --nbval-current-env
--nbval-sanitize-with notebooks/sanitize.cfg notebooks/`` executes every notebook; these fast
checks catch what nbval does not: a missing FAST setup cell, committed outputs that are absent,
carry errors or are too large, an embedded copy of plotly.js, stored widget state, test markers in
the students' sight, the classroom's students' and solutions copies drifting apart, the answer checker,
and (with nbconvert) that the HTML of every tutorial shows a static image for each plotly figure.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

import rowsft.notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ["01_quickstart", "02_neuron_importance", "03_row_budgets_and_memory", "04_finetune_in_place",
         "05_methods_compared", "06_classroom", "06_classroom_solutions", "07_systems_appendix"]
STUDENTS_COPY = "06_classroom"            # committed without outputs: the answers are for the students to find
SOLUTIONS_COPY = "06_classroom_solutions"
PLOTLY = "application/vnd.plotly.v1+json"
CHECKED = "nbval-check-output"            # nbval's cell tag: compare this cell's output with the committed one
MAX_BYTES = 2 * 1024 * 1024


def _load(name: str) -> dict:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def test_every_tutorial_is_there():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_first_code_cell_reads_fast_mode(name):
    first = _source(_code_cells(_load(name))[0])
    assert "ROWSFT_FAST" in first and "FAST" in first, f"{name}: the first code cell must read ROWSFT_FAST"


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs_are_complete_small_and_clean(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes; keep notebooks under 2 MB"
    nb = _load(name)
    cells = _code_cells(nb)
    if name == STUDENTS_COPY:
        assert not any(c.get("outputs") or c.get("execution_count") for c in cells), \
            f"{name} is the students' copy: commit it with outputs cleared (the solutions copy keeps them)"
        return
    assert all(c.get("execution_count") for c in cells), f"{name}: run every cell before committing"
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: committed outputs hold an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    text = path.read_text(encoding="utf-8")
    assert "plotly.min.js" not in text and "require.config" not in text, f"{name} embeds plotly.js"
    assert "widgets" not in nb.get("metadata", {}), f"{name} stores widget state (execute with store_widget_state=False)"
    assert PLOTLY in text or name in (STUDENTS_COPY, SOLUTIONS_COPY), f"{name} shows no figure"
    assert "USDT:" not in text, f"{name}: profiler log lines leaked into the outputs"


@pytest.mark.parametrize("name", NAMES)
def test_checked_cells_print_mode_independent_facts(name):
    checked = [c for c in _code_cells(_load(name)) if CHECKED in c.get("metadata", {}).get("tags", [])]
    for cell in checked:
        for out in cell.get("outputs", []):
            assert out["output_type"] == "stream", f"{name}: a checked cell should only print() facts"
            text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
            assert not re.search(r"\d+\.\d{2,}", text), f"{name}: a checked cell prints a measured number"


@pytest.mark.parametrize("name", NAMES)
def test_no_test_markers_in_the_students_sight(name):
    """nbval's markers are cell tags, not comments in the code students read."""
    marked = [_source(c).splitlines()[0] for c in _code_cells(_load(name)) if "NBVAL" in _source(c)]
    assert not marked, f"{name}: use the cell tag {CHECKED!r} instead of a comment: {marked}"


@pytest.mark.parametrize("name", NAMES)
def test_every_notebook_has_exercises_that_check_themselves(name):
    cells = _code_cells(_load(name))
    answers = [c for c in cells if re.search(r"^answer_\w+ = ", _source(c), re.M)]
    checks = [c for c in cells if re.search(r"^check\(", _source(c), re.M)]
    assert answers and len(checks) >= len(answers), f"{name}: each answer cell needs a check(...) cell"


def test_students_copy_matches_the_solutions_but_for_the_answers():
    students, solutions = _load(STUDENTS_COPY), _load(SOLUTIONS_COPY)
    assert len(students["cells"]) == len(solutions["cells"])
    blank = re.compile(r"^(answer_\w+) = \.\.\.", re.M)
    for a, b in list(zip(students["cells"], solutions["cells"]))[1:]:
        sa, sb = _source(a), _source(b)
        if blank.search(sa):
            assert re.sub(r"^answer_\w+ = .*$", "", sa, flags=re.M) == re.sub(r"^answer_\w+ = .*$", "", sb, flags=re.M)
            assert not blank.search(sb), "the solutions copy must fill every answer in"
        else:
            assert sa == sb, f"the two classroom copies differ in a cell: {sa[:60]!r}"


def test_the_solutions_copy_answers_every_exercise_right():
    text = "".join("".join(o.get("text", "")) for c in _code_cells(_load(SOLUTIONS_COPY)) for o in c.get("outputs", []))
    asked = set(re.findall(r'check\("(Exercise \d+)"', "".join(_source(c) for c in _code_cells(_load(SOLUTIONS_COPY)))))
    assert asked and all(f"{q}: RIGHT" in text for q in asked), f"not every exercise is answered right: {sorted(asked)}"
    assert "not quite" not in text and "not answered" not in text


@pytest.mark.parametrize("name", [n for n in NAMES if n != STUDENTS_COPY])
def test_html_export_shows_every_figure_as_an_image(name):
    """Outside JupyterLab (nbconvert's HTML, GitHub, nbviewer) a plotly figure is only seen through the static
    image stored beside it; a widget through its one-line note."""
    nbconvert = pytest.importorskip("nbconvert")
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.reads(json.dumps(_load(name)), as_version=4)
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if PLOTLY in o.get("data", {})]
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    images = len(re.findall(r'<img[^>]+src="data:image/(?:png|svg\+xml)', html)) + html.count("<svg")
    assert images >= len(figures), f"{name}: {len(figures)} plotly figures but {images} static images in the HTML"
    assert "VBox(children=" not in html and "HBox(children=" not in html, f"{name}: a widget shows as its repr"


@pytest.fixture(scope="module")
def setup_helper():
    spec = importlib.util.spec_from_file_location("notebook_setup", NOTEBOOKS / "_setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def test_answer_checker_says_right_wrong_and_blank(setup_helper, capsys):
    check = setup_helper.check
    assert check("Q", 100, 101, rel_tol=0.02, explanation="why").right is True
    assert "RIGHT" in capsys.readouterr().out
    assert check("Q", 150, 100, rel_tol=0.02, explanation="why").right is False
    assert "not quite" in capsys.readouterr().out
    assert check("Q", ..., 100).right is None
    assert "not answered" in capsys.readouterr().out
    assert check("Q", "Column", "column").right is True
    assert check("Q", "abc", 3).right is False
    capsys.readouterr()
    assert check("Q", " Row", "column", notes={"row": "think of what is stored"}).right is False
    assert "think of what is stored" in capsys.readouterr().out
    verdict = check("Q", 1, 1)
    assert bool(verdict) and verdict._ipython_display_() is None     # a check cell shows only the printed line


def test_fast_and_default_settings(setup_helper, monkeypatch):
    monkeypatch.setattr(setup_helper, "configure", lambda seed=0: None)   # no global seeding in the test process
    monkeypatch.setenv("ROWSFT_FAST", "1")
    fast = setup_helper.settings()
    monkeypatch.setenv("ROWSFT_FAST", "0")
    default = setup_helper.settings()
    assert fast.fast and not default.fast
    assert fast.model.startswith("tiny-") and not default.model.startswith("tiny-")
    assert fast.steps < default.steps and fast.max_train < default.max_train
    assert fast == rowsft.notebook.FAST_SETTINGS and default == rowsft.notebook.FULL_SETTINGS   # one settings class


def test_fast_mode_is_read_in_one_place():
    """Only rowsft.notebook.settings.fast_mode reads ROWSFT_FAST; the notebooks and their helper ask it."""
    reads = re.compile(r"(os\.environ|getenv)[^\n]*ROWSFT_FAST")
    sources = [*(ROOT / "rowsft").rglob("*.py"), ROOT / "notebooks" / "_setup.py",
               *(ROOT / "notebooks").glob("*.ipynb")]
    assert [str(p.relative_to(ROOT)) for p in sources if reads.search(p.read_text())] == []
    assert "os.environ.get(FAST_ENV" in (ROOT / "rowsft" / "notebook" / "settings.py").read_text()
