"""``fedsim adapt SCENARIO --model RUN`` and the adaptation phase of ``fedsim run``.

Argument handling, output and exit codes; the adaptation itself is :mod:`fedsim.runs` (as
for the Python API, :func:`fedsim.api.adapt`). Exit codes as in :mod:`fedsim.cli.common`:
0 done, 2 bad input (scenario, model run, out folder), 1 failure while adapting.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from fedsim.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, console, error
from fedsim.engine.server import RunFailure
from fedsim.runs import AdaptationJob, OpenRun, adapt, adapt_trained_run, prepare_adaptation
from fedsim.scenario import load_adaptation_file
from fedsim.schema import ScenarioError
from fedsim.tta.experiment import print_table


def _log(console: Any):
    return lambda msg: console.print(msg, highlight=False)


def _phase(console: Console, out: Path, work: Any) -> tuple[int, Any]:
    """Run ``work()`` (an adaptation), turning its errors into one line and an exit code;
    on success print the table and where the results are."""
    try:
        result = work()
    except ScenarioError as exc:
        error(exc)
        return EXIT_BAD_INPUT, None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE, None
    except RunFailure as exc:  # one line, like fedsim run
        print(f"error: {exc}", file=sys.stderr)
        if os.environ.get("FEDSIM_DEBUG") and exc.__cause__ is not None:
            raise exc.__cause__ from exc  # FEDSIM_DEBUG: the traceback of the cause
        return EXIT_FAILURE, None
    summary = getattr(result, "summary", result)
    print_table(console, summary)
    console.print(
        f"adaptation done in {summary['wall_s']:.1f}s; results in {out} ({Path(summary['files']['plot']).name}, adaptation.jsonl, adaptation_summary.json)"
    )
    return EXIT_OK, result


def adapt_after_run(job: OpenRun, console: Console) -> int:
    """The adaptation phase of ``fedsim run``: adapt the run just trained, results in its folder."""
    scenario = job.scenario
    assert scenario.adaptation is not None
    console.print(
        f"[b]adaptation[/b]: {', '.join(s.display for s in scenario.adaptation.adapter_specs())} on each edge's stream"
    )
    code, adapted = _phase(
        console, job.run.path, lambda: adapt_trained_run(job.run, scenario, job.source, log=_log(console))
    )
    if code == EXIT_OK and adapted.device_report is not None:  # the same device estimates as the edge demo
        console.print(f"device-profile estimates: {adapted.device_report}")
    return code


def cmd_adapt(args: argparse.Namespace) -> int:
    out_console = console()
    try:
        if args.scenario and "=" in args.scenario and not Path(args.scenario).exists():
            raise ScenarioError(f"{args.scenario}: scenario file not found (overrides come after the scenario file)")
        name, cfg, tracking = load_adaptation_file(args.scenario, list(args.overrides))
        job: AdaptationJob = prepare_adaptation(
            name, cfg, tracking, args.model, args.out, overwrite=args.overwrite, source=args.scenario
        )
    except ScenarioError as exc:  # UnsafeOutput included
        error(exc)
        return EXIT_BAD_INPUT
    sc, model_run = job.model_run.scenario, job.model_run
    out_console.print(
        f"[b]{name}[/b]: adapt {model_run.path} ({sc.strategy.name}, {sc.model.name} on {sc.data.dataset}, round {model_run.checkpoint.round}) -> {job.out}"
    )
    return _phase(out_console, job.out, lambda: adapt(job, log=_log(out_console)))[0]
