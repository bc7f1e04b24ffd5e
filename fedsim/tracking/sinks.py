"""Experiment trackers: per evaluated round and per adaptation batch, the metrics fedsim
writes to ``metrics.jsonl`` / ``adaptation.jsonl`` also go to TensorBoard, MLflow or W&B.

Steps are round numbers (training) and batch indices (adaptation). A resumed run continues
from its checkpoint round ``c`` and logs rounds ``c+1...`` again; no sink keeps two values
of one step:

- TensorBoard: the writer opens with ``purge_step=c+1``; its reader then drops the events
  of steps >= c+1 written before the resume. The adaptation phase writes a separate run
  (``tensorboard/adaptation``) that is purged from step 0 whenever the phase runs again.
- MLflow: the run id is kept in ``tracking.json`` and the same MLflow run is continued; a
  step already logged for a key is not logged again (the recomputed round is the same run,
  seed and scenario, so it holds the same numbers on CPU).
- W&B: the run id and the last round logged are kept in ``tracking.json``; a resume reuses
  the id and skips the rounds already logged. Offline, each session (start, resume) is its
  own folder under ``wandb/`` that ``wandb sync`` uploads into the one run. W&B cannot drop
  what it holds, so an adaptation phase that runs again (after a resume) logs its batches
  a second time there.

The backends are optional extras; they are imported inside the sink constructors only.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from fedsim.arrays import atomic_write_bytes
from fedsim.config import Scenario
from fedsim.schema import ScenarioError, short_source
from fedsim.tracking.config import TrackingConfig

STATE_FILE = "tracking.json"
"""Ids of the MLflow / W&B runs a run folder logs to (so a resume continues them)."""

TENSORBOARD_DIR = "tensorboard"
ADAPTATION = "adaptation"

# backend -> (module that must import, extra that installs it)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


def check_tracking(tracking: TrackingConfig, source: str) -> None:
    """A requested backend whose package is missing: one line naming the extra (checked
    with the scenario, before any folder is made)."""
    for name in tracking.enabled:
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise ScenarioError(
                f"{short_source(source)}: tracking.{name}: the {module} package is not installed (pip install 'fedsim[{extra}]')"
            )


# -- what is logged -----------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def round_scalars(record: dict[str, Any], per_client: bool = False) -> dict[str, float]:
    """The scalars of one ``metrics.jsonl`` record, by tag. Absent or non-finite values
    (a round whose every evaluation reply was dropped) are left out."""
    out: dict[str, Any] = {
        "eval/accuracy": record.get("accuracy"),
        "eval/loss": record.get("loss"),
        "eval/client_accuracy_mean": record.get("client_accuracy_mean"),
        "train/loss": record.get("train_loss"),
        "bytes/up": record.get("bytes_up"),
        "bytes/down": record.get("bytes_down"),
        "bytes/up_wire": record.get("bytes_up_wire"),
        "bytes/down_wire": record.get("bytes_down_wire"),
        "bytes/up_total": record.get("bytes_up_total"),
        "bytes/down_total": record.get("bytes_down_total"),
        "time/wall_s": record.get("wall_s"),
        "failures": len(record.get("failures") or []),
    }
    out.update({f"eval/domain/{d}": a for d, a in (record.get("per_domain") or {}).items()})
    out.update({f"strategy/{k}": v for k, v in (record.get("strategy_metrics") or {}).items()})
    if per_client:
        out.update({f"eval/client/{c}": a for c, a in (record.get("per_client") or {}).items()})
    return {k: n for k, v in out.items() if (n := _number(v)) is not None}


def batch_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``adaptation.jsonl`` row, by tag
    ``adaptation/<adapter>/edge<e>/seed<s>/<metric>``; the step is ``row["batch"]``."""
    prefix = f"adaptation/{row['adapter']}/edge{row['edge']}/seed{row['seed']}"
    out: dict[str, Any] = {
        f"{prefix}/accuracy": row.get("accuracy"),
        f"{prefix}/cumulative_accuracy": row.get("cumulative_accuracy"),
    }
    out.update({f"{prefix}/{k}": v for k, v in (row.get("metrics") or {}).items()})
    return {k: n for k, v in out.items() if (n := _number(v)) is not None}


