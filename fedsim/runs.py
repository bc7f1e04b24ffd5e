"""Running a scenario into a run folder, and adapting a trained run: the orchestration that
``fedsim run`` / ``fedsim adapt`` (:mod:`fedsim.cli`) and the Python API (:mod:`fedsim.api`)
share, so both make the same folders, the same numbers and the same one-line errors.

Nothing here prints. Bad input raises :class:`~fedsim.schema.ScenarioError` (one line,
nothing created or lost); a failure while running raises
:class:`~fedsim.engine.server.RunFailure` whose message already says what became of the
run folder (resume advice only when a checkpoint exists; a folder this process created with
nothing resumable in it is removed); Ctrl-C raises :class:`RunInterrupted` with the same
advice. The caller shows progress through the ``on_round`` / ``log`` callbacks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsim.arrays import atomic_write_bytes
from fedsim.config import Scenario
from fedsim.edge.profiles import write_device_report
from fedsim.engine.ray_start import RayStart
from fedsim.engine.runtimes import RUNTIMES, run_ray
from fedsim.engine.server import FederatedRun, RunFailure
from fedsim.outputs import MARKER, check_out_folder, create_folder, remove_owned
from fedsim.results import RunFolder, describe, plot_accuracy, summarize
from fedsim.scenario import check_adaptation, new_run, open_model_run, open_run
from fedsim.schema import ScenarioError
from fedsim.superlink.run import run_flower
from fedsim.tracking.config import TrackingConfig
from fedsim.tracking.sinks import Trackers, build_trackers
from fedsim.tta.config import AdaptationConfig
from fedsim.tta.deploy import ModelRun
from fedsim.tta.experiment import SUMMARY as ADAPTATION_SUMMARY
from fedsim.tta.experiment import run_adaptation

__all__ = [
    "AdaptationJob",
    "AdaptedRun",
    "OpenRun",
    "RunInterrupted",
    "Trained",
    "adapt",
    "adapt_trained_run",
    "after_failure",
    "describe",
    "fmt",
    "open_new_run",
    "open_resumed_run",
    "prepare_adaptation",
    "round_line",
    "train",
]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what became of the run folder."""


def fmt(value: float | None, digits: int = 4) -> str:
    """A metric for a progress line or table; '-' when a round produced none."""
    return "-" if value is None else f"{value:.{digits}f}"


def round_line(record: dict[str, Any], total_rounds: int) -> str:
    """One evaluated round as a progress line: mean and per-domain accuracy, bytes up, time."""
    acc = fmt(record.get("accuracy"))  # None when every evaluation reply was dropped
    doms = "  ".join(f"{d}={fmt(a, 3)}" for d, a in (record.get("per_domain") or {}).items())
    fails = f"  failures={len(record['failures'])}" if record.get("failures") else ""
    return f"round {record['round']:>3}/{total_rounds}  acc={acc}  {doms}  up={record['bytes_up'] / 1e6:.2f}MB  {record['wall_s']:.1f}s{fails}"


def resume_advice(run: RunFolder) -> str:
    return (
        f"continue with: fedsim run --resume {run.path}"
        if run.resumable()
        else "no round was checkpointed, so there is nothing to resume"
    )


def after_failure(run: RunFolder, created: bool) -> str:
    """What happened to the run folder after a failed run, as advice that is true: a folder
    this process created is removed when nothing resumable is in it; --resume is advised
    only when a checkpoint exists (and the folder is then kept)."""
    if run.resumable():
        return f"continue with: fedsim run --resume {run.path}"
    if created and run.discard():
        return f"nothing was checkpointed; {run.path} removed"
    return f"nothing was checkpointed; run folder kept: {run.path}"


# -- training ------------------------------------------------------------------------------


@dataclass
class OpenRun:
    """A run folder held for writing (its OS lock taken), its validated scenario and the
    server side of the run. Close it (or use it as a context manager) to release the lock."""

    run: RunFolder
    scenario: Scenario
    experiment: FederatedRun
    resume: bool
    created: bool  # this process created the folder (so it may remove it after a failed start)
    source: str  # the scenario file the run was started from (its run folder's when resumed)

    @property
    def done_rounds(self) -> int:
        return self.experiment.checkpoint.round if self.experiment.checkpoint else 0

    @property
    def warnings(self) -> list[str]:
        return list(self.experiment.warnings)

    def close(self) -> None:
        self.run.unlock()

    def __enter__(self) -> OpenRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(run: RunFolder, scenario: Scenario, resume: bool, created: bool, source: str) -> OpenRun:
    try:  # a resume checks the checkpoints, metrics and scenario here, before writing anything
        experiment = new_run(scenario, run, resume=resume)
    except BaseException:
        run.unlock()
        raise
    return OpenRun(run, scenario, experiment, resume, created, source)


