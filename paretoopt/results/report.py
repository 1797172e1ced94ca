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

from paretoopt.config.metrics import DEFAULT_QUALITY, METRICS, Metric, quality_short, shown
from paretoopt.results.pick import CONFIRMED_QUIET, flag

if TYPE_CHECKING:
    from paretoopt.config.space import Space
    from paretoopt.results.frames import StudyResults
    from paretoopt.results.record import TrialRecord


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
        record: TrialRecord,
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


class RichReporter(Reporter):
    """Progress bar with ETA and the best figure per objective, a line per trial."""

    def __init__(self, console: Console | None = None) -> None:
        # piped output (CI logs, tee) gets a wide console instead of rich's 80 columns
        self.console = console or Console(width=None if sys.stdout.isatty() else 160)
        self.progress: Progress | None = None
        self.task: Any = None
        self.best: dict[str, float] = {}  # over feasible trials of this session
        self.objectives: tuple[str, ...] = ()  # the study's, set by start
        self.quality = DEFAULT_QUALITY  # ... and what its accuracy objective measures

    def log(self, message: str) -> None:
        (self.progress.console if self.progress else self.console).print(message)

    def start(self, space: Space, done: int) -> None:
        if self.progress is not None:  # a second round of trials in the same session
            return
        self.objectives, self.quality = tuple(space.metrics), space.metric
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
        record: TrialRecord,
        seconds: float,
        baseline: dict[str, Any],
        feasible: bool,
    ) -> None:
        metrics = shown(self.objectives, self.quality)
        if feasible:  # the bar's "best" figures are those a user could ship
            for m in metrics:
                value = record[m.field]
                best = self.best.get(m.name, value)
                self.best[m.name] = max(value, best) if m.maximize else min(value, best)
        status = "[green]ok[/]" if feasible else "[yellow]infeasible[/]"
        short = quality_short(self.quality)
        figures = "  ".join(_figure(m, record[m.field], baseline[m.field], short) for m in metrics)
        self.log(
            f"trial {number:>3} {status} {seconds:5.1f} s  {figures}  "
            f"{escape(record.get('plan_summary', ''))}"
        )

    def trial_failed(self, number: int, reason: str) -> None:
        self.log(f"trial {number:>3} [red]FAIL[/] {escape(reason)}")

    def advance(self, done: int) -> None:
        if self.progress is not None:
            best = (
                "best: "
                + ", ".join(m.text(self.best[m.name]) for m in shown(self.objectives, self.quality))
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


def _figure(m: Metric, value: float, base: float, short: str = "acc") -> str:
    """e.g. "acc  98.52 % (-0.74)", "size   10.2 kB (45.7x)", "latency 0.0171 ms (4.87x)"
    (`short`: the quality metric's name, "acc" for top-1 accuracy)."""
    ratio = m.ratio(value, base)
    if m.maximize:
        unit = f" {m.display_unit}" if m.display_unit else ""
        return f"{short} {value:6.{m.decimals}f}{unit} ({ratio:+.2f})"
    width = ">9" if m.prefixed else ""
    return f"{m.name} {m.text(value):{width}} ({ratio:4.{m.ratio_decimals}f}x)"


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
    metrics = shown(results.metrics)[1:]  # accuracy has its own columns
    busy = False  # some confirmation never found the machine quiet
    short, q = quality_short(results.quality), results.shown_metrics[0]
    unit = f" {q.display_unit}" if q.display_unit else ""
    headers = ["trial", f"val {short}{unit}", "Δ pts" if unit else "Δ", f"test {short}{unit}"]
    for m in metrics:
        headers += [m.column, m.ratio_label]
    latency = METRICS["latency"]
    again = results.pareto.get("confirm_latency_ms")
    confirmed = again is not None and bool(again.notna().any())
    if confirmed:  # re-measured at the end of the search: what picks read
        headers.append("confirmed")
    for col in headers:
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("plan", justify="left", no_wrap=True, overflow="ellipsis")
    for _, r in results.pareto.iterrows():
        cells = [
            str(r["number"]),
            q.show(r["accuracy"]),
            f"{r.get('accuracy_change', 0):+.{q.decimals}f}",
            q.show(r["test_accuracy"]),
        ]
        for m in metrics:
            figure = m.text(r[m.field]) if m.prefixed else m.show(r[m.field])
            cells += [figure, f"{r.get(m.ratio_column, 1):.{m.ratio_decimals}f}"]
        if confirmed:
            value = r.get("confirm_latency_ms")
            mark = "*" if flag(r.get(CONFIRMED_QUIET)) is False else ""
            busy = busy or bool(mark)
            known = value is not None and value == value
            cells.append(latency.show(value) + mark if known else "-")
        table.add_row(*cells, str(r["plan"]))
    if busy:
        table.caption = "* re-measured while the machine was never quiet (see trials.csv)"
    return table
