"""Render every figure stored in the tutorials into ``docs/figures/tutorials/`` and write an index.

Each plotly figure that a committed (default-mode) tutorial holds is rendered again from its stored
JSON by headless Chromium (kaleido, through ``rowsft.viz.save_figure``) as a PNG, so that a reader
can look at every figure without running a notebook, and a reviewer can check them one by one. The
index ``docs/figures/tutorials/README.md`` lists them per notebook with the heading they sit under.

    .venv/bin/python scripts/tutorial_figures.py            # all tutorials
    .venv/bin/python scripts/tutorial_figures.py 02 04      # only notebooks whose name starts so

Only files named ``<notebook>-figNN.png`` and the index are written; nothing else in the folder is
touched, and a figure file of a notebook is replaced only when that notebook is rendered again.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import plotly.io as pio

from rowsft.viz import save_figure

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
OUT = ROOT / "docs" / "figures" / "tutorials"
PLOTLY = "application/vnd.plotly.v1+json"
WIDTH = 1000          # px; the figures' own heights are kept


def stored_figures(path: Path) -> list[tuple[str, dict]]:
    """``[(heading, figure JSON)]`` of every plotly output of a notebook, in order; the heading is the
    last markdown heading above the figure's cell."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    heading, found = path.stem, []
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] == "markdown":
            titles = re.findall(r"^#{1,4} (.+)$", source, re.M)
            heading = titles[-1].strip() if titles else heading
        for output in cell.get("outputs", []):
            if PLOTLY in output.get("data", {}):
                found.append((heading, output["data"][PLOTLY]))
    return found


def figure_title(spec: dict) -> str:
    title = spec.get("layout", {}).get("title", {})
    text = title.get("text", "") if isinstance(title, dict) else str(title)
    return re.sub(r"<[^>]+>", " ", text).strip()


def render(notebook: Path) -> list[tuple[str, str, str]]:
    """Render one notebook's figures; ``[(file name, heading, figure title)]``."""
    rows = []
    for number, (heading, spec) in enumerate(stored_figures(notebook), start=1):
        name = f"{notebook.stem}-fig{number:02d}.png"
        fig = pio.from_json(json.dumps(spec))
        save_figure(fig, OUT / name, width=WIDTH, scale=1.0)
        rows.append((name, heading, figure_title(spec)))
        print(f"  {name}: {figure_title(spec) or heading}")
    return rows


def write_index(done: dict[str, list[tuple[str, str, str]]]) -> None:
    lines = ["# Figures of the tutorials", "",
             "Every figure of the committed default-mode run of each notebook, rendered from its stored plotly JSON by",
             "headless Chromium (`python scripts/tutorial_figures.py`). Open a notebook in JupyterLab for the",
             "interactive versions.", ""]
    for notebook in sorted(done):
        lines += [f"## [{notebook}](../../../notebooks/{notebook}.ipynb)", ""]
        for name, heading, title in done[notebook]:
            lines += [f"**{heading}** — {title or 'figure'}", "", f"![{title or heading}]({name})", ""]
    (OUT / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prefixes", nargs="*", help="render only notebooks whose name starts with one of these")
    args = parser.parse_args(argv)
    notebooks = sorted(NOTEBOOKS.glob("*.ipynb"))
    chosen = [p for p in notebooks if not args.prefixes or any(p.stem.startswith(x) for x in args.prefixes)]
    if not chosen:
        parser.error(f"no notebook in {NOTEBOOKS} starts with {args.prefixes}")
    OUT.mkdir(parents=True, exist_ok=True)
    done = {}
    for path in notebooks:
        if path in chosen:
            print(path.name)
            done[path.stem] = render(path)
        else:                                   # keep the index entries of notebooks not rendered now
            done[path.stem] = [(f"{path.stem}-fig{i:02d}.png", h, figure_title(s))
                               for i, (h, s) in enumerate(stored_figures(path), start=1)
                               if (OUT / f"{path.stem}-fig{i:02d}.png").exists()]
    write_index({k: v for k, v in done.items() if v})
    return 0


if __name__ == "__main__":
    sys.exit(main())
