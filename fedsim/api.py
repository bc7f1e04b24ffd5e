"""The Python API: drive fedsim from a notebook or a script.

>>> import fedsim
>>> result = fedsim.run("scenarios/multidomain.yaml", ["data.dataset=toy", "rounds=2"], out="runs/try")
>>> result.final_accuracy, result.records[-1]["per_domain"]

:func:`run`, :func:`adapt` and :func:`sweep` do what ``fedsim run``, ``fedsim adapt`` and
``fedsim sweep`` do, through the same code (:mod:`fedsim.runs`, :mod:`fedsim.sweep`): the
same run folders, numbers and checks. They return small result objects instead of printing,
and raise instead of exiting:

- :class:`~fedsim.schema.ScenarioError`: bad input (one line ``file: dotted.key: message``,
  as the command prints it; nothing created, lost or overwritten);
- :class:`~fedsim.engine.server.RunFailure`: a failure while running (the message says what
  became of the run folder and, when a checkpoint exists, how to resume);
- :class:`KeyboardInterrupt` (:class:`~fedsim.runs.RunInterrupted` for a run) on Ctrl-C.

``verbose=False`` (the default) prints nothing and keeps Flower's and Ray's INFO logs out of
the notebook for the duration of the call; ``verbose=True`` prints the progress lines of the
command line. A scenario is a YAML file, a mapping (as the file would hold it) or a
:class:`~fedsim.config.Scenario`; overrides are ``key.sub=value`` texts (parsed as YAML
scalars, as on the command line) or a mapping ``{"key.sub": value}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import Scenario
from fedsim.data.loading import num_clients
from fedsim.engine.server import RunFailure
from fedsim.outputs import check_out_folder
from fedsim.runs import adapt as adapt_job
from fedsim.runs import (
    adapt_trained_run,
    open_new_run,
    open_resumed_run,
    prepare_adaptation,
    round_line,
    train,
)
from fedsim.scenario import adaptation_from_raw, build_scenario
from fedsim.scenario_file import apply_overrides, read_yaml
from fedsim.schema import ScenarioError
from fedsim.sweep import SweepSpec, parse_seeds, parse_sweep_args, run_sweep, spec_from_saved
from fedsim.tta.experiment import JSONL as ADAPTATION_JSONL

__all__ = ["AdaptResult", "RunResult", "SweepResult", "adapt", "run", "sweep"]

ScenarioLike = str | Path | Scenario | dict[str, Any]
Overrides = list[str] | tuple[str, ...] | dict[str, Any] | None

# Loggers whose INFO lines would flood a notebook (Flower's per-round lines, Ray's start-up).
LIBRARY_LOGGERS = ("flwr", "ray")


def _records_frame(records: list[dict[str, Any]]) -> Any:
    # pandas is optional (not a dependency of fedsim): imported only when asked for
    try:
        import pandas as pd
    except ImportError:
        raise ImportError(
            "to_pandas needs pandas (pip install pandas); the records are plain dicts without it"
        ) from None

    return pd.json_normalize(records)  # nested dicts become columns: per_domain.<domain>, ...


@dataclass
class RunResult:
    """A finished run: its folder, every evaluated round's metrics record (as in
    ``metrics.jsonl``), ``summary.json`` and, when the scenario adapts, the adaptation
    summary (as in ``adaptation_summary.json``)."""

    path: Path
    scenario: Scenario
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    adaptation: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float | None:
        """Mean test accuracy over domains at the last evaluated round."""
        return self.summary.get("final_accuracy")

    @property
    def best_accuracy(self) -> float | None:
        """The best mean test accuracy over the evaluated rounds."""
        return self.summary.get("best_accuracy")

    def to_pandas(self) -> Any:
        """The records as a pandas DataFrame, one row per round (needs pandas installed)."""
        return _records_frame(self.records)


@dataclass
class AdaptResult:
    """A finished adaptation: its folder, summary (``adaptation_summary.json``) and one
    record per batch (``adaptation.jsonl``)."""

    path: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def online_error(self) -> dict[str, float]:
        """Each adapter's mean online error (over edges and seeds), by adapter label."""
        return {label: entry["error"] for label, entry in self.summary["results"].items()}

    def to_pandas(self) -> Any:
        """The per-batch records as a pandas DataFrame (needs pandas installed)."""
        return _records_frame(self.records)


