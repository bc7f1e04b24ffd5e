"""Command line: ``fedsim run | adapt | list | report | data show | data partitions``.

Exit codes: 0 done, 2 bad input (scenario, override, path), 1 failure while running.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """A one-line message for exit code 2."""


def _quiet_libraries() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    for handler in logging.getLogger("flwr").handlers:
        handler.setLevel(logging.WARNING)


# -- run ----------------------------------------------------------------------------------


def _progress(console, total_rounds: int, done: int):
    """A progress bar over rounds showing the current accuracy, and a line per evaluation."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task("rounds", total=total_rounds, completed=done, acc="")

    def on_round(record: dict[str, Any]) -> None:
        acc = _fmt(record.get("accuracy"))  # None when every evaluation reply was dropped
        doms = "  ".join(f"{d}={_fmt(a, 3)}" for d, a in (record.get("per_domain") or {}).items())
        fails = f"  failures={len(record['failures'])}" if record.get("failures") else ""
        progress.console.print(f"round {record['round']:>3}/{total_rounds}  acc={acc}  {doms}  up={record['bytes_up'] / 1e6:.2f}MB  {record['wall_s']:.1f}s{fails}")
        progress.update(task, completed=record["round"], acc=f"accuracy {acc}")

    return progress, on_round


def _fmt(value: float | None, digits: int = 4) -> str:
    """A metric for the terminal; '-' when a round produced none."""
    return "-" if value is None else f"{value:.{digits}f}"


def _final_table(console, records: list[dict[str, Any]], title: str) -> None:
    from rich.table import Table

    if not records:
        return
    last = records[-1]
    table = Table(title=title)
    table.add_column("domain")
    table.add_column("accuracy", justify="right")
    for d, a in (last.get("per_domain") or {}).items():
        table.add_row(d, _fmt(a))
    table.add_row("[b]mean[/b]", f"[b]{_fmt(last.get('accuracy'))}[/b]")
    console.print(table)


def cmd_run(args: argparse.Namespace) -> int:
    held: list[Any] = []  # the run folder whose lock this command took
    try:
        return _cmd_run(args, held)
    finally:
        for run in held:
            run.unlock()