def open_new_run(
    scenario: Scenario, out: str | Path | None = None, *, overwrite: bool = False, source: str = "scenario"
) -> OpenRun:
    """A fresh run folder (``out``, default ``runs/<name>``) for a validated scenario;
    ``overwrite`` replaces an existing fedsim run folder (never anything else)."""
    folder = Path(out) if out is not None else Path("runs") / scenario.name
    check_out_folder(folder)
    # an empty folder the user made is used, but never removed after a failure
    created = not (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()))
    run = RunFolder.create(folder, scenario, overwrite=overwrite)
    return _open(run, scenario, False, created, source)


def open_resumed_run(folder: str | Path) -> OpenRun:
    """A run folder to continue from its newest intact checkpoint, with its own
    ``scenario.yaml`` re-validated; its lock is taken first (one writer per run folder)."""
    run, scenario = open_run(folder, lock=True)
    return _open(run, scenario, True, False, str(run.scenario_file))


def run_rounds(experiment: FederatedRun, prestarted: RayStart | None = None) -> None:
    """The scenario's runtime: ``ray`` with ``engine: flower`` goes through Flower's supported
    simulation path or its fallback (:mod:`fedsim.superlink.run`); the others are engine
    runtimes (the pool on ``prestarted``: Ray started for it already, see :func:`train`)."""
    rt = experiment.scenario.runtime
    if rt.name == "ray" and rt.engine == "flower":
        run_flower(experiment)
    elif rt.name == "ray":
        run_ray(experiment, prestarted)
    else:
        RUNTIMES[rt.name](experiment)


@dataclass
class Trained:
    """What a finished training run left: every metrics record, the summary and its time."""

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    wall_s: float


def train(
    job: OpenRun, on_round: Callable[[dict[str, Any]], None] | None = None, prestarted: RayStart | None = None
) -> Trained:
    """Run the rounds on the scenario's runtime (``on_round`` gets each metrics record),
    feed the trackers, then write ``summary.json`` and ``accuracy.png``. ``prestarted``: Ray
    already starting for the pool engine (``fedsim run`` starts it before its imports); it is
    used if it was started for this scenario's runtime; its shutdown begins at the end of the
    rounds, and its starter waits for it (:meth:`fedsim.engine.ray_start.RayStart.close`)."""
    run, scenario = job.run, job.scenario
    t0 = time.perf_counter()
    try:  # a resume continues at round done + 1: the trackers drop what they hold from there on
        trackers = build_trackers(scenario, run.path, first_step=job.done_rounds + 1 if job.resume else None)
        if not job.resume:
            trackers.log_hparams(scenario)
    except Exception as exc:  # noqa: BLE001 - one line, e.g. an unreachable MLflow server
        raise RunFailure(f"tracking: {type(exc).__name__}: {exc} ({after_failure(run, job.created)})") from exc

    def on_round_tracked(record: dict[str, Any]) -> None:
        if on_round is not None:
            on_round(record)
        trackers.log_round(record)

    job.experiment.on_round = on_round_tracked
    try:
        run_rounds(job.experiment, prestarted)
    except RunFailure:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted; {after_failure(run, job.created)}") from None
    except Exception as exc:  # one line; keep what can be resumed (the cause stays chained)
        raise RunFailure(f"run failed: {type(exc).__name__}: {exc} ({after_failure(run, job.created)})") from exc
    finally:
        trackers.close()
    records = run.read_metrics()
    try:
        summary = summarize(records, scenario, time.perf_counter() - t0)
        run.write_summary(summary)
        plot_accuracy(records, run.plot_file, describe(scenario))
    except OSError as exc:  # e.g. a full disk: the rounds and checkpoints already on disk stay
        raise RunFailure(
            f"writing the summary of {run.path} failed: {exc} ({len(records)} evaluated rounds kept in {run.metrics_file}; {resume_advice(run)})"
        ) from exc
    return Trained(records, summary, time.perf_counter() - t0)


