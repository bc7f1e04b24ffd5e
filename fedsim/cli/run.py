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
from fedsim.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_OK,
    BadInput,
    console,
    error,
    quiet_libraries,
    show_runtime_notes,
)
from fedsim.data.loading import num_clients
from fedsim.engine.server import RunFailure
from fedsim.outputs import check_out_folder
from fedsim.runs import OpenRun, RunInterrupted, describe, fmt, open_new_run, open_resumed_run, round_line, train
from fedsim.scenario import load_scenario
from fedsim.schema import ScenarioError


def _progress(out: Console, total_rounds: int, done: int) -> tuple[Progress, Callable[[dict[str, Any]], None]]:
    """A progress bar over rounds showing the current accuracy, and a line per evaluation."""
    progress = Progress(
        TextColumn("round"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[acc]}"),
        TimeElapsedColumn(),
        console=out,
    )
    task = progress.add_task("rounds", total=total_rounds, completed=done, acc="")

    def on_round(record: dict[str, Any]) -> None:
        progress.console.print(round_line(record, total_rounds))
        progress.update(task, completed=record["round"], acc=f"accuracy {fmt(record.get('accuracy'))}")

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
    held: list[OpenRun] = []  # the run folder whose lock this command took
    try:
        return _cmd_run(args, held)
    finally:
        for job in held:
            job.close()


def _cmd_run(args: argparse.Namespace, held: list[OpenRun]) -> int:
    """Argument handling, progress and exit codes; the run itself is :mod:`fedsim.runs`
    (as for the Python API, :func:`fedsim.api.run`)."""
    out = console()
    try:
        if args.resume:
            if args.scenario or args.overrides:
                raise BadInput("--resume takes only the run folder; its scenario.yaml is used as saved")
            job = open_resumed_run(args.resume)
        else:
            if not args.scenario:
                raise BadInput("fedsim run: give a scenario file or --resume RUN_FOLDER")
            if "=" in args.scenario and not Path(args.scenario).exists():
                raise BadInput(f"{args.scenario}: scenario file not found (overrides come after the scenario file)")
            if args.out:  # before the (slower) scenario checks: fail fast
                check_out_folder(args.out)
            scenario = load_scenario(args.scenario, list(args.overrides))
            job = open_new_run(scenario, args.out, overwrite=args.overwrite, source=str(args.scenario))
        held.append(job)
    except (ScenarioError, BadInput) as exc:
        error(exc)
        return EXIT_BAD_INPUT
    for warning in job.warnings:
        print(f"warning: {warning}", file=sys.stderr)

    scenario, run = job.scenario, job.run
    out.print(
        f"[b]{scenario.name}[/b]: {scenario.strategy.name} on {scenario.data.dataset}, {num_clients(scenario.data)} clients, {scenario.rounds} rounds, seed {scenario.seed}, runtime {scenario.runtime.name} -> {run.path}"
    )
    quiet_libraries()
    show_runtime_notes()
    t0 = time.perf_counter()
    progress, on_round = _progress(out, scenario.rounds, job.done_rounds)
    try:
        with progress:
            trained = train(job, on_round, getattr(args, "ray_start", None))
    except RunFailure as exc:
        error(exc)
        if os.environ.get("FEDSIM_DEBUG") and exc.__cause__ is not None:
            raise exc.__cause__ from exc  # FEDSIM_DEBUG: the traceback of the cause
        return EXIT_FAILURE
    except RunInterrupted as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILURE
    final_table(out, trained.records, f"{describe(scenario)}: accuracy")
    out.print(f"done in {time.perf_counter() - t0:.1f}s; results in {run.path}")
    if scenario.adaptation is not None:  # the test-time adaptation phase
        return adapt_after_run(job, out)
    return EXIT_OK
