"""The command line: one small function per subcommand.

Deliberate errors (bad input) print one line and exit with code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from paretoopt.errors import ParetoError, one_line

EXIT_BAD_INPUT = 2
MIN_TOKEN = 16  # characters of the agent's shared token
TARGET_HELP = (
    "one of the runtimes the study compared (target.compare): its figures and front "
    "(default: the study's target.runtime)"
)


def _search(args: argparse.Namespace) -> int:
    from paretoopt.results.report import RichReporter
    from paretoopt.study.search import search

    search(
        args.space,
        trials=args.trials,
        results_root=args.results,
        reporter=RichReporter(),
        max_failures=args.max_failures,
        workers=args.workers,
    )
    return 0


def _worker(args: argparse.Namespace) -> int:
    from paretoopt.results.report import RichReporter
    from paretoopt.study.workers import join_study

    join_study(args.storage, args.study, Path(args.results), RichReporter(), args.max_failures)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from paretoopt.config.space import dump_space, load_space
    from paretoopt.study.trial import check_inputs

    space = load_space(args.space)
    check_inputs(space)
    print(dump_space(space), end="")
    print(f"# {args.space}: valid", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    from paretoopt.results.frames import JOURNAL_FILE, for_target, load_results, torn_tail
    from paretoopt.results.report import fitted_width, front_table, plain_console

    folder = Path(args.results) / args.study
    torn = torn_tail(folder / JOURNAL_FILE) if args.storage is None else 0
    if torn:  # reading changes nothing: the next search cuts it back, keeping a copy
        print(
            f"warning: {folder / JOURNAL_FILE} ends in {torn} bytes that are not a whole "
            "record (a crash or a full disk mid-write); a trial whose end was in them "
            "reads as running. The next `paretoopt search` of this study cuts them off "
            "and keeps a copy.",
            file=sys.stderr,
        )
    console = plain_console()
    results = for_target(load_results(folder, args.storage), args.target)
    console.print(front_table(results, fitted_width(console)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from paretoopt.results.frames import for_target, load_results
    from paretoopt.results.share import write_report

    results = for_target(load_results(Path(args.results) / args.study, args.storage), args.target)
    path = write_report(results, args.out)
    print(f"report of {args.study}: {path} ({path.stat().st_size:,} bytes, opens offline)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from paretoopt.config.metrics import quality_metric, quality_name
    from paretoopt.export import export_trial

    formats = tuple(f.strip() for f in (args.format or "").split(",") if f.strip()) or None
    done = export_trial(
        Path(args.results) / args.study,
        args.out,
        trial=args.trial,
        rule=args.pick,
        formats=formats,
        force=args.force,
        tolerance=args.tolerance,
        storage=args.storage,
        space=args.space,
        target=args.target,
    )
    how = f" (picked by {args.pick!r}; latencies as re-measured when the search ended)"
    if args.target:
        how = f" (picked by {args.pick!r} on the {args.target} front)"
    print(f"exported trial {done.trial} of {args.study}{how if args.pick else ''}:")
    for fmt, path in done.files.items():
        check = done.checks[fmt]
        origin = "made afresh, verified" if check["made_afresh"] else "the measured file"
        quality = quality_metric(check["metric"])
        print(
            f"  {path}  ({fmt}, {check['bytes']:,} B, {origin}; test "
            f"{quality_name(check['metric'])} {quality.text(check['test_accuracy'])}, "
            f"recorded {quality.text(check['recorded_test_accuracy'])})"
        )
    print(f"  {done.card}  (model card; Markdown beside it)")
    return 0


def _app(args: argparse.Namespace) -> int:
    import subprocess

    script = Path(__file__).with_name("app.py")
    command = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.headless", "true",
        "--server.address", args.host,
        "--server.port", str(args.port),
        "--browser.gatherUsageStats", "false",
        "--", "--results", args.results,
    ]  # fmt: skip
    if args.storage:
        command += ["--storage", args.storage]
    if args.space:
        command += ["--space", str(Path(args.space).resolve())]
    print(f"paretoopt explorer on http://{args.host}:{args.port} (Ctrl-C stops it)")
    return subprocess.call(command)


def _agent(args: argparse.Namespace) -> int:
    import os
    import tempfile

    from paretoopt.measure.agent import Agent, make_server

    token = os.environ.get(args.token_env, "")
    if len(token) < MIN_TOKEN:
        raise ParetoError(
            f"--token-env: the environment variable {args.token_env} must hold the shared "
            f"token (at least {MIN_TOKEN} characters); it is "
            f"{'unset' if not token else f'{len(token)} characters'}"
        )
    agent = Agent(token, args.max_bytes)
    server = make_server(agent, args.host, args.port)
    # an empty working folder: nothing a model could name relative to it exists
    os.chdir(tempfile.mkdtemp(prefix="paretoopt-agent-"))
    runtimes = ", ".join(f"{name} {version}" for name, version in agent.runtimes().items())
    print(
        f"paretoopt agent on {args.host}:{server.server_port} ({runtimes}; uploads up to "
        f"{args.max_bytes} bytes); Ctrl-C stops it",
        file=sys.stderr,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paretoopt",
        description="Automated Pareto search over pruning, quantization and distillation, "
        "measured on the target runtime.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    # --debug is accepted before or after the subcommand
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    p = sub.add_parser(
        "search", parents=[debug], help="run or resume the study a space file describes"
    )
    p.add_argument("--space", required=True, help="search-space YAML file")
    p.add_argument(
        "--trials",
        type=_positive_int,
        default=None,
        help="total trials (baseline included); overrides search.trials, "
        "so a finished study can be continued",
    )
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="trial processes on this machine sharing the study (default: 1)",
    )
    p.add_argument(
        "--max-failures",
        type=_positive_int,
        default=None,
        help="stop once this many trials of the session have failed, with their reasons",
    )
    p.set_defaults(func=_search)

    p = sub.add_parser(
        "worker",
        parents=[debug],
        help="run trials of a study started with a PostgreSQL storage, from any machine",
    )
    p.add_argument(
        "--storage",
        required=True,
        help="the study's PostgreSQL URL, as this machine reaches it (postgresql://user@host/db)",
    )
    p.add_argument("--study", required=True, help="study name")
    p.add_argument(
        "--results",
        default="results",
        help="the study's results root, a folder shared by every machine (default: results)",
    )
    p.add_argument(
        "--max-failures",
        type=_positive_int,
        default=None,
        help="stop once this many trials of this worker have failed, with their reasons",
    )
    p.set_defaults(func=_worker)

    p = sub.add_parser(
        "validate", parents=[debug], help="check a space file and print its normalised form"
    )
    p.add_argument("--space", required=True, help="search-space YAML file")
    p.set_defaults(func=_validate)

    p = sub.add_parser("show", parents=[debug], help="print the Pareto front of a study")
    p.add_argument("--study", required=True, help="study name (folder under results/)")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument(
        "--storage", default=None, help="the study's database URL (a folder's is never opened)"
    )
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.set_defaults(func=_show)

    p = sub.add_parser(
        "report", parents=[debug], help="write a study's front as one self-contained HTML file"
    )
    p.add_argument("--study", required=True, help="study name (folder under results/)")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--out", default="report.html", help="the HTML file (default: report.html)")
    p.add_argument(
        "--storage", default=None, help="the study's database URL (a folder's is never opened)"
    )
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.set_defaults(func=_report)

    p = sub.add_parser(
        "export", parents=[debug], help="hand over a trial's model, exactly as measured"
    )
    p.add_argument("--study", required=True, help="study name (folder under results/)")
    p.add_argument("--results", default="results", help="results root (default: results)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument(
        "--pick",
        help="'knee', or a rule such as 'max accuracy where size <= 200kB and latency <= 0.3ms'",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format",
        default=None,
        help="comma-separated: onnx, pt2, safetensors, openvino (.xml/.bin), executorch "
        "(.pte) (default: the first three, and the study's runtime's own)",
    )
    p.add_argument("--target", default=None, help=TARGET_HELP)
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.5,
        help="largest accepted difference of the test split's quality metric (top-1 "
        "accuracy unless the space file's metric says otherwise) to the recorded figure, "
        "in its units (points of percent for the built-in metrics); default %(default)s",
    )
    p.add_argument(
        "--storage", default=None, help="the study's database URL (a folder's is never opened)"
    )
    p.add_argument(
        "--space",
        default=None,
        help="the space file you searched with: its model and data factories rebuild and "
        "check the model (a results folder's are never imported)",
    )
    p.set_defaults(func=_export)

    p = sub.add_parser("app", parents=[debug], help="explore the fronts in a browser")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--storage", default=None, help="an Optuna storage URL to read instead")
    p.add_argument(
        "--space",
        default=None,
        help="the space file you searched with, for the download button of a study built "
        "from your own factories",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8501, help="port (default: 8501)")
    p.set_defaults(func=_app)

    p = sub.add_parser(
        "agent",
        parents=[debug],
        help="time models on this machine for a remote search (ONNX Runtime; OpenVINO and "
        "ExecuTorch where installed)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default: 8765)")
    p.add_argument(
        "--token-env",
        default="PARETOOPT_AGENT_TOKEN",
        help="environment variable holding the shared token (default: PARETOOPT_AGENT_TOKEN)",
    )
    p.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=256 * 1024 * 1024,
        help="largest model upload accepted, in bytes (default: 256 MiB)",
    )
    p.set_defaults(func=_agent)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ParetoError as exc:
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # the disk or the file system, not the input
        if args.debug:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
