"""Render plotly figure files (``*.fig.json``) to SVG for the README, offline, in the system Chromium.

plotly's own static export needs kaleido; this uses what the browser test already has: Playwright
driving ``/usr/bin/chromium`` with the plotly.js bundled in the ``plotly`` package, and plotly.js's
``Plotly.toImage(..., {format: "svg"})``. Nothing is fetched from the network.

    .venv/bin/python benchmarks/render_figures.py benchmarks/results/*.fig.json   # → docs/figures/<name>.svg
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "figures"
CHROMIUM = "/usr/bin/chromium"


def plotly_js() -> str:
    import plotly
    return (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()


def svg_text(data_url: str) -> str:
    """plotly.js returns ``data:image/svg+xml,<url-encoded>`` (or base64)."""
    head, _, body = data_url.partition(",")
    return base64.b64decode(body).decode() if head.endswith(";base64") else urllib.parse.unquote(body)


def render(paths: list[Path], out: Path = OUT, width: int = 900, height: int = 520) -> list[Path]:
    from playwright.sync_api import sync_playwright
    from rowsft.io_utils import atomic_write_text
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_content("<html><body><div id='figure'></div></body></html>")
            page.add_script_tag(content=plotly_js())
            for path in paths:
                figure = json.loads(Path(path).read_text())
                url = page.evaluate(
                    """async ([figure, width, height]) => {
                        const gd = document.getElementById('figure');
                        await Plotly.newPlot(gd, figure.data || [], figure.layout || {}, {staticPlot: true});
                        return await Plotly.toImage(gd, {format: 'svg', width, height});
                    }""", [figure, width, height])
                target = out / (Path(path).name.removesuffix(".fig.json") + ".svg")
                atomic_write_text(target, svg_text(url))
                written.append(target)
                print(f"{path} → {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        finally:
            browser.close()
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("figures", nargs="+", type=Path, help="plotly JSON files (fig.write_json output)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for the SVG files")
    args = ap.parse_args(argv)
    missing = [p for p in args.figures if not p.exists()]
    if missing:
        raise SystemExit(f"no such figure file: {', '.join(map(str, missing))}")
    render(args.figures, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
