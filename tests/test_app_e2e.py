"""The explorer in a real browser: start it headless, pick a candidate, check the card and
the export control, and keep a screenshot (results/e2e/explorer.png)."""

from __future__ import annotations

import pytest

from paretoopt.results.frames import load_results, trial_record
from paretoopt.study.search import search

from .browser import CHROMIUM, ROOT, browser_page, choose_candidate, serve_app
from .conftest import TINY, write_space

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    doc = dict(TINY, search={"trials": 6, "seed": 0})
    search(write_space(base / "tiny.yaml", doc), results_root=base / "results")
    return base / "results"


def test_pick_a_candidate_in_a_browser(root):
    front = load_results(root / "tiny").pareto
    number = int(front["number"].iloc[-1])
    with serve_app(root) as url, browser_page() as page:
        page.goto(url)
        page.get_by_text("Candidates within the budget").wait_for(timeout=60_000)
        choose_candidate(page, number)
        page.get_by_text(f"Trial {number}:").wait_for(timeout=30_000)
        # the card re-renders in steps: wait for its export command, not the first code block
        command = page.locator('[data-testid="stCode"]', has_text=f"--trial {number} --out").first
        command.wait_for(timeout=30_000)
        assert "paretoopt export --study tiny" in command.inner_text()
        download = page.get_by_role("button", name="Download model files and card (.zip)")
        assert download.is_visible()
        page.get_by_text("Per layer: sparsity").first.wait_for(timeout=30_000)
        drawn = _drawn(page)
        shot = ROOT / "results" / "e2e" / "explorer.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # what the browser drew: every front point (the front trace on top of the others),
    # and one bar per layer of the Sequential model, "3.conv1" included
    plot = next(traces for traces in drawn if any(t[0] == "front" for t in traces))
    kinds = [t[0] for t in plot if t[0] in ("front", "dominated", "infeasible")]
    assert dict((t[0], t[1]) for t in plot)["front"] == len(front) and kinds[-1] == "front"
    bars = next(traces for traces in drawn if traces and traces[0][2] == "bar")
    layers = trial_record(load_results(root / "tiny"), number).layer_quant
    assert bars[0][1] == len(layers) and "3.conv1" in bars[0][3]


def _drawn(page) -> list[list[list]]:
    """Each plotly chart on the page: per trace, its name, point count, type and x."""
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot').length >= 2")
    return page.evaluate(
        "() => [...document.querySelectorAll('.js-plotly-plot')].map(d => d._fullData.map("
        "t => [t.name, t._length, t.type, Array.from(t.x || []).map(String)]))"
    )


def test_the_report_opens_offline_and_shows_every_front_point(root, tmp_path):
    """`paretoopt report` writes one file that Chromium draws with every request to
    the network refused: plotly inlined, the front's points all there."""
    from paretoopt.cli import main

    out = tmp_path / "report.html"
    assert main(["report", "--study", "tiny", "--results", str(root), "--out", str(out)]) == 0
    front = load_results(root / "tiny").pareto
    requests: list[str] = []
    with browser_page(1400, 900) as page:
        page.route("**/*", lambda route: (
            route.continue_() if route.request.url.startswith("file:")
            else (requests.append(route.request.url), route.abort())
        ))  # fmt: skip
        page.goto(out.resolve().as_uri())
        page.wait_for_selector(".main-svg", timeout=30_000)
        drawn = page.evaluate(
            "() => [...document.querySelectorAll('.plotly-graph-div')].map("
            "d => d._fullData.map(t => [t.name, t._length]))"  # as plotly drew them
        )
        page.screenshot(path=str(ROOT / "results" / "e2e" / "report.png"), full_page=True)
    assert requests == []  # nothing was fetched from anywhere
    traces = dict(drawn[0])  # the front figure comes first
    assert traces["front"] == len(front)
    assert len(drawn) >= 2  # the front and the hypervolume history at least
