"""What every benchmark script shares: the shipped study's context, trials of the real
pipeline against a measured baseline, and the CSV they leave under results/bench/."""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from paretoopt.config.plan import CompressionPlan
from paretoopt.config.space import load_space
from paretoopt.study.trial import StudyContext, calibrate, prepare, run_trial

ROOT = Path(__file__).resolve().parents[1]
CONV_SPACE = ROOT / "search_spaces" / "conv.yaml"
MLP_SPACE = ROOT / "search_spaces" / "mlp.yaml"
BENCH_DIR = ROOT / "results" / "bench"
Record = dict[str, Any]


def arguments(
    doc: str | None, epochs: bool = True, study: bool = False, space: Path = CONV_SPACE
) -> argparse.Namespace:
    """The options every benchmark takes: the space file (`space` by default), the output
    folder and, where candidates are fine-tuned, the epochs; where it reads one, a
    finished study."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--space", default=str(space), help="search-space YAML file")
    if epochs:
        parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    if study:
        parser.add_argument("--study", help="a finished study folder, e.g. results/digits-conv")
    parser.add_argument("--out", default=str(BENCH_DIR), help="output folder")
    return parser.parse_args()


def context(space_file: str | Path) -> StudyContext:
    """The study's baseline (trained once, then cached) and data, as a search would see them."""
    torch.set_num_threads(2)
    return prepare(load_space(space_file), ROOT / "results" / ".cache")


def run_plans(
    ctx: StudyContext, plans: list[tuple[str, CompressionPlan]]
) -> Iterator[tuple[str, CompressionPlan, Record, Record, float]]:
    """Calibrate, measure the baseline, then run each plan as a trial; yields
    (name, plan, record, baseline record, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        calibrate(ctx, Path(tmp) / "calibration")
        base = run_trial(ctx, CompressionPlan(), Path(tmp) / "baseline", seed=0)
        for name, plan in plans:
            start = time.perf_counter()
            record = run_trial(ctx, plan, Path(tmp) / name, seed=0)
            yield name, plan, record, base, time.perf_counter() - start


def ratios(record: Record, base: Record) -> Record:
    """The candidate's figures against the baseline's, rounded for a table."""
    return {
        "accuracy": round(record["accuracy"], 2),
        "accuracy_change": round(record["accuracy"] - base["accuracy"], 2),
        "size_bytes": record["size_bytes"],
        "size_ratio": round(base["size_bytes"] / record["size_bytes"], 2),
        "latency_ms": round(record["latency_ms"], 4),
        "speedup": round(base["latency_ms"] / record["latency_ms"], 2),
        "latency_spread": round(record["latency"]["spread"], 3),
    }


def write_csv(rows: list[Record], name: str, out: str | Path = BENCH_DIR) -> Path:
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def table(rows: list[Record], columns: dict[str, Callable[[Record], str]]) -> str:
    """A Markdown table: one column per (header, formatter)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f(r) for f in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


def write_figure(figure: Any, name: str, out: str | Path = BENCH_DIR) -> Path:
    """A plotly figure as HTML beside the CSVs; plotly.js is written once into the same
    folder, so the pages open offline."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.write_html(path, include_plotlyjs="directory")
    return path


def snapshot(page: Path, png: Path, size: tuple[int, int] = (1100, 480)) -> bool:
    """A PNG of an HTML figure for the README, taken with Debian's chromium through
    Playwright; False (and a note) where either is missing."""
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        progress(f"no PNG of {page.name}: playwright is not installed")
        return False
    if not chromium.exists():
        progress(f"no PNG of {page.name}: {chromium} is missing")
        return False
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium))
        tab = browser.new_page(viewport={"width": size[0], "height": size[1]})
        tab.goto(page.resolve().as_uri())
        tab.wait_for_selector(".main-svg")
        png.parent.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(png))
        browser.close()
    return True
