"""``fedsim run SCENARIO [key=value ...]`` and ``fedsim run --resume RUN``: train, then
adapt when the scenario has an adaptation section."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsim.cli.adapt import adapt_after_run
from fedsim.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, BadInput, console, error, fmt, quiet_libraries
from fedsim.data.loading import num_clients
from fedsim.engine.runtimes import RUNTIMES
from fedsim.engine.server import RunFailure
from fedsim.outputs import check_out_folder
from fedsim.results import RunFolder, describe, plot_accuracy, summarize
from fedsim.scenario import load_scenario, new_run, open_run
from fedsim.schema import ScenarioError
from fedsim.tracking.sinks import build_trackers


def _progress(out: Console, total_rounds: int, done: int) -> tuple[Progress, Callable[[dict[str, Any]], None]]:
    """A progress bar over rounds showing the current accuracy, and a line per evaluation."""
    progress = Progress(TextColumn("round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"), TimeElapsedColumn(), console=out)
    task = progress.add_task("rounds", total=total_rounds, completed=done, acc="")

    def on_round(record: dict[str, Any]) -> None:
        acc = fmt(record.get("accuracy"))  # None when every evaluation reply was dropped
        doms = "  ".join(f"{d}={fmt(a, 3)}" for d, a in (record.get("per_domain") or {}).items())
        fails = f"  failures={len(record['failures'])}" if record.get("failures") else ""
        progress.console.print(f"round {record['round']:>3}/{total_rounds}  acc={acc}  {doms}  up={record['bytes_up'] / 1e6:.2f}MB  {record['wall_s']:.1f}s{fails}")
        progress.update(task, completed=record["round"], acc=f"accuracy {acc}")

    return progress, on_round


def final_table(out: Console, records: list[dict[str, Any]], title: str) -> None:
    """Accuracy per domain at the last evaluated round and at the best one (by mean)."""
    evaluated = [r for r in records if r.get("accuracy") is not None]
    if not evaluated:
        return
    last = evaluated[-1]
    best = max(evaluated, key=lambda r: r["accuracy"])
    table = Table(title=title)
    table.add_column("domain")
    table.add_column(f"last (round {last['round']})", justify="right")
    table.add_column(f"best (round {best['round']})", justify="right")
    for d, a in (last.get("per_domain") or {}).items():
        table.add_row(d, fmt(a), fmt((best.get("per_domain") or {}).get(d)))
    table.add_row("[b]mean[/b]", f"[b]{fmt(last.get('accuracy'))}[/b]", f"[b]{fmt(best.get('accuracy'))}[/b]")
    out.print(table)


def cmd_run(args: argparse.Namespace) -> int:
    held: list[RunFolder] = []  # the run folder whose lock this command took
    try:
        return _cmd_run(args, held)
    finally:
        for run in held:
            run.unlock()


def _cmd_run(args: argparse.Namespace, held: list[RunFolder]) -> int:
    out = console()
    try:
        if args.resume:
            if args.scenario or args.overrides:
                raise BadInput("--resume takes only the run folder; its scenario.yaml is used as saved")
            run, scenario = open_run(args.resume, lock=True)  # one writer per run folder
            resume, created = True, False
        else:
            if not args.scenario:
                raise BadInput("fedsim run: give a scenario file or --resume RUN_FOLDER")
            if "=" in args.scenario and not Path(args.scenario).exists():
                raise BadInput(f"{args.scenario}: scenario file not found (overrides come after the scenario file)")
            if args.out:  # before the (slower) scenario checks: fail fast
                check_out_folder(args.out)
            scenario = load_scenario(args.scenario, list(args.overrides))
            folder = Path(args.out) if args.out else Path("runs") / scenario.name
            check_out_folder(folder)
            # an empty folder the user made is used, but never removed after a failure
            created = not (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()))
            run = RunFolder.create(folder, scenario, overwrite=args.overwrite)
            resume = False
        held.append(run)
        # a resume checks the checkpoints, metrics and scenario here, before writing anything
        experiment = new_run(scenario, run, resume=resume)
    except (ScenarioError, BadInput) as exc:
        error(exc)
        return EXIT_BAD_INPUT
    for warning in experiment.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    out.print(f"[b]{scenario.name}[/b]: {scenario.strategy.name} on {scenario.data.dataset}, {num_clients(scenario.data)} clients, {scenario.rounds} rounds, seed {scenario.seed}, runtime {scenario.runtime.name} -> {run.path}")
    quiet_libraries()
    t0 = time.perf_counter()
    done = experiment.checkpoint.round if experiment.checkpoint else 0
    progress, on_round = _progress(out, scenario.rounds, done)
    try:  # a resume continues at round done + 1: the trackers drop what they hold from there on
        trackers = build_trackers(scenario, run.path, first_step=done + 1 if resume else None)
        if not resume:
            trackers.log_hparams(scenario)
    except Exception as exc:  # noqa: BLE001 - one line, e.g. an unreachable MLflow server
        error(f"tracking: {type(exc).__name__}: {exc} ({_after_failure(run, created)})")
        return EXIT_FAILURE

    def on_round_tracked(record: dict[str, Any]) -> None:
        on_round(record)
        trackers.log_round(record)

    experiment.on_round = on_round_tracked
    try:
        with progress:
            RUNTIMES[scenario.runtime.name](experiment)
    except RunFailure as exc:
        error(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"interrupted; {_after_failure(run, created)}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one line; keep what can be resumed
        error(f"run failed: {type(exc).__name__}: {exc} ({_after_failure(run, created)})")
        if os.environ.get("FEDSIM_DEBUG"):
            raise
        return EXIT_FAILURE
    finally:
        trackers.close()
    records = run.read_metrics()
    try:
        run.write_summary(summarize(records, scenario, time.perf_counter() - t0))
        plot_accuracy(records, run.plot_file, describe(scenario))
    except OSError as exc:  # e.g. a full disk: the rounds and checkpoints already on disk stay
        error(f"writing the summary of {run.path} failed: {exc} ({len(records)} evaluated rounds kept in {run.metrics_file}; {_resume_advice(run)})")
        return EXIT_FAILURE
    final_table(out, records, f"{describe(scenario)}: accuracy")
    out.print(f"done in {time.perf_counter() - t0:.1f}s; results in {run.path}")
    if scenario.adaptation is not None:  # the test-time adaptation phase
        return adapt_after_run(run, scenario, str(args.scenario or run.scenario_file), out)
    return EXIT_OK


def _resume_advice(run: RunFolder) -> str:
    return f"continue with: fedsim run --resume {run.path}" if run.resumable() else "no round was checkpointed, so there is nothing to resume"


def _after_failure(run: RunFolder, created: bool) -> str:
    """What happened to the run folder after a failed run, as advice that is true: a folder
    this process created is removed when nothing resumable is in it; --resume is advised
    only when a checkpoint exists (and the folder is then kept)."""
    if run.resumable():
        return f"continue with: fedsim run --resume {run.path}"
    if created and run.discard():
        return f"nothing was checkpointed; {run.path} removed"
    return f"nothing was checkpointed; run folder kept: {run.path}"
