"""What a running search tells its user: a progress bar, one line per trial, the front.

The search talks to a Reporter; the CLI uses the rich one, the Python API a silent one.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from .results import StudyResults
    from .space import Space


class Reporter:
    """What a search reports, in order: start, then per trial done or failed and advance,
    then stop and finish. This base class reports nothing (the Python API's default)."""

    def log(self, message: str) -> None:
        pass

    def start(self, space: Space, done: int) -> None:
        pass

    def trial_done(
        self,
        number: int,
        record: dict[str, Any],
        seconds: float,
        baseline: dict[str, Any],
        feasible: bool,
    ) -> None:
        pass

    def trial_failed(self, number: int, reason: str) -> None:
        pass

    def advance(self, done: int) -> None:
        pass

    def stop(self) -> None:
        pass

    def finish(self, results: StudyResults) -> None:
        pass


SilentReporter = Reporter


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class RichReporter(Reporter):
    """Progress bar with ETA and the best figure per objective, a line per trial."""

    def __init__(self, console: Console | None = None) -> None:
        # piped output (CI logs, tee) gets a wide console instead of rich's 80 columns
        self.console = console or Console(width=None if sys.stdout.isatty() else 160)
        self.progress: Progress | None = None
        self.task: Any = None
        self.best: dict[str, float] = {}  # over feasible trials of this session

    def log(self, message: str) -> None:
        (self.progress.console if self.progress else self.console).print(message)

    def start(self, space: Space, done: int) -> None:
        if self.progress is not None:  # a second round of trials in the same session
            return
        self.console.print(
            f"study [bold]{space.study}[/]: {done} of {space.search.trials} "
            f"trials done; sampler {space.search.sampler}, target "
            f"{space.target.runtime}/{space.target.device} "
            f"{space.target.threads} thread(s), batch {space.target.batch_size}"
        )
        self.progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[best]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "search", total=space.search.trials, completed=done, best=""
        )

    def trial_done(
        self,
        number: int,
        record: dict[str, Any],
        seconds: float,
        baseline: dict[str, Any],
        feasible: bool,
    ) -> None:
        acc, size, lat = record["accuracy"], record["size_bytes"], record["latency_ms"]
        if feasible:  # the bar's "best" figures are those a user could ship
            self.best["accuracy"] = max(acc, self.best.get("accuracy", acc))
            self.best["size"] = min(size, self.best.get("size", size))
            self.best["latency"] = min(lat, self.best.get("latency", lat))
        status = "[green]ok[/]" if feasible else "[yellow]infeasible[/]"
        self.log(
            f"trial {number:>3} {status} {seconds:5.1f} s  acc {acc:6.2f} % "
            f"({acc - baseline['accuracy']:+.2f})  size {human_bytes(size):>9} "
            f"({baseline['size_bytes'] / size:4.1f}x)  latency {lat:.4f} ms "
            f"({baseline['latency_ms'] / lat:4.2f}x)  {escape(record.get('plan_summary', ''))}"
        )

    def trial_failed(self, number: int, reason: str) -> None:
        self.log(f"trial {number:>3} [red]FAIL[/] {escape(reason)}")

    def advance(self, done: int) -> None:
        if self.progress is not None:
            best = (
                (
                    f"best: {self.best.get('accuracy', 0):.2f} %, "
                    f"{human_bytes(self.best.get('size', 0))}, "
                    f"{self.best.get('latency', 0):.4f} ms"
                )
                if self.best
                else ""
            )
            self.progress.update(self.task, completed=done, best=best)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, results: StudyResults) -> None:
        self.console.print(front_table(results))
        self.console.print(
            f"results: {results.directory}/ (trials.csv, pareto.csv, "
            "space.yaml, run.json, trials/<n>/ artifacts of the front)"
        )


def front_table(results: StudyResults) -> Table:
    if len(results.pareto):
        title = (
            f"Pareto front of {results.name}: {len(results.pareto)} of "
            f"{len(results.trials)} trials (feasible, non-dominated)"
        )
    else:
        title = (
            f"{results.name}: no feasible completed trial yet among "
            f"{len(results.trials)}; see trials.csv for the reasons"
        )
    table = Table(title=title)
    for col in (
        "trial",
        "val acc %",
        "Δ pts",
        "test acc %",
        "size",
        "x smaller",
        "latency ms",
        "x faster",
    ):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("plan", justify="left", no_wrap=True, overflow="ellipsis")
    for _, r in results.pareto.iterrows():
        table.add_row(
            str(r["number"]),
            f"{r['accuracy']:.2f}",
            f"{r.get('accuracy_change', 0):+.2f}",
            f"{r['test_accuracy']:.2f}",
            human_bytes(r["size_bytes"]),
            f"{r.get('size_ratio', 1):.1f}",
            f"{r['latency_ms']:.4f}",
            f"{r.get('speedup', 1):.2f}",
            str(r["plan"]),
        )
    return table
