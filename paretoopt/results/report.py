"""What a running search tells its user: a progress bar, one line per trial, the front.

The search talks to a Reporter; the CLI uses the rich one, the Python API a silent one.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
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
from paretoopt.results.frames import early_text
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

    def trial_stopped(self, number: int, kind: str, reason: str) -> None:
        """Rejected before fine-tuning or stopped at a rung (study/fidelity)."""

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
        # piped output (CI logs, tee): one line per trial, never wrapped or cut at rich's
        # 80 columns, and a summary line every SUMMARY_EVERY trials for the bar it lacks
        self.console = console or plain_console()
        self.started = time.monotonic()
        self.total = self.first = 0
        self.progress: Progress | None = None
        self.task: Any = None
        self.best: dict[str, float] = {}  # over feasible trials of this session
        self.objectives: tuple[str, ...] = ()  # the study's, set by start
        self.quality = DEFAULT_QUALITY  # ... and what its accuracy objective measures
        self.stopped: dict[str, int] = {}  # this session's trials ended early, by kind

    def log(self, message: str) -> None:
        (self.progress.console if self.progress else self.console).print(message)

    def start(self, space: Space, done: int) -> None:
        if self.progress is not None:  # a second round of trials in the same session
            return
        self.objectives, self.quality = tuple(space.metrics), space.metric
        self.started, self.total, self.first = time.monotonic(), space.search.trials, done
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
        figures += compared_text(record, baseline)
        self.log(
            f"trial {number:>3} {status} {seconds:5.1f} s  {figures}  "
            f"{escape(record.get('plan_summary', ''))}"
        )

    def trial_failed(self, number: int, reason: str) -> None:
        self.log(f"trial {number:>3} [red]FAIL[/] {escape(reason)}")

    def trial_stopped(self, number: int, kind: str, reason: str) -> None:
        self.stopped[kind] = self.stopped.get(kind, 0) + 1
        self.log(f"trial {number:>3} [cyan]{escape(reason)}[/]")

    def advance(self, done: int) -> None:
        if self.progress is None:
            return
        best = (
            "best: "
            + ", ".join(m.text(self.best[m.name]) for m in shown(self.objectives, self.quality))
            if self.best
            else ""
        )
        self.progress.update(self.task, completed=done, best=best)
        if not self.console.is_terminal and done % SUMMARY_EVERY == 0 and done < self.total:
            self.log(self._summary(done, best))

    def _summary(self, done: int, best: str) -> str:
        """e.g. "progress: 40 of 120 trials, 2:10 elapsed, eta 4:20; best: ..." (the
        eta from this session's pace)."""
        elapsed = time.monotonic() - self.started
        ran = done - self.first
        eta = _clock(elapsed / ran * (self.total - done)) if ran > 0 else "?"
        early = "".join(f", {n} {k}" for k, n in sorted(self.stopped.items()))
        return (
            f"progress: {done} of {self.total} trials{early}, {_clock(elapsed)} elapsed, "
            f"eta {eta}" + (f"; {best}" if best else "")
        )

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, results: StudyResults) -> None:
        self.console.print(front_table(results, fitted_width(self.console)))
        self.console.print(
            f"results: {results.directory}/ (trials.csv, pareto.csv, layers.csv, "
            "space.yaml, run.json, trials/<n>/ artifacts of the front"
            + (", each compared runtime's in trials/<n>/<runtime>/)" if results.compared else ")")
        )
        root = results.directory.parent
        flags = "" if root.resolve() == Path("results").resolve() else f" --results {root}"
        for runtime in results.compared:  # one front per runtime (target.compare)
            self.console.print(
                f"the front in {runtime}: paretoopt show --study {results.name}{flags} "
                f"--target {runtime}"
            )


SUMMARY_EVERY = 10  # trials between summary lines where there is no progress bar


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def compared_text(record: TrialRecord, baseline: dict[str, Any]) -> str:
    """e.g. " | openvino acc 98.52 latency 0.0941 ms (2.73x)" for each runtime of
    target.compare: the trial's accuracy there, and its latency with its speed-up over
    the baseline in that runtime ("" where none)."""
    parts = []
    for runtime, figures in record.compared.items():
        base = (baseline.get("compared") or {}).get(runtime) or {}
        if figures.error or figures.latency_ms is None or not base.get("latency_ms"):
            parts.append(f"{runtime} [red]failed[/]" if figures.error else f"{runtime} ?")
            continue
        speedup = base["latency_ms"] / figures.latency_ms
        parts.append(
            f"{runtime} acc {figures.accuracy:.2f} latency {figures.latency_ms:.4f} ms "
            f"({speedup:.2f}x)"
        )
    return "".join(f" | {p}" for p in parts)


def _figure(m: Metric, value: float, base: float, short: str = "acc") -> str:
    """e.g. "acc  98.52 % (-0.74)", "size   10.2 kB (45.7x)", "latency 0.0171 ms (4.87x)"
    (`short`: the quality metric's name, "acc" for top-1 accuracy)."""
    ratio = m.ratio(value, base)
    if m.maximize:
        unit = f" {m.display_unit}" if m.display_unit else ""
        return f"{short} {value:6.{m.decimals}f}{unit} ({ratio:+.2f})"
    width = ">9" if m.prefixed else ""
    return f"{m.name} {m.text(value):{width}} ({ratio:4.{m.ratio_decimals}f}x)"


