"""Drive the explorer in a real browser: Debian's chromium through Playwright.

    python -m tests.browser results docs/explorer.png   # the README's screenshot

Playwright's own browser download does not work here, so the system chromium is used.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_app(results: Path, timeout: float = 60.0) -> Iterator[str]:
    """The app, headless on 127.0.0.1, as `paretoopt app` starts it; yields its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", str(ROOT / "paretoopt" / "app.py"),
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), "--browser.gatherUsageStats", "false",
        "--", "--results", str(results),
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                stderr = server.stderr.read().decode() if server.stderr else ""
                raise RuntimeError(f"the app did not start: {stderr[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def browser_page(width: int = 1600, height: int = 1100) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def wait_idle(page: object, timeout_s: float = 60.0) -> None:
    """Until the app's script run has finished (Streamlit shows its status widget while
    running): a box clicked mid-run is drawn again under the pointer and the click lost."""
    deadline = time.monotonic() + timeout_s
    while page.locator('[data-testid="stStatusWidget"]').count() and time.monotonic() < deadline:
        time.sleep(0.2)


def choose_candidate(page: object, number: int, tries: int = 4) -> None:
    """Pick a trial in the "Candidate" box, the way a user does: once the page is drawn,
    and again if the box did not open (seen here: one click in two or three hung for
    30 s in headless chromium, before and after the page finished running)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(tries):
        wait_idle(page)
        try:
            page.get_by_role("combobox", name="Candidate").click(timeout=10_000)
            page.get_by_role("option", name=str(number), exact=True).click(timeout=10_000)
            return
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
            page.keyboard.press("Escape")  # close a half-open list before the next try


def screenshot(results: Path, out: Path) -> None:
    with serve_app(results) as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("Candidates within the budget").wait_for(timeout=60_000)
        page.get_by_text("Take it away").wait_for(timeout=60_000)
        time.sleep(2)  # plotly finishes drawing
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