# -- adaptation ----------------------------------------------------------------------------


def _adapt(
    model_run: ModelRun,
    cfg: AdaptationConfig,
    out: Path,
    name: str,
    source: str,
    log: Callable[[str], None] | None,
    tracked: Scenario | None = None,
    log_hparams: bool = False,
) -> dict[str, Any]:
    """Adapt and return the summary; ``tracked``: the scenario whose ``tracking`` section
    gets the per-batch series (its trackers write into ``out``; ``log_hparams``: a new
    tracked run, so the scenario is logged too). A stream or adapter that fails on the
    data raises ScenarioError; anything else RunFailure (Ctrl-C goes through)."""
    trackers = Trackers()
    try:
        if tracked is not None:
            trackers = build_trackers(tracked, out, phase="adaptation")
            if log_hparams:
                trackers.log_hparams(tracked)
        return run_adaptation(
            model_run, cfg, out, name=name, source=source, log=log, on_batch=trackers.log_batch if trackers else None
        )
    except (ScenarioError, KeyboardInterrupt):
        raise
    except Exception as exc:  # one line, like a run (the cause stays chained)
        raise RunFailure(f"adaptation failed: {type(exc).__name__}: {exc}") from exc
    finally:
        trackers.close()


@dataclass
class AdaptedRun:
    """The adaptation phase of a run: its summary and, with an edge section, the device
    estimates' file."""

    summary: dict[str, Any]
    device_report: Path | None = None


def adapt_trained_run(
    run: RunFolder, scenario: Scenario, source: str, log: Callable[[str], None] | None = None
) -> AdaptedRun:
    """The adaptation phase of a run: adapt the run just trained (its scenario, validated
    when the run started, adaptation section included), results in its folder."""
    assert scenario.adaptation is not None
    model_run = open_model_run(run.path)
    summary = _adapt(model_run, scenario.adaptation, run.path, scenario.name, source, log, tracked=scenario)
    report = None
    if scenario.edge is not None:  # the same device estimates as the edge demo
        saved = json.loads((Path(run.path) / ADAPTATION_SUMMARY).read_text())
        report = write_device_report(run.path, scenario, run.read_metrics(), saved)
    return AdaptedRun(summary, report)


@dataclass
class AdaptationJob:
    """An adaptation of a trained run, checked and its output folder made (``adaptation.yaml``
    written): what :func:`adapt` runs."""

    name: str
    cfg: AdaptationConfig
    tracking: TrackingConfig
    model_run: ModelRun
    out: Path
    source: str
    created: bool = field(default=False)


def prepare_adaptation(
    name: str,
    cfg: AdaptationConfig,
    tracking: TrackingConfig,
    model: str | Path,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    source: str = "scenario",
) -> AdaptationJob:
    """Check an adaptation section against the trained run ``model`` and make its output
    folder (default ``<model>/adapt-<name>``); ScenarioError (one line) before anything is
    created when either does not fit."""
    model_run = open_model_run(model)
    check_adaptation(model_run.scenario, cfg, source)
    folder = Path(out) if out is not None else model_run.path / f"adapt-{name}"
    check_out_folder(folder)
    # an empty folder the user made is used, but never removed after a failure
    created = not (folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()))
    create_folder(
        folder,
        "adaptation",
        overwrite,
        f"{folder}: output folder exists; pass --overwrite to replace it or --out to choose another",
    )
    resolved = {"name": name, "model_run": str(model_run.path), "adaptation": cfg.model_dump(mode="json")}
    atomic_write_bytes(folder / "adaptation.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    return AdaptationJob(name, cfg, tracking, model_run, folder, source, created)


def adapt(job: AdaptationJob, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a prepared adaptation; returns its summary. A failed one that produced nothing
    leaves no half folder (when this process created it)."""
    # the trackers get the trained run's scenario with this file's name, adaptation and tracking
    tracked = job.model_run.scenario.model_copy(
        update={"name": job.name, "adaptation": job.cfg, "tracking": job.tracking}
    )
    try:
        return _adapt(
            job.model_run,
            job.cfg,
            job.out,
            job.name,
            job.source,
            log,
            tracked=tracked if job.tracking.enabled else None,
            log_hparams=True,
        )
    except BaseException:
        if job.created and not any(p.name not in ("adaptation.yaml", MARKER) for p in job.out.iterdir()):
            remove_owned(job.out, "adaptation")
        raise