@dataclass
class SweepResult:
    """A finished sweep: its folder, the aggregated points (as in ``sweep.json``) and, for
    each run that failed, its folder and the error."""

    path: Path
    points: list[dict[str, Any]]
    failures: dict[str, str] = field(default_factory=dict)


# -- quiet by default ----------------------------------------------------------------------


@contextlib.contextmanager
def _library_logs(verbose: bool) -> Iterator[None]:
    """Without ``verbose``, Flower's and Ray's loggers (and their handlers) show warnings
    and errors only; their levels are restored afterwards."""
    if verbose:
        yield
        return
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, [(h, h.level) for h in logger.handlers]))
        logger.setLevel(logging.WARNING)
        for handler in logger.handlers:
            handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for logger, level, handlers in saved:
            logger.setLevel(level)
            for handler, handler_level in handlers:
                handler.setLevel(handler_level)


def _say(verbose: bool) -> Callable[[str], None] | None:
    return print if verbose else None


# -- input ---------------------------------------------------------------------------------


def _overrides(overrides: Overrides) -> list[str] | dict[str, Any]:
    if overrides is None:
        return []
    if isinstance(overrides, str):  # one text would otherwise be split into characters
        raise ScenarioError(
            f"overrides: expected a list of key.sub=value texts or a mapping, got the text {overrides!r}"
        )
    return dict(overrides) if isinstance(overrides, dict) else list(overrides)


def _raw(scenario: ScenarioLike) -> tuple[dict[str, Any], str]:
    """A scenario as the mapping its file would hold, and the source its errors name."""
    if isinstance(scenario, Scenario):
        return yaml.safe_load(scenario.to_yaml()), "<Scenario>"
    if isinstance(scenario, dict):
        return scenario, "<dict>"
    if isinstance(scenario, (str, Path)):
        return read_yaml(Path(scenario)), str(scenario)
    raise ScenarioError(
        f"scenario: expected a YAML file path, a mapping or a fedsim Scenario, got {type(scenario).__name__}"
    )


def load(scenario: ScenarioLike, overrides: Overrides = None) -> Scenario:
    """Read, override and validate a scenario as ``fedsim run`` does (every check that
    needs the dataset, model, strategy or adapters included); ScenarioError, one line."""
    raw, source = _raw(scenario)
    return build_scenario(apply_overrides(raw, _overrides(overrides)), source)


def _raw_source(scenario: ScenarioLike) -> str:
    return (
        str(scenario)
        if isinstance(scenario, (str, Path))
        else "<Scenario>"
        if isinstance(scenario, Scenario)
        else "<dict>"
    )


# -- the three commands --------------------------------------------------------------------


