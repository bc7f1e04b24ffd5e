"""The ``pool`` engine of ``runtime: ray``: persistent Ray worker actors and the driver share one work queue.

Method (issue #19, target 1: a parallel runtime that pays off from the first round):

- The ServerApp runs in the driver exactly as on the inline runtime (``FederatedRun.drive``
  on a :class:`PoolGrid`); the nodes' Flower ``Context`` objects live in the driver and
  travel with each ClientApp call and back, as Flower's simulation engine does.
- Each worker is a persistent Ray actor (:class:`fedsim.engine.ray_worker.PoolWorker`,
  ``cpus_per_client`` / ``gpus_per_client`` as its resources) that builds the ClientApp and
  its client runtime (data cache, model) once and then serves calls one at a time. A worker
  whose process dies is restarted by Ray and the call retried (``ACTOR_RETRIES``): client
  training is seeded by (seed, round, client), so a retried call gives the same reply.
- Start-up is hidden: measuring the free cores, ``import ray``, ``ray.init`` and creating the
  actors (which import the client stack) happen in a background thread
  (:class:`fedsim.engine.ray_start.RayStart`), which ``fedsim run`` starts before its own
  imports. Meanwhile the driver builds its own client runtime (as the inline runtime does
  before round 1), discovers the nodes and starts round 1, running client calls itself from
  the same queue (work stealing), so no round waits for Ray; each worker joins the queue as
  soon as it has built its client runtime.
- Each batch is queued longest first (training samples of the client), so the last call
  of a round is a short one and the lanes finish together.
- The number of workers matches the cores other processes leave free, less the one the
  driver uses (:func:`fedsim.engine.ray_start.local_workers`): 2 idle cores give the driver +
  1 worker; with another job holding one of 2 cores there is no worker and no Ray at all, so
  a loaded machine runs the clients as the inline runtime does. ``runtime.workers``
  overrides it; on a cluster (``runtime.address``) the cluster's CPUs and GPUs decide.
- Replies come back in the order of the messages (the inline order); the per-call timeout
  (``faults.client_timeout_s``) and client errors follow :class:`fedsim.engine.grid.InlineGrid`.

Ray is imported only by background threads; everything ends in bounded time: the workers'
feeder threads poll a closed flag, and Ray is shut down at the end.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsim.config import Scenario
from fedsim.data.loading import partitions
from fedsim.engine.client import make_client_app
from fedsim.engine.grid import LocalGrid, call_client
from fedsim.engine.ray_start import START_JOIN_S, PoolStartFailed, RayStart
from fedsim.engine.server import FederatedRun

# the run's account of the pool (workers, where the calls ran, the first worker's start):
# `fedsim run` shows this logger's INFO lines on stderr (fedsim.cli.common.show_runtime_notes)
log = logging.getLogger("fedsim.runtime")

# A worker's feeder thread checks this often whether the pool is closing (Ctrl-C, end).
POLL_S = 0.2


@dataclass
class _Call:
    index: int
    message: Message
    context: Context
    size: int


@dataclass
class PoolStats:
    """Where the client calls ran: ``calls[pid]`` (the driver's pid included)."""

    workers: int = 0
    workers_ready: int = 0
    free_cores: float | None = None
    ray_started_s: float | None = None  # from the start of the run until the first worker was warm
    prestarted: bool = False  # Ray was started before the run (by `fedsim run`, before its imports)
    calls: dict[int, int] = field(default_factory=dict)
    # where the first worker's start went, in seconds: the Ray start began `start_lead_s`
    # before the run's pool (0 unless prestarted); `ray.init` returned `ray_up_s` after the
    # Ray start began; the worker then imported the client stack and built its client runtime
    start_lead_s: float | None = None
    ray_up_s: float | None = None
    worker_import_s: float | None = None
    worker_setup_s: float | None = None

    def line(self) -> str:
        driver = self.calls.get(os.getpid(), 0)
        total = sum(self.calls.values())
        free = "" if self.free_cores is None else f", {self.free_cores:.1f} free cores"
        ready = "" if self.ray_started_s is None else f", first warm after {self.ray_started_s:.1f} s"
        if self.prestarted and self.workers:
            ready += " (Ray started before the run)"
        return (
            f"runtime ray (pool): {self.workers} workers{free}{ready}; {total} client calls, "
            f"{driver} in the driver, {total - driver} in {max(0, len(self.calls) - (1 if driver else 0))} worker processes"
            + self.start_account()
        )

    def start_account(self) -> str:
        """Where the first warm worker's start went (empty when no worker was warm)."""
        if self.ray_started_s is None or None in (self.start_lead_s, self.ray_up_s, self.worker_import_s):
            return ""
        return (
            f"; its start: Ray began {self.start_lead_s:.1f} s before the run and was up "
            f"{self.ray_up_s:.1f} s after it began, then the worker imported for {self.worker_import_s:.1f} s "
            f"and built its client runtime in {self.worker_setup_s:.1f} s"
        )


class WorkerPool:
    """The work queue, the driver's share of it, and the Ray workers that join it."""

    def __init__(self, scenario: Scenario, run_dir: str | None, contexts: dict[int, Context], ray: RayStart) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.rt = scenario.runtime
        self.contexts = contexts
        self.ray = ray
        self.timeout_s = scenario.faults.client_timeout_s
        self.driver_runs = self.rt.driver_runs_clients
        self.stats = PoolStats()
        self._cond = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._results: dict[int, tuple[Message | None, Context, int]] = {}
        self._inflight = 0
        self._closed = False
        self._starting = True  # until every worker is ready, or none will be
        self._lanes: list[threading.Thread] = []
        self._app: ClientApp | None = None
        self._t0 = time.monotonic()
        self._sizes = partitions(scenario.data, scenario.seed).num_train
        self._starter = threading.Thread(target=self._start, name="fedsim-pool-start", daemon=True)

    # -- start-up (background thread) --------------------------------------------------
    def start(self) -> None:
        self._starter.start()

    def _start(self) -> None:
        """Wait for Ray's start, send each worker the scenario, open a feeder (lane) for each
        worker as soon as it has built its client runtime."""
        try:
            self._start_workers()
        except BaseException as exc:  # noqa: BLE001 - reported by the driver at its next call
            with self._cond:
                if not self._closed and self.ray.error is None:
                    text = str(exc).strip().splitlines()
                    self.ray.error = PoolStartFailed(
                        f"runtime ray ({self.ray.where()}): {type(exc).__name__}: {text[0] if text else ''}"
                    )
        finally:
            with self._cond:
                self._starting = False
                self._cond.notify_all()

    def _start_workers(self) -> None:
        while not self.ray.wait_started(POLL_S):
            if self._closed:
                return
        self.stats.free_cores = self.ray.free_cores
        self.stats.workers = self.ray.workers
        if not self.ray.actors or self._closed:
            return
        import ray  # already imported by the start thread

        setup = (self.scenario.model_dump_json(), self.run_dir)
        pending = {actor.setup.remote(*setup): actor for actor in self.ray.actors}
        setup_ref = ray.put(setup)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if self._closed:
                return
            for ref in ready:
                actor = pending.pop(ref)
                _, _, import_s, setup_s = ray.get(ref)  # raises if the worker could not start or build its runtime
                if self.stats.ray_started_s is None:
                    self.stats.ray_started_s = time.monotonic() - self._t0
                    self.stats.start_lead_s = max(0.0, self._t0 - self.ray.t0)
                    self.stats.ray_up_s = self.ray.ray_up_s
                    self.stats.worker_import_s, self.stats.worker_setup_s = import_s, setup_s
                self.stats.workers_ready += 1
                lane = threading.Thread(
                    target=self._serve, args=(actor, setup_ref), name="fedsim-pool-lane", daemon=True
                )
                with self._cond:
                    self._lanes.append(lane)
                    self._cond.notify_all()
                lane.start()

    # -- a worker's feeder thread ------------------------------------------------------
    def _serve(self, actor: Any, setup_ref: Any) -> None:
        import ray  # already imported by the start thread

        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                call = self._queue.popleft()
                self._inflight += 1
            try:
                ref = actor.run.remote(call.message, call.context, setup_ref)
                while True:
                    done, _ = ray.wait([ref], timeout=POLL_S)
                    if done:
                        break
                    if self._closed:
                        return
                reply, context, elapsed, pid = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the worker died for good (restarts used up)
                reply = Message(
                    Error(code=2, reason=f"client worker died: {type(exc).__name__}"), reply_to=call.message
                )
                self._finish(call, reply, call.context, os.getpid(), 0.0)
                with self._cond:
                    self._lanes = [t for t in self._lanes if t is not threading.current_thread()]
                    self._cond.notify_all()
                return
            self._finish(call, reply, context, pid, elapsed)

    def _finish(self, call: _Call, reply: Message, context: Context, pid: int, elapsed: float) -> None:
        late = self.timeout_s is not None and elapsed > self.timeout_s and not reply.has_error()  # as InlineGrid
        with self._cond:
            self._results[call.index] = (None if late else reply, context, pid)
            self._inflight -= 1
            self._cond.notify_all()

    # -- the driver --------------------------------------------------------------------
    def _check(self) -> None:
        self.ray.check()

    def _driver_may_run(self) -> bool:
        """The driver takes calls when told to, or when no worker is (or will be) there."""
        return self.driver_runs or (not self._lanes and not self._starting)

    def run_batch(self, messages: list[Message]) -> list[Message]:
        """Every message's ClientApp call, by the driver and the warm workers together;
        replies (those in time) in the order of the messages."""
        self._check()
        calls = []
        for i, msg in enumerate(messages):
            node = msg.metadata.dst_node_id
            ctx = self.contexts[node]
            pid = int(ctx.node_config["partition-id"])
            calls.append(_Call(i, msg, ctx, int(self._sizes[pid]) if 0 <= pid < len(self._sizes) else 0))
        calls.sort(key=lambda c: (-c.size, c.index))  # longest first: the lanes end together
        with self._cond:
            self._results.clear()
            self._queue.extend(calls)
            self._cond.notify_all()
        while True:
            with self._cond:
                self._check()
                if len(self._results) == len(calls):
                    break
                call = self._queue.popleft() if self._queue and self._driver_may_run() else None
                if call is not None:
                    self._inflight += 1
                else:
                    self._cond.wait(POLL_S)
                    continue
            reply, elapsed = call_client(self.client_app(), call.message, call.context)
            self._finish(call, reply, call.context, os.getpid(), elapsed)
        out = []
        for i, call in enumerate(calls_in_order(calls)):
            reply, context, pid = self._results[i]
            self.contexts[call.message.metadata.dst_node_id] = context
            self.stats.calls[pid] = self.stats.calls.get(pid, 0) + 1
            if reply is not None:
                out.append(reply)
        self._results.clear()
        return out

    def client_app(self) -> ClientApp:
        """The driver's own ClientApp, its client runtime built on first use."""
        if self._app is None:
            self._app = make_client_app(self.scenario, self.run_dir, eager=True)
        return self._app

    def close(self, wait_for_ray: bool = True) -> None:
        """Stop the feeders and wait (bounded) for them and the start-up thread; then Ray is
        shut down (:meth:`RayStart.close`), waited for unless ``wait_for_ray`` is False
        (then whoever started Ray waits for its shutdown)."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + START_JOIN_S
        self._starter.join(START_JOIN_S)
        for lane in list(self._lanes):
            lane.join(max(0.0, min(POLL_S * 10, deadline - time.monotonic())))
        self.ray.close(max(0.0, deadline - time.monotonic()) if wait_for_ray else 0.0)

    def finish(self) -> None:
        """At the end of a run: a Ray that failed to start, or cannot host a worker, is an
        error even if the driver ran every client meanwhile (the user asked for Ray). Waits
        until Ray is up and its workers are created, not for their warm-up."""
        while not self.ray.wait_started(POLL_S):
            pass
        self._check()


def calls_in_order(calls: list[_Call]) -> list[_Call]:
    return sorted(calls, key=lambda c: c.index)


class PoolGrid(LocalGrid):
    """Flower's ``Grid`` over a :class:`WorkerPool`: each batch runs on the driver and the
    warm workers together."""

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__(pool.contexts)  # the pool updates this dict as calls come back
        self.pool = pool

    def _run_batch(self, messages: list[Message]) -> Iterable[Message]:
        return self.pool.run_batch(messages)


def run_pool(experiment: FederatedRun, contexts: dict[int, Context], ray: RayStart | None = None) -> PoolStats:
    """Drive ``experiment`` on the pool (see the module docstring), on ``ray`` when Ray was
    started for this runtime already (``fedsim run`` starts it before its imports), else on a
    Ray started now. Ray is shut down at the end whatever happens (Ctrl-C included); a
    prestarted Ray's shutdown is begun here and waited for by its starter
    (:meth:`RayStart.close`). Returns where the client calls ran."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    rt = experiment.scenario.runtime
    prestarted = ray is not None and not ray.closed and ray.runtime == rt
    if not prestarted:
        ray = RayStart(rt)
    pool = WorkerPool(experiment.scenario, str(experiment.run.path), contexts, ray)
    pool.stats.prestarted = prestarted
    pool.start()
    try:
        if pool.driver_runs:  # built before round 1, as the inline runtime does, while Ray starts
            pool.client_app()
        experiment.drive(PoolGrid(pool))
        pool.finish()
    finally:
        # a prestarted Ray is its starter's: `fedsim run` waits for the shutdown (~1.5 s) only
        # after writing the summary and plot, so they overlap
        pool.close(wait_for_ray=not prestarted)
    log.info(pool.stats.line())
    return pool.stats


__all__ = ["PoolGrid", "PoolStats", "WorkerPool", "run_pool"]