def front_table(results: StudyResults, width: int | None = None) -> Table:
    """The front as a table. Within `width` columns (a terminal's), the least needed
    columns go first: the plan is cut short, then dropped, then test accuracy, the
    change in accuracy and the ratios; trial, accuracy and each objective's figure
    always stay."""
    if len(results.pareto):
        early = early_text(results.trials)
        title = (
            f"Pareto front of {results.name}: {len(results.pareto)} of "
            f"{len(results.trials)} trials (feasible, non-dominated)"
            + (f"; {early}" if early else "")
            + (f"; measured in {results.shown_runtime}" if results.compared else "")
        )
    else:
        title = (
            f"{results.name}: no feasible completed trial yet among "
            f"{len(results.trials)}; see trials.csv for the reasons"
        )
    columns, busy = front_columns(results)
    kept = _fitting(columns, width)
    table = Table(title=title)
    for column in kept:  # never squeezed: the plan gives way first
        table.add_column(column.header, justify="right", no_wrap=True, min_width=column.wide)
    room = None if width is None else width - _width(kept) - 3  # the plan's, cut to it
    plan = room is None or room >= PLAN_MIN
    if plan:
        table.add_column("plan", justify="left", no_wrap=True, overflow="ellipsis", max_width=room)
    for i, (_, r) in enumerate(results.pareto.iterrows()):
        cells = [c.cells[i] for c in kept]
        table.add_row(*cells, *([str(r["plan"])] if plan else []))
    if busy:
        table.caption = "* re-measured while the machine was never quiet (see trials.csv)"
    return table


PLAN_MIN = 12  # the plan column is shown only with at least this much room


def fitted_width(console: Console) -> int | None:
    """The width a table must fit: a terminal's; None for a file or a pipe, where lines
    may be as long as they need (nothing cuts or wraps them)."""
    return console.width if console.is_terminal else None


def plain_console() -> Console:
    """A console for the tables: a terminal's width, or unbounded lines in a pipe."""
    return Console() if sys.stdout.isatty() else Console(width=100_000)


@dataclass(frozen=True)
class Column:
    header: str
    cells: list[str]
    # 0: always shown; higher: dropped sooner where the width is short (test accuracy,
    # then the change, the ratios, the confirmed latency)
    rank: int

    @property
    def wide(self) -> int:
        return max([len(self.header), *map(len, self.cells)])


def front_columns(results: StudyResults) -> tuple[list[Column], bool]:
    """Every column of the front table but the plan, and whether a confirmation was
    taken while the machine was never quiet."""
    rows = [r for _, r in results.pareto.iterrows()]
    metrics = shown(results.metrics)[1:]  # accuracy has its own columns
    short, q = quality_short(results.quality), results.shown_metrics[0]
    unit = f" {q.display_unit}" if q.display_unit else ""
    columns = [
        Column("trial", [str(r["number"]) for r in rows], 0),
        Column(f"val {short}{unit}", [q.show(r["accuracy"]) for r in rows], 0),
        Column(
            "Δ pts" if unit else "Δ",
            [f"{r.get('accuracy_change', 0):+.{q.decimals}f}" for r in rows],
            3,
        ),
        Column(f"test {short}{unit}", [q.show(r["test_accuracy"]) for r in rows], 4),
    ]
    for m in metrics:
        figures = [m.text(r[m.field]) if m.prefixed else m.show(r[m.field]) for r in rows]
        ratios = [f"{r.get(m.ratio_column, 1):.{m.ratio_decimals}f}" for r in rows]
        columns += [Column(m.column, figures, 0), Column(m.ratio_label, ratios, 2)]
    again = results.pareto.get("confirm_latency_ms")
    busy = False
    if again is not None and bool(again.notna().any()):  # what picks read
        latency, cells = METRICS["latency"], []
        for r in rows:
            value = r.get("confirm_latency_ms")
            mark = "*" if flag(r.get(CONFIRMED_QUIET)) is False else ""
            busy = busy or bool(mark)
            known = value is not None and value == value
            cells.append(latency.show(value) + mark if known else "-")
        columns.append(Column("confirmed", cells, 1))
    return columns, busy


def _width(columns: list[Column]) -> int:
    """Characters a table of these columns takes: each one's widest cell, its padding
    and border, and the closing border."""
    return sum(c.wide + 3 for c in columns) + 1


def _fitting(columns: list[Column], width: int | None) -> list[Column]:
    """The columns that fit in `width`, dropping the highest ranks first (the last
    column of a rank first); rank 0 always stays."""
    kept = list(columns)
    while width is not None and _width(kept) > width:
        droppable = [c for c in kept if c.rank > 0]
        if not droppable:
            break
        worst = max(c.rank for c in droppable)
        kept.remove([c for c in droppable if c.rank == worst][-1])
    return kept