def _cmd_run(args: argparse.Namespace, held: list[Any]) -> int:
    from rich.console import Console

    from fedsim.config import ScenarioError, load_scenario
    from fedsim.engine.runtimes import RUNTIMES
    from fedsim.engine.server import FederatedRun, RunFailure
    from fedsim.results import RunFolder, plot_accuracy, summarize
    from fedsim.validate import check_out_folder

    console = Console(stderr=False)
    try:
        if args.resume:
            if args.scenario or args.overrides:
                raise BadInput("--resume takes only the run folder; its scenario.yaml is used as saved")
            run, scenario = RunFolder.open(args.resume, lock=True)  # one writer per run folder
            resume, created = True, False
        else:
            if not args.scenario:
                raise BadInput("fedsim run: give a scenario file or --resume RUN_FOLDER")
            overrides = list(args.overrides)
            if args.scenario and "=" in args.scenario and not Path(args.scenario).exists():
                raise BadInput(f"{args.scenario}: scenario file not found (overrides come after the scenario file)")
            if args.out:  # before the (slower) scenario checks: fail fast
                check_out_folder(args.out)
            scenario = load_scenario(args.scenario, overrides)
            out = Path(args.out) if args.out else Path("runs") / scenario.name
            check_out_folder(out)
            # an empty folder the user made is used, but never removed after a failure
            created = not (out.is_dir() and not out.is_symlink() and not any(out.iterdir()))
            run = RunFolder.create(out, scenario, overwrite=args.overwrite)
            resume = False
        held.append(run)
        # a resume checks the checkpoints, metrics and scenario here, before writing anything
        experiment = FederatedRun(scenario, run, resume=resume)
    except (ScenarioError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for warning in experiment.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    console.print(f"[b]{scenario.name}[/b]: {scenario.strategy.name} on {scenario.data.dataset}, {scenario.num_clients} clients, {scenario.rounds} rounds, runtime {scenario.runtime.name} -> {run.path}")
    _quiet_libraries()
    t0 = time.perf_counter()
    done = experiment.checkpoint.round if experiment.checkpoint else 0
    progress, on_round = _progress(console, scenario.rounds, done)
    experiment.on_round = on_round
    try:
        with progress:
            RUNTIMES[scenario.runtime.name](experiment)
    except RunFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"interrupted; {_after_failure(run, created)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one line; keep what can be resumed
        print(f"error: run failed: {type(exc).__name__}: {exc} ({_after_failure(run, created)})", file=sys.stderr)
        if os.environ.get("FEDSIM_DEBUG"):
            raise
        return EXIT_FAILURE
    records = run.read_metrics()
    try:
        run.write_summary(summarize(records, scenario, time.perf_counter() - t0))
        plot_accuracy(records, run.plot_file, f"{scenario.name} ({scenario.strategy.name})")
    except OSError as exc:  # e.g. a full disk: the rounds and checkpoints already on disk stay
        print(f"error: writing the summary of {run.path} failed: {exc} ({len(records)} evaluated rounds kept in {run.metrics_file}; {_resume_advice(run)})", file=sys.stderr)
        return EXIT_FAILURE
    _final_table(console, records, f"{scenario.name}: final accuracy (round {records[-1]['round'] if records else '-'})")
    console.print(f"done in {time.perf_counter() - t0:.1f}s; results in {run.path}")
    if scenario.adaptation is not None:  # test-time adaptation phase (fedsim.tta)
        from fedsim.tta.command import adapt_after_run

        return adapt_after_run(run, scenario, str(args.scenario or run.scenario_file), console)
    return EXIT_OK


def _resume_advice(run: Any) -> str:
    return f"continue with: fedsim run --resume {run.path}" if run.resumable() else "no round was checkpointed, so there is nothing to resume"


def _after_failure(run: Any, created: bool) -> str:
    """What happened to the run folder after a failed run, as advice that is true: a folder
    this process created is removed when nothing resumable is in it; --resume is advised
    only when a checkpoint exists (and the folder is then kept)."""
    if run.resumable():
        return f"continue with: fedsim run --resume {run.path}"
    if created and run.discard():
        return f"nothing was checkpointed; {run.path} removed"
    return f"nothing was checkpointed; run folder kept: {run.path}"


# -- list / report / data ---------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    from adapters import ADAPTERS
    from fedsim.data.base import DATASETS
    from fedsim.models import MODELS
    from strategies import STRATEGIES

    for title, reg in (("strategies", STRATEGIES), ("adapters", ADAPTERS), ("datasets", DATASETS), ("models", MODELS)):
        names = reg.names()
        print(f"{title}: {', '.join(names) if names else '(none yet)'}")
    print("any of these may also be an import path package.module:Name")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedsim.outputs import UnsafeOutput
    from fedsim.report import compare_runs, report_paths, write_table

    runs = [Path(p) for p in args.runs]
    try:
        plot_path, md_path = report_paths(runs, Path(args.out) if args.out else None, args.overwrite)
        rows, domains, plot = compare_runs(runs, plot_path)
    except (FileNotFoundError, ValueError, UnsafeOutput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    table = Table(title="fedsim report (final evaluated round)")
    for col in ["run", "strategy", "round", *domains, "mean", "best", "MB up", "MB down"]:
        table.add_column(col, justify="left" if col in ("run", "strategy") else "right")
    for r in rows:
        table.add_row(r["run"], r["strategy"], str(r["round"]), *[f"{r['per_domain'].get(d, float('nan')):.4f}" for d in domains], f"{r['accuracy']:.4f}", f"{r['best']:.4f}", f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}")
    console = Console() if sys.stdout.isatty() else Console(width=240)
    console.print(table)
    write_table(md_path, rows, domains)
    print(f"plot: {plot}\ntable: {md_path}")
    return EXIT_OK


def cmd_data_show(args: argparse.Namespace) -> int:
    from fedsim.config import DataConfig, ScenarioError, load_scenario
    from fedsim.data.loading import load_dataset
    from fedsim.data.show import save_domain_grid
    from fedsim.outputs import check_file_target

    try:
        check_file_target(Path(args.out), args.overwrite)  # UnsafeOutput is a ScenarioError
        cfg = load_scenario(args.scenario, args.overrides).data if args.scenario else DataConfig()
        dataset = load_dataset(cfg)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    path = save_domain_grid(dataset, args.out, split=args.split)
    print(f"{dataset.name}: {', '.join(f'{d} ({len(s.y_train)} train / {len(s.y_test)} test)' for d, s in dataset.domains.items())}")
    print(f"grid: {path}")
    return EXIT_OK


def cmd_data_partitions(args: argparse.Namespace) -> int:
    import numpy as np

    from fedsim.config import ScenarioError, load_scenario
    from fedsim.data.loading import load_dataset, partitions
    from fedsim.data.partition_stats import count_partitions, format_counts, save_heatmap
    from fedsim.outputs import check_file_target

    try:
        out = Path(args.out) if args.out else None
        if out is not None and out.suffix.lower() != ".png":
            raise BadInput(f"--out {out}: must end in .png")
        if out is not None:
            check_file_target(out, args.overwrite)  # UnsafeOutput is a ScenarioError
        scenario = load_scenario(args.scenario, args.overrides)
        if out is None:
            out = Path(f"{scenario.name}-partitions.png")
            check_file_target(out, args.overwrite)
        dataset = load_dataset(scenario.data)
    except (ScenarioError, BadInput) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    labels = {d: np.asarray(s.y_train) for d, s in dataset.domains.items()}
    counts = count_partitions(partitions(scenario.data, scenario.seed), labels, dataset.class_names or [str(c) for c in range(dataset.num_classes)])
    data = scenario.data
    print(f"{scenario.name}: {dataset.name}, partition {data.partition}, {len(counts.main_domain)} clients, seed {scenario.seed}")
    print(format_counts(counts))
    path = save_heatmap(counts, out, f"{scenario.name}: {dataset.name}, partition {data.partition}, seed {scenario.seed}")
    print(f"heat map: {path}")
    return EXIT_OK


def add_run_arguments(parser: argparse.ArgumentParser, *, out_help: str, resume_help: str) -> None:
    """The arguments every command that runs a scenario into a run folder takes
    (``fedsim run``, ``fedsim edge demo``): scenario, overrides, --out, --overwrite, --resume."""
    parser.add_argument("scenario", nargs="?", help="scenario YAML file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--out", help=out_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing fedsim run folder (never a folder holding other files)")
    parser.add_argument("--resume", metavar="RUN_FOLDER", help=resume_help)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedsim", description="Federated learning and test-time adaptation simulator (Flower + Ray).")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a scenario")
    add_run_arguments(r, out_help="run folder (default runs/<name>)", resume_help="continue a killed run from its last checkpoint")
    r.set_defaults(func=cmd_run)

    from fedsim.tta.command import add_parser as add_adapt_parser

    add_adapt_parser(sub)  # fedsim adapt
    from fedsim.edge.command import add_parser as add_edge_parser

    add_edge_parser(sub)  # fedsim edge demo | up | certs
    from fedsim.sweep_command import add_parser as add_sweep_parser

    add_sweep_parser(sub)  # fedsim sweep

    sub.add_parser("list", help="registered strategies, adapters, datasets, models").set_defaults(func=cmd_list)

    rep = sub.add_parser("report", help="side-by-side table and plot of runs")
    rep.add_argument("runs", nargs="+")
    rep.add_argument("--out", help="plot PNG path; the table goes next to it as .md (default: report.png next to the first run)")
    rep.add_argument("--overwrite", action="store_true", help="replace a report fedsim wrote there before")
    rep.set_defaults(func=cmd_report)

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    show = dsub.add_parser("show", help="save a grid of samples per domain")
    show.add_argument("scenario", nargs="?", help="scenario whose data section to use (default: built-in digits5)")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--out", default="digits5_domains.png")
    show.add_argument("--overwrite", action="store_true", help="replace a grid fedsim wrote there before")
    show.add_argument("--split", default="train", choices=["train", "test"])
    show.set_defaults(func=cmd_data_show)
    parts = dsub.add_parser("partitions", help="per-client counts by label and domain, and a heat map PNG")
    parts.add_argument("scenario", help="scenario whose data section and seed to use")
    parts.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parts.add_argument("--out", help="heat map PNG (default <scenario name>-partitions.png)")
    parts.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    parts.set_defaults(func=cmd_data_partitions)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # output piped into e.g. `head`: not an error of ours
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