def run(
    scenario: ScenarioLike,
    overrides: Overrides = None,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> RunResult:
    """Train a scenario into a run folder (``out``, default ``runs/<name>``), then adapt
    when it has an adaptation section; as ``fedsim run``.

    ``resume=True``: ``scenario`` is a run folder to continue from its last checkpoint
    (with its own ``scenario.yaml``; no overrides, no ``out``). ``overwrite``: replace an
    existing fedsim run folder (never a folder holding anything else)."""
    say = _say(verbose)
    if resume:
        if overrides or out is not None or not isinstance(scenario, (str, Path)):
            raise ScenarioError("resume takes only the run folder; its scenario.yaml is used as saved")
        job = open_resumed_run(scenario)
    else:
        if out is not None:  # before the (slower) scenario checks: fail fast
            check_out_folder(out)
        sc = load(scenario, overrides)
        job = open_new_run(sc, out, overwrite=overwrite, source=_raw_source(scenario))
    with job:
        for text in job.warnings:
            warnings.warn(text, RuntimeWarning, stacklevel=2)
        sc, folder = job.scenario, job.run.path
        if say:
            say(
                f"{sc.name}: {sc.strategy.name} on {sc.data.dataset}, {num_clients(sc.data)} clients, {sc.rounds} rounds, seed {sc.seed}, runtime {sc.runtime.name} -> {folder}"
            )
        on_round = (lambda record: say(round_line(record, sc.rounds))) if say else None
        with _library_logs(verbose):
            trained = train(job, on_round)
            if say:
                say(
                    f"done in {trained.wall_s:.1f}s; final accuracy {trained.summary['final_accuracy']}; results in {folder}"
                )
            adapted = adapt_trained_run(job.run, sc, job.source, log=say) if sc.adaptation is not None else None
        if say and adapted is not None:
            say(f"adaptation done in {adapted.summary['wall_s']:.1f}s; results in {folder}")
        return RunResult(
            Path(folder), sc, trained.records, trained.summary, adapted.summary if adapted else None, job.warnings
        )


def adapt(
    scenario: ScenarioLike,
    model: str | Path,
    overrides: Overrides = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    verbose: bool = False,
) -> AdaptResult:
    """Test-time adaptation of a trained run's model (``model``: its run folder) on the
    streams of ``scenario``'s adaptation section (only its ``name``, ``adaptation`` and
    ``tracking`` are used); results in ``out`` (default ``<model>/adapt-<name>``); as
    ``fedsim adapt``."""
    raw, source = _raw(scenario)
    name, cfg, tracking = adaptation_from_raw(apply_overrides(raw, _overrides(overrides)), source)
    job = prepare_adaptation(name, cfg, tracking, model, out, overwrite=overwrite, source=source)
    with _library_logs(verbose):
        summary = adapt_job(job, log=_say(verbose))
    jsonl = job.out / ADAPTATION_JSONL
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.is_file() else []
    return AdaptResult(job.out, summary, records)


def _runner(verbose: bool, failures: dict[str, str]) -> Callable[[list[str]], int]:
    """What :func:`fedsim.sweep.run_sweep` runs each point with: the ``fedsim run`` command
    line it builds (``run SCENARIO OVERRIDES... --out FOLDER [--overwrite]`` or
    ``run --resume FOLDER``), run by :func:`run` (the command's exit code; the error kept)."""

    def runner(argv: list[str]) -> int:
        args = list(argv[1:])
        if argv[:1] != ["run"] or not args:
            raise ValueError(f"not a fedsim run command line: {argv}")
        overwrite = args[-1] == "--overwrite"
        if overwrite:
            args.pop()
        try:
            if args[0] == "--resume":
                folder = args[1]
                run(folder, resume=True, verbose=verbose)
            else:
                if len(args) < 3 or args[-2] != "--out":
                    raise ValueError(f"not a fedsim run command line: {argv}")
                folder = args[-1]
                run(args[0], args[1:-2], folder, overwrite=overwrite, verbose=verbose)
        except ScenarioError as exc:
            failures[folder] = str(exc)
            return 2
        except RunFailure as exc:
            failures[folder] = str(exc)
            return 1
        failures.pop(folder, None)
        return 0

    return runner


def sweep(
    scenario: str | Path | None = None,
    grid: list[str] | tuple[str, ...] = (),
    seeds: str | list[int] | tuple[int, ...] | None = None,
    out: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    overwrite: bool = False,
    verbose: bool = False,
) -> SweepResult:
    """Run a scenario file over a grid of overrides and seeds; as ``fedsim sweep``.

    ``grid``: ``key=v1,v2,...`` (an axis) or ``key=value`` (a fixed override) texts;
    ``seeds``: ``[0, 1, 2]`` or ``"0-4"``; ``resume``: a sweep folder to continue (alone).
    Each point runs as :func:`run` does; a failed run is recorded in ``failures`` and the
    sweep goes on (a run that failed has status ``failed`` in ``points``)."""
    if resume is not None:
        if scenario is not None or grid or seeds is not None or out is not None:
            raise ScenarioError("resume takes only the sweep folder; its sweep.json says what to run")
        spec: SweepSpec = spec_from_saved(Path(resume))
        folder: Path | None = Path(resume)
    else:
        if scenario is None:
            raise ScenarioError("sweep: give a scenario file (and a grid), or resume=SWEEP_FOLDER")
        if isinstance(grid, str):
            raise ScenarioError(f"grid: expected a list of key=v1,v2,... texts, got the text {grid!r}")
        parsed = (
            parse_seeds(seeds)
            if isinstance(seeds, str)
            else parse_seeds(",".join(map(str, seeds)))
            if seeds is not None
            else None
        )
        spec = parse_sweep_args(scenario, list(grid), parsed)
        folder = Path(out) if out is not None else None
    failures: dict[str, str] = {}
    log = (lambda msg: print(f"sweep {msg}")) if verbose else None
    path, points = run_sweep(spec, runner=_runner(verbose, failures), out=folder, overwrite=overwrite, log=log)
    return SweepResult(path, points, failures)
