"""Runtimes: the same ServerApp and ClientApp, in-process or on Flower's Ray simulation."""

from __future__ import annotations

import os
import threading
import time

from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedsim.engine.client import client_runtime, make_client_app
from fedsim.engine.flower_simulation import run_flower_simulation
from fedsim.engine.grid import InlineGrid, StoppableGrid
from fedsim.engine.ray_pool import run_pool
from fedsim.engine.ray_start import ACTOR_RETRIES, PoolStartFailed, RayStart, ray_init_args
from fedsim.engine.server import FederatedRun
from fedsim.engine.vectorized import VectorizedGrid


def node_config(partition_id: int, num_partitions: int) -> dict[str, int]:
    return {"partition-id": partition_id, "num-partitions": num_partitions}


def node_contexts(n: int) -> dict[int, Context]:
    """A persistent Context per node. Node ids are arbitrary (as in Flower): strategies only
    ever see partition ids."""
    return {
        1000 + i: Context(run_id=1, node_id=1000 + i, node_config=node_config(i, n), state=RecordDict(), run_config={})
        for i in range(n)
    }


def run_inline(experiment: FederatedRun) -> None:
    """Clients run one after another in this process, each with a persistent Context
    (``runtime.vectorize``: a round's eligible clients at once, fedsim.engine.vectorized)."""
    sc = experiment.scenario
    client_app = make_client_app(sc, str(experiment.run.path), eager=True)
    contexts = node_contexts(experiment.num_clients)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    if sc.runtime.vectorize:  # cohorts trained at once (fedsim.engine.vectorized)
        run_dir = str(experiment.run.path)
        grid: InlineGrid = VectorizedGrid(
            client_app, contexts, lambda: client_runtime(sc.model_dump_json(), run_dir), sc, sc.faults.client_timeout_s
        )
    else:
        grid = InlineGrid(client_app, contexts, timeout_s=sc.faults.client_timeout_s)
    experiment.drive(grid)


# How long the ServerApp thread and Flower's worker threads get to end once the runtime
# has stopped: the ServerApp notices at its next grid call (StoppableGrid), a worker once
# its ClientApp call returns or its actor is gone. A round of the biggest scenario here
# aggregates well within this.
RAY_STOP_WAIT_S = 60.0


class RayRuntimeError(RuntimeError):
    """Flower's simulation runtime on Ray failed (starting or joining Ray included);
    one line naming the root cause, instead of Flower's generic message."""


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def run_ray(experiment: FederatedRun, prestarted: RayStart | None = None) -> None:
    """``runtime: ray``: the engine ``runtime.engine`` names, on Ray (joins a cluster when
    runtime.address is set): ``pool`` (:mod:`fedsim.engine.ray_pool`; on ``prestarted``
    when Ray was started for it already), or ``flower`` through ``run_simulation`` (what
    :mod:`fedsim.superlink.run` falls back to)."""
    rt = experiment.scenario.runtime
    if rt.engine == "flower":
        return run_ray_simulation(experiment)
    try:
        run_pool(experiment, node_contexts(experiment.num_clients), prestarted)
    except PoolStartFailed as exc:
        raise RayRuntimeError(str(exc)) from exc


def run_ray_simulation(experiment: FederatedRun) -> None:
    """Flower's simulation engine on Ray through ``run_simulation`` (joins a cluster when
    runtime.address is set): ``engine: flower``'s fallback (:mod:`fedsim.superlink.run`).

    Ends in bounded time whatever happens: the ServerApp sees a :class:`StoppableGrid`
    that is stopped as soon as Flower's simulation returns or raises (Ctrl-C included),
    the threads Flower started are joined with a timeout, and Ray is shut down. Which
    Flower entry point runs it, and why: :mod:`fedsim.engine.flower_simulation`."""
    import ray  # heavy, only for this runtime

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

    sc = experiment.scenario
    rt = sc.runtime
    backend_config = {
        "client_resources": {"num_cpus": rt.cpus_per_client, "num_gpus": rt.gpus_per_client, **ACTOR_RETRIES},
        "init_args": ray_init_args(rt.address, rt.cpus_per_client),
    }
    stop = threading.Event()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        experiment.drive(StoppableGrid(grid, stop))

    before = set(threading.enumerate())
    try:
        run_flower_simulation(
            server_app=app,
            client_app=make_client_app(sc, str(experiment.run.path)),
            num_supernodes=experiment.num_clients,
            backend_config=backend_config,
        )
    except RuntimeError as exc:
        # Flower wraps the engine's failure as RuntimeError("An error was encountered...")
        # from RuntimeError("Simulation Runtime crashed.") from the real one; errors of
        # the ServerApp itself (RunFailure, ...) come through unwrapped.
        cause = _root_cause(exc)
        if type(exc) is RuntimeError and cause is not exc:
            where = f"Ray at {rt.address}" if rt.address else "local Ray"
            text = str(cause).strip().splitlines()
            raise RayRuntimeError(f"runtime ray ({where}): {type(cause).__name__}: {text[0] if text else ''}") from exc
        raise
    finally:
        stop.set()
        if ray.is_initialized():  # Flower shuts Ray down itself unless it was interrupted first
            ray.shutdown()
        _join_new_threads(before, RAY_STOP_WAIT_S)


def _join_new_threads(before: set[threading.Thread], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    for t in set(threading.enumerate()) - before:
        if t is not threading.current_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))


RUNTIMES = {"inline": run_inline, "ray": run_ray}
