"""fedsim's ServerApp and ClientApp as Flower's deployment runtime loads them.

``pyproject.toml`` declares them (``[tool.flwr.app.components]``), so ``flwr run`` ships
them to a SuperLink; ``fedsim edge demo`` does exactly that against SuperNodes it starts.

- The ServerApp (the cloud) reads the run config (``scenario``: the scenario file,
  ``run-dir``: the run folder), trains with the scenario's strategy through the same
  :class:`~fedsim.engine.server.FederatedRun` as a simulation, then plays the adaptation
  phase on the edges (:class:`~fedsim.edge.protocol.EdgePlayer`) and writes the same run
  folder as ``fedsim run``, plus ``edge/progress.jsonl`` (live view) and
  ``edge/devices.json`` (device-profile estimates).
- The ClientApp (an edge) learns the scenario from the discovery query and keeps it in the
  SuperNode's ``Context.state``; it runs the simulation's ClientRuntime for training and
  evaluation, and :mod:`fedsim.edge.protocol` for adaptation. Its node config gives
  ``partition-id``, ``num-partitions`` and ``state-dir`` (where the device keeps its
  client state; the demo points it at the run folder so the folder matches a simulation's).
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.data.loading import num_clients
from fedsim.edge.profiles import write_device_report
from fedsim.edge.protocol import EdgePlayer, edge_adapt, edge_split
from fedsim.engine.client import client_runtime, serve_runtime
from fedsim.results import RunFolder, plot_accuracy, summarize
from fedsim.scenario import load_scenario, new_run, open_model_run, open_run
from fedsim.schema import ScenarioError
from fedsim.tta.experiment import run_adaptation

SCENARIO_KEY = "fedsim.scenario"
PROGRESS = "progress.jsonl"

client_app = ClientApp()
server_app = ServerApp()


# -- edge ------------------------------------------------------------------------------------
def _runtime(context: Context) -> Any:
    record = context.state.config_records.get("fedsim")
    if record is None:
        raise RuntimeError("this SuperNode has not been told its scenario (no discovery query from a fedsim ServerApp)")
    state_dir = str(context.node_config.get("state-dir", "")) or None
    return client_runtime(str(record["scenario"]), state_dir)


@client_app.query()
def hello(msg: Message, context: Context) -> Message:
    config = msg.content["config"] if "config" in msg.content else {}
    if SCENARIO_KEY in config:
        context.state["fedsim"] = ConfigRecord({"scenario": str(config[SCENARIO_KEY])})
    return _runtime(context).hello(msg, context)


serve_runtime(client_app, _runtime, hello=False)  # hello above: it stores the scenario first


@client_app.query("adapt")
def adapt(msg: Message, context: Context) -> Message:
    return edge_adapt(_runtime(context), msg, context)


@client_app.query("split")
def split(msg: Message, context: Context) -> Message:
    return edge_split(_runtime(context), msg, context)


# -- cloud -----------------------------------------------------------------------------------
class ProgressLog:
    """``edge/progress.jsonl``: one JSON line per event, read by the live view."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "edge" / PROGRESS
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **data: Any) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"event": event, "time": time.time(), **data}) + "\n")


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def _open_run(run_config: dict[str, Any]) -> tuple[Any, Any, bool]:
    """The run folder named by the run config, and whether to resume it.

    A new folder is created from the scenario file. An existing one is reused only when the
    run config says ``resume=true`` (the demo does, for the folder it created) and the
    submitted scenario, if any, is the one saved there; a re-submission without it is
    refused like ``fedsim run`` into an existing folder, never silently re-run over."""

    scenario_file = str(run_config.get("scenario", ""))
    run_dir = Path(str(run_config.get("run-dir", "")) or f"runs/{Path(scenario_file).stem}-flwr").resolve()
    if (run_dir / "scenario.yaml").is_file():
        if not _flag(run_config.get("resume", False)):
            raise ScenarioError(
                f"{run_dir}: run folder exists; submit with --run-config 'resume=true' (same scenario) to continue it, or choose another run-dir"
            )
        run, scenario = open_run(run_dir)
        if scenario_file and Path(scenario_file).resolve() != run.scenario_file.resolve():
            submitted = load_scenario(scenario_file)
            if submitted.model_dump() != scenario.model_dump():
                raise ScenarioError(
                    f"{run_dir}: holds a different scenario than {scenario_file}; resume=true continues only the saved one (choose another run-dir)"
                )
        return run, scenario, bool(run.read_metrics()) or run.checkpoints.exists()
    scenario = load_scenario(scenario_file)
    return RunFolder.create(run_dir, scenario, overwrite=False), scenario, False


def run_cloud(grid: Grid, run_config: dict[str, Any]) -> Path:
    """Everything the cloud does in one run: train, adapt on the edges, write results."""

    run, scenario, resume = _open_run(run_config)
    torch.set_num_threads(scenario.runtime.num_threads)
    progress = ProgressLog(run.path)
    progress.write("start", rounds=scenario.rounds, clients=num_clients(scenario.data), resume=resume)
    t0 = time.perf_counter()
    try:
        experiment = new_run(scenario, run, resume=resume, on_round=lambda r: progress.write("round", record=r))
        experiment.hello_config = {SCENARIO_KEY: scenario.model_dump_json()}
        experiment.drive(grid)
        records = run.read_metrics()
        run.write_summary(summarize(records, scenario, time.perf_counter() - t0))
        plot_accuracy(records, run.plot_file, f"{scenario.name} ({scenario.strategy.name}, Flower deployment runtime)")
        summary = None
        if scenario.adaptation is not None:
            model_run = open_model_run(run.path)
            cfg = scenario.adaptation
            assert experiment.grid is not None
            pgrid = experiment.grid
            progress.write("adapt", adapters=[s.display for s in cfg.adapter_specs()])
            summary = run_adaptation(
                model_run,
                cfg,
                run.path,
                name=scenario.name,
                source=str(run.scenario_file),
                log=lambda m: progress.write("log", message=m),
                player=lambda models, foundation: EdgePlayer(
                    pgrid, model_run, cfg, models, foundation, lambda u: progress.write("edge", **u)
                ),
            )
        write_device_report(run.path, scenario, records, summary)
    except BaseException as exc:
        progress.write("failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        raise
    progress.write("done", wall_s=time.perf_counter() - t0)
    return run.path


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    run_cloud(grid, dict(context.run_config))
