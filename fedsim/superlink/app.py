"""fedsim's ServerApp and ClientApp as Flower's simulation runtime loads them for ``fedsim run``
(``runtime: ray``, ``engine: flower``; :mod:`fedsim.superlink.run` submits them).

The process that runs ``fedsim run`` validates the scenario, prepares the run folder and holds
its lock (:mod:`fedsim.runlock`); Flower's ``flwr-simulation`` process, started by the
SuperLink, runs this ServerApp, which writes the rounds and checkpoints into that folder on
the submitter's behalf. So the ServerApp never takes the lock: it checks that the submitting
process (``owner-pid`` in the run config) holds it, and refuses to write otherwise.

Run config (``flwr run --run-config``): ``run-dir`` (the run folder), ``scenario-json`` (a
file holding the validated scenario as JSON, read by the ServerApp and every ClientApp, so
the scenario is validated once), ``resume`` (continue from the newest checkpoint),
``owner-pid`` and ``outcome`` (a JSON file where the ServerApp says how the run ended:
``{"ok": true}`` or the fedsim error that stopped it, which the submitter raises as its own).
"""

from __future__ import annotations

import json
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedsim.arrays import atomic_write_bytes
from fedsim.config import Scenario
from fedsim.engine.client import client_runtime, serve_runtime
from fedsim.engine.server import RunFailure
from fedsim.results import RunFolder
from fedsim.runlock import lock_holder
from fedsim.scenario import new_run

client_app = ClientApp()
server_app = ServerApp()


@lru_cache(maxsize=4)
def _scenario_json(path: str) -> str:
    return Path(path).read_text()


def _runtime(context: Context) -> Any:
    rc = context.run_config
    return client_runtime(_scenario_json(str(rc["scenario-json"])), str(rc["run-dir"]))


serve_runtime(client_app, _runtime)


def _flag(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


def write_outcome(path: Path, **outcome: Any) -> None:
    atomic_write_bytes(path, json.dumps(outcome).encode())


def check_owner(run_dir: Path, owner_pid: int) -> None:
    """RunFailure unless ``owner_pid`` holds the run folder's lock."""
    holder = lock_holder(run_dir)
    if holder != owner_pid:
        who = "no process" if holder is None else f"pid {holder}"
        raise RunFailure(
            f"{run_dir}: its lock is held by {who}, not by the fedsim process {owner_pid} that submitted this run; nothing written"
        )


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Drive the rounds as the inline runtime does; a fedsim error (RunFailure: divergence,
    too many failed clients, ...) ends the run with its outcome recorded, as a decision of
    the run, not a crash of Flower's runtime; anything else is recorded and re-raised."""
    rc = context.run_config
    outcome = Path(str(rc["outcome"]))
    try:
        run_dir = Path(str(rc["run-dir"]))
        check_owner(run_dir, int(rc["owner-pid"]))
        scenario = Scenario.model_validate_json(_scenario_json(str(rc["scenario-json"])))
        torch.set_num_threads(scenario.runtime.num_threads)
        new_run(scenario, RunFolder(run_dir), resume=_flag(rc["resume"])).drive(grid)
    except RunFailure as exc:
        write_outcome(outcome, ok=False, type="RunFailure", message=str(exc), traceback=traceback.format_exc())
        return
    except BaseException as exc:
        write_outcome(outcome, ok=False, type=type(exc).__name__, message=str(exc), traceback=traceback.format_exc())
        raise
    write_outcome(outcome, ok=True)
