"""Headless Chromium for the HTML tests: the Debian ``chromium`` package driven by Playwright's Python
package (never a browser download). Tests using :func:`browser_page` skip cleanly when either is missing."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest


def chromium_path() -> str | None:
    """``$GRADFLOW_CHROMIUM``, else the system chromium on PATH."""
    for candidate in (os.environ.get("GRADFLOW_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


class Page:
    """A Playwright page that records console errors and refuses every request off this machine."""

    def __init__(self, page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.blocked: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.route("**/*", self._route)

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("file://", "http://127.0.0.1", "data:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def hover_heatmap(self, figure_id: str, fx: float = 0.3, fy: float = 0.5) -> str:
        """Move the mouse over the first heatmap of a figure; return the hover label's text."""
        self.page.wait_for_selector(f"#{figure_id} .heatmaplayer image", state="attached", timeout=20_000)
        target = self.page.locator(f"#{figure_id} .nsewdrag").first
        target.scroll_into_view_if_needed()
        box = target.bounding_box()
        self.page.mouse.move(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
        label = self.page.locator(f"#{figure_id} .hoverlayer .hovertext").first
        label.wait_for(state="attached", timeout=5_000)
        return label.text_content() or ""


@contextlib.contextmanager
def browser_page():
    """Yield a :class:`Page` in headless Chromium; skip the test when no browser is installed."""
    path = chromium_path()
    if path is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (pip install playwright) not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            yield Page(page)
        finally:
            browser.close()
