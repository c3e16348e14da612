"""Screenshots of the HTML report and the live view for the README, in headless Chromium.

``python -m analyses.screenshot URL OUT.png [--hover FIGURE_ID] [--fx F --fy F] [--top]``: opens URL (a
``file://`` report or a ``gradflow watch`` page) in the system chromium driven by Playwright, hovers
a point of the first heatmap of FIGURE_ID (``--fx/--fy``: fractions of its width/height; ``--top``:
scroll that figure to the top first) so the hover label shows, and writes a PNG of the viewport.
Needs ``pip install playwright`` and ``apt-get install chromium`` (no browser download).
"""

from __future__ import annotations

import argparse
import shutil


def screenshot(url: str, out: str, hover: str | None = None, width: int = 1100, height: int = 760,
               fx: float = 0.5, fy: float = 0.5, top: bool = False) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("error: no chromium on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        if hover:
            page.wait_for_selector(f"#{hover} .heatmaplayer image", state="attached", timeout=120_000)
            target = page.locator(f"#{hover} .nsewdrag").first
            if top:  # the figure at the top of the viewport
                page.evaluate(f"document.getElementById('{hover}').scrollIntoView()")
            target.scroll_into_view_if_needed()
            box = target.bounding_box()
            page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
            page.wait_for_selector(f"#{hover} .hoverlayer .hovertext", state="attached", timeout=10_000)
        page.screenshot(path=out)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--hover", default=None)
    parser.add_argument("--fx", type=float, default=0.5)
    parser.add_argument("--fy", type=float, default=0.5)
    parser.add_argument("--top", action="store_true", help="scroll the hovered figure to the top first")
    args = parser.parse_args()
    screenshot(args.url, args.out, args.hover, fx=args.fx, fy=args.fy, top=args.top)


if __name__ == "__main__":
    main()
