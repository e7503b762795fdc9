"""The tutorial notebooks' shape, checked without running them (running them is nbval's job).

``ROWSFT_FAST=1 .venv/bin/python -m pytest --nbval-lax --nbval-current-env
--nbval-sanitize-with notebooks/sanitize.cfg notebooks/`` executes every notebook; these fast
checks catch what nbval does not: a missing FAST setup cell, committed outputs that are absent,
carry errors or are too large, an embedded copy of plotly.js, stored widget state, and the answer
checker of the classroom notebook.
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
         "05_methods_compared", "06_classroom"]
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
    assert all(c.get("execution_count") for c in cells), f"{name}: run every cell before committing"
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name}: committed outputs hold an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    text = path.read_text(encoding="utf-8")
    assert "plotly.min.js" not in text and "require.config" not in text, f"{name} embeds plotly.js"
    assert "widgets" not in nb.get("metadata", {}), f"{name} stores widget state (execute with store_widget_state=False)"
    assert "application/vnd.plotly.v1+json" in text or name == "06_classroom", f"{name} shows no figure"
    assert "USDT:" not in text, f"{name}: profiler log lines leaked into the outputs"


@pytest.mark.parametrize("name", NAMES)
def test_checked_cells_print_mode_independent_facts(name):
    checked = [c for c in _code_cells(_load(name)) if "NBVAL_CHECK_OUTPUT" in _source(c)]
    for cell in checked:
        for out in cell.get("outputs", []):
            assert out["output_type"] == "stream", f"{name}: a checked cell should only print() facts"
            text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
            assert not re.search(r"\d+\.\d{2,}", text), f"{name}: a checked cell prints a measured number"


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
    assert check("Q", 100, 101, rel_tol=0.02, explanation="why") is True
    assert "RIGHT" in capsys.readouterr().out
    assert check("Q", 150, 100, rel_tol=0.02, explanation="why") is False
    assert "not quite" in capsys.readouterr().out
    assert check("Q", ..., 100) is None
    assert "not answered" in capsys.readouterr().out
    assert check("Q", "Column", "column") is True
    assert check("Q", "abc", 3) is False


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