def hparams(scenario: Scenario) -> dict[str, bool | int | float | str]:
    """The scenario as flat ``section.key`` -> scalar (lists and nulls as JSON text)."""
    out: dict[str, bool | int | float | str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value)

    walk("", json.loads(scenario.model_dump_json()))
    return out


# -- sinks --------------------------------------------------------------------------------


class Tracker(Protocol):
    """One backend. ``phase`` is ``training`` (steps: rounds) or ``adaptation`` (steps: batches)."""

    def log_hparams(self, scenario: Scenario) -> None: ...

    def log_round(self, record: dict[str, Any]) -> None: ...

    def log_batch(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Event files in ``<folder>/tensorboard`` (training) or ``<folder>/tensorboard/adaptation``."""

    def __init__(self, folder: Path, phase: str, first_step: int | None, per_client: bool) -> None:
        # optional dependency (fedsim[tensorboard]); torch's writer needs the tensorboard package
        from torch.utils.tensorboard import SummaryWriter

        log_dir = folder / TENSORBOARD_DIR / (ADAPTATION if phase == ADAPTATION else "")
        if phase == ADAPTATION and log_dir.is_dir() and any(log_dir.glob("events.out.tfevents.*")):
            first_step = 0  # the phase runs again from batch 0: hide every earlier batch
        # purge_step writes a SessionLog START at that step: TensorBoard's reader then drops
        # the events of steps >= it that earlier files hold (a resumed run logs them again)
        self.writer = SummaryWriter(str(log_dir), purge_step=first_step, flush_secs=30)
        self.per_client = per_client

    def log_hparams(self, scenario: Scenario) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries  # optional dependency

        # in the same event file as the scalars (SummaryWriter.add_hparams would make a
        # sub-run); the metrics named here are the scalars the HPARAMS tab shows per run
        metrics = {"eval/accuracy": 0.0, "eval/loss": 0.0, "bytes/up_total": 0.0}
        for summary in hparams_summaries(hparams(scenario), metrics):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("scenario", "```yaml\n" + scenario.to_yaml() + "```", 0)
        self.writer.flush()

    def log_round(self, record: dict[str, Any]) -> None:
        for tag, value in round_scalars(record, self.per_client).items():
            self.writer.add_scalar(tag, value, record["round"])
        self.writer.flush()  # a round is seconds to minutes: show it at once

    def log_batch(self, row: dict[str, Any]) -> None:
        for tag, value in batch_scalars(row).items():
            self.writer.add_scalar(tag, value, row["batch"])

    def close(self) -> None:
        self.writer.close()


def _read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(folder: Path, key: str, value: str) -> None:
    state = _read_state(folder)
    state[key] = value
    atomic_write_bytes(folder / STATE_FILE, json.dumps(state, indent=2).encode())


class _StepFilter:
    """Per key, the steps already logged to a continued run: none is logged twice."""

    def __init__(self) -> None:
        self.logged: dict[str, set[int]] = {}

    def fresh(self, values: dict[str, float], step: int) -> dict[str, float]:
        out = {k: v for k, v in values.items() if step not in self.logged.get(k, ())}
        for k in out:
            self.logged.setdefault(k, set()).add(step)
        return out


_MLFLOW_KEY = re.compile(r"[^\w\-. /]")  # MLflow accepts letters, digits, _ - . space /


class MLflowSink:
    """One MLflow run per run folder: params = the scenario, metrics per round and per batch."""

    def __init__(self, folder: Path, scenario: Scenario, phase: str) -> None:
        options = scenario.tracking.mlflow
        assert options is not None
        uri = options.tracking_uri or (folder.resolve() / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless asked for it (it still reads and writes
            # it; `mlflow migrate-filestore` moves it into a database)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # optional dependency (fedsim[mlflow])
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.filter = _StepFilter()
        self.per_client = scenario.tracking.per_client
        state = _read_state(folder)
        self.run_id: str = state.get("mlflow_run_id", "")
        self.new = not self.run_id
        if self.new:
            name = options.experiment or scenario.name
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=scenario.name).info.run_id
            _write_state(folder, "mlflow_run_id", self.run_id)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:
                self.filter.logged[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        self.phase = phase

    def log_hparams(self, scenario: Scenario) -> None:
        from mlflow.entities import Param  # optional dependency

        if not self.new:
            return  # logged when the run started (MLflow refuses a param logged twice)
        params = [Param(k[:250], str(v)[:6000]) for k, v in hparams(scenario).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(self.run_id, scenario.to_yaml(), "scenario.yaml")

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # optional dependency

        now = int(time.time() * 1000)
        fresh = self.filter.fresh({_MLFLOW_KEY.sub("_", k): v for k, v in values.items()}, step)
        metrics = [Metric(k, v, now, step) for k, v in fresh.items()]
        for i in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_round(self, record: dict[str, Any]) -> None:
        self._log(round_scalars(record, self.per_client), record["round"])

    def log_batch(self, row: dict[str, Any]) -> None:
        self._log(batch_scalars(row), row["batch"])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    """A W&B run in ``<folder>/wandb`` (offline by default); its id kept for a resume."""

    def __init__(self, folder: Path, scenario: Scenario, phase: str) -> None:
        options = scenario.tracking.wandb
        assert options is not None
        import wandb  # optional dependency (fedsim[wandb])

        state = _read_state(folder)
        run_id = state.get("wandb_run_id") or secrets.token_hex(6)  # W&B ids: lower-case letters and digits
        self.new = "wandb_run_id" not in state
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
        self.run = wandb.init(
            project=options.project,
            entity=options.entity,
            mode=options.mode,
            dir=str(folder),
            id=run_id,
            name=scenario.name,
            resume=None if self.new else "allow",
            settings=settings,
            reinit="create_new",
        )
        if self.new:
            _write_state(folder, "wandb_run_id", run_id)
        self.per_client = scenario.tracking.per_client
        self.filter = _StepFilter()
        self.folder = folder
        self.phase = phase
        if phase != ADAPTATION:  # W&B keeps what was logged: rounds logged before a kill stay
            last = int(state.get("wandb_last_round", 0))
            self.skip_through = last
        else:
            self.skip_through = -1
        # W&B has one step axis per run: batches of the adaptation phase get their own
        self.step_key = "round" if phase != ADAPTATION else "adaptation_batch"
        self.logged_steps: set[int] = set()
        self.run.define_metric(self.step_key)
        self.run.define_metric("*", step_metric=self.step_key)

    def log_hparams(self, scenario: Scenario) -> None:
        if self.new:
            self.run.config.update(hparams(scenario), allow_val_change=True)

    def _log(self, values: dict[str, float], step: int) -> None:
        fresh = self.filter.fresh(values, step)
        if fresh:
            self.run.log({**fresh, self.step_key: step})

    def log_round(self, record: dict[str, Any]) -> None:
        if record["round"] <= self.skip_through:
            return  # logged before this run was killed and resumed
        self._log(round_scalars(record, self.per_client), record["round"])
        _write_state(self.folder, "wandb_last_round", record["round"])

    def log_batch(self, row: dict[str, Any]) -> None:
        self._log(batch_scalars(row), row["batch"])

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every sink a scenario asks for, called together (nothing when tracking is off)."""

    def __init__(self, sinks: Iterable[Tracker] = ()) -> None:
        self.sinks = list(sinks)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def log_hparams(self, scenario: Scenario) -> None:
        for sink in self.sinks:
            sink.log_hparams(scenario)

    def log_round(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_round(record)

    def log_batch(self, row: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log_batch(row)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def build_trackers(
    scenario: Scenario, folder: str | Path, *, phase: str = "training", first_step: int | None = None
) -> Trackers:
    """The sinks of ``scenario.tracking`` writing into ``folder``. ``first_step``: the round a
    resumed run continues with (TensorBoard purges the steps from it on); None for a fresh
    run. ``phase="adaptation"``: the per-batch series of the adaptation phase."""
    folder = Path(folder)
    cfg = scenario.tracking
    sinks: list[Tracker] = []
    try:
        if cfg.tensorboard:
            sinks.append(TensorBoardSink(folder, phase, first_step, cfg.per_client))
        if cfg.mlflow is not None:
            sinks.append(MLflowSink(folder, scenario, phase))
        if cfg.wandb is not None:
            sinks.append(WandbSink(folder, scenario, phase))
    except BaseException:
        Trackers(sinks).close()
        raise
    return Trackers(sinks)


__all__ = [
    "STATE_FILE",
    "TENSORBOARD_DIR",
    "Tracker",
    "Trackers",
    "batch_scalars",
    "build_trackers",
    "check_tracking",
    "hparams",
    "round_scalars",
]
