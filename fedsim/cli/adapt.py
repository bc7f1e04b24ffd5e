"""``fedsim adapt SCENARIO --model RUN`` and the adaptation phase of ``fedsim run``.

Exit codes as in :mod:`fedsim.cli.common`: 0 done, 2 bad input (scenario, model run, out
folder), 1 failure while adapting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console

from fedsim.arrays import atomic_write_bytes
from fedsim.cli.common import EXIT_BAD_INPUT, EXIT_FAILURE, EXIT_OK, console, error
from fedsim.config import Scenario
from fedsim.edge.profiles import write_device_report
from fedsim.outputs import MARKER, check_out_folder, create_folder, remove_owned
from fedsim.results import RunFolder
from fedsim.scenario import apply_overrides, check_adaptation, check_cuda, open_model_run, read_yaml
from fedsim.schema import ScenarioError, validation_error_line
from fedsim.tracking.config import TrackingConfig
from fedsim.tracking.sinks import Trackers, build_trackers, check_tracking
from fedsim.tta.config import AdaptationConfig
from fedsim.tta.deploy import ModelRun
from fedsim.tta.experiment import SUMMARY, print_table, run_adaptation


def load_adaptation_file(path: str | Path, overrides: list[str] | None = None) -> tuple[str, AdaptationConfig, TrackingConfig]:
    """Read an adapt scenario and validate it against the schema; return (name, adaptation,
    tracking).

    Only ``name``, ``adaptation`` and ``tracking`` are used by ``fedsim adapt`` (data, model and strategy
    come from the model run, which :func:`check_adaptation` checks it against), so the
    registry/data checks of the other sections are skipped; every key is still validated.
    """
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides or [])
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(validation_error_line(str(path), exc, Scenario)) from None
    if scenario.adaptation is None:
        raise ScenarioError(f"{path}: adaptation: required key is missing (fedsim adapt needs an adaptation section)")
    check_cuda(scenario.adaptation.device, "adaptation.device", str(path))  # before the model run is opened
    check_tracking(scenario.tracking, str(path))
    return scenario.name, scenario.adaptation, scenario.tracking


def _log(console: Any):
    return lambda msg: console.print(msg, highlight=False)


def _run_phase(model_run: ModelRun, cfg: AdaptationConfig, out: Path, name: str, source: str, console: Console, tracked: Scenario | None = None, log_hparams: bool = False) -> int:
    """Adapt and report; ``tracked``: the scenario whose ``tracking`` section gets the
    per-batch series (its trackers write into ``out``; ``log_hparams``: a new tracked run,
    so the scenario is logged too)."""
    trackers = Trackers()
    try:
        if tracked is not None:
            trackers = build_trackers(tracked, out, phase="adaptation")
            if log_hparams:
                trackers.log_hparams(tracked)
        summary = run_adaptation(model_run, cfg, out, name=name, source=source, log=_log(console), on_batch=trackers.log_batch if trackers else None)
    except ScenarioError as exc:
        error(exc)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - one line, like fedsim run
        print(f"error: adaptation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        if os.environ.get("FEDSIM_DEBUG"):
            raise
        return EXIT_FAILURE
    finally:
        trackers.close()
    print_table(console, summary)
    console.print(f"adaptation done in {summary['wall_s']:.1f}s; results in {out} ({Path(summary['files']['plot']).name}, adaptation.jsonl, adaptation_summary.json)")
    return EXIT_OK


def adapt_after_run(run: RunFolder, scenario: Scenario, source: str, console: Console) -> int:
    """The adaptation phase of ``fedsim run``: adapt the run just trained (its scenario,
    validated when the run started, adaptation section included), results in its folder."""
    try:
        model_run = open_model_run(run.path)
    except ScenarioError as exc:
        error(exc)
        return EXIT_BAD_INPUT
    console.print(f"[b]adaptation[/b]: {', '.join(s.display for s in scenario.adaptation.adapter_specs())} on each edge's stream")
    code = _run_phase(model_run, scenario.adaptation, run.path, scenario.name, source, console, tracked=scenario)
    if code == EXIT_OK and scenario.edge is not None:  # the same device estimates as the edge demo
        summary = json.loads((Path(run.path) / SUMMARY).read_text())
        console.print(f"device-profile estimates: {write_device_report(run.path, scenario, run.read_metrics(), summary)}")
    return code


def cmd_adapt(args: argparse.Namespace) -> int:
    out_console = console()
    try:
        if args.scenario and "=" in args.scenario and not Path(args.scenario).exists():
            raise ScenarioError(f"{args.scenario}: scenario file not found (overrides come after the scenario file)")
        name, cfg, tracking = load_adaptation_file(args.scenario, list(args.overrides))
        model_run = open_model_run(args.model)
        check_adaptation(model_run.scenario, cfg, args.scenario)
        out = Path(args.out) if args.out else model_run.path / f"adapt-{name}"
        check_out_folder(out)
        # an empty folder the user made is used, but never removed after a failure
        created = not (out.is_dir() and not out.is_symlink() and not any(out.iterdir()))
        create_folder(out, "adaptation", args.overwrite, f"{out}: output folder exists; pass --overwrite to replace it or --out to choose another")
    except ScenarioError as exc:  # UnsafeOutput included
        error(exc)
        return EXIT_BAD_INPUT
    resolved = {"name": name, "model_run": str(model_run.path), "adaptation": cfg.model_dump(mode="json")}
    atomic_write_bytes(out / "adaptation.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    sc = model_run.scenario
    out_console.print(f"[b]{name}[/b]: adapt {model_run.path} ({sc.strategy.name}, {sc.model.name} on {sc.data.dataset}, round {model_run.checkpoint.round}) -> {out}")
    # the trackers get the trained run's scenario with this file's name, adaptation and tracking
    tracked = model_run.scenario.model_copy(update={"name": name, "adaptation": cfg, "tracking": tracking})
    code = _run_phase(model_run, cfg, out, name, args.scenario, out_console, tracked=tracked if tracking.enabled else None, log_hparams=True)
    if code != EXIT_OK and created and not any(p.name not in ("adaptation.yaml", MARKER) for p in out.iterdir()):
        remove_owned(out, "adaptation")  # nothing was produced: leave no half folder
    return code
