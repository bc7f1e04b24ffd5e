"""The ``pool`` engine of ``runtime: ray``: persistent Ray worker actors and the driver share one work queue.

Method (issue #19, target 1: a parallel runtime that pays off from the first round):

- The ServerApp runs in the driver exactly as on the inline runtime (``FederatedRun.drive``
  on a :class:`PoolGrid`); the nodes' Flower ``Context`` objects live in the driver and
  travel with each ClientApp call and back, as Flower's simulation engine does.
- Each worker is a persistent Ray actor (``cpus_per_client`` / ``gpus_per_client`` as its
  resources) that builds the ClientApp and its client runtime (data cache, model) once and
  then serves calls one at a time. A worker whose process dies is restarted by Ray and the
  call retried (``ACTOR_RETRIES``): client training is seeded by (seed, round, client), so a
  retried call gives the same reply.
- Start-up is hidden: measuring the free cores, ``import ray``, ``ray.init`` and the actors'
  warm-up happen in a background thread, while the driver builds its own client runtime (as
  the inline runtime does before round 1), discovers the nodes and starts round 1.
  Meanwhile the driver runs client calls itself from the same queue (work stealing), so no
  round waits for Ray; each worker joins the queue as soon as it is warm.
- Each batch is queued longest first (training samples of the client), so the last call
  of a round is a short one and the lanes finish together.
- The number of workers matches the cores other processes leave free (sampled from
  ``/proc/stat`` over :data:`LOAD_SAMPLE_S`, minus this process's own CPU time), less the
  one the driver uses: 2 idle cores give the driver + 1 worker; with another job holding
  one of 2 cores there is no worker and no Ray at all, so a loaded machine runs the
  clients as the inline runtime does, never slower. ``runtime.workers`` overrides it;
  on a cluster (``runtime.address``) the cluster's CPUs and GPUs decide.
- Replies come back in the order of the messages (the inline order); the per-call timeout
  (``faults.client_timeout_s``) and client errors follow :class:`fedsim.engine.grid.InlineGrid`.

Ray is imported only by the background thread (start-up time); everything ends in bounded
time: the workers' feeder threads poll a closed flag, and Ray is shut down at the end.
"""

from __future__ import annotations

import logging
import os
import socket
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
from fedsim.engine.server import FederatedRun

log = logging.getLogger(__name__)

# How long the free-core sample lasts (in the background thread; the driver does not wait).
LOAD_SAMPLE_S = 1.0
# A worker's feeder thread checks this often whether the pool is closing (Ctrl-C, end).
POLL_S = 0.2
# How long closing waits for the start-up thread to shut Ray down (it may be inside ray.init).
START_JOIN_S = 60.0


class PoolStartFailed(RuntimeError):
    """Ray could not start or host a worker (one line, naming where)."""


class CpuSample:
    """Cores that other processes leave free, measured between :meth:`__init__` and
    :meth:`free_cores`: the machine's busy CPU time (``/proc/stat``) less this process's own
    (all its threads), per second. Without ``/proc/stat`` (not Linux): cores less the
    1-minute load average."""

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.t0 = time.monotonic()
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
            return (sum(fields[:8]) - idle) / float(os.sysconf("SC_CLK_TCK")), sum(os.times()[:2])
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def free_cores(self, min_s: float = LOAD_SAMPLE_S) -> float:
        time.sleep(max(0.0, self.t0 + min_s - time.monotonic()))
        end = self._read()
        if self.start is None or end is None:
            return max(0.0, self.ncpu - os.getloadavg()[0]) if hasattr(os, "getloadavg") else float(self.ncpu)
        others = ((end[0] - self.start[0]) - (end[1] - self.start[1])) / max(time.monotonic() - self.t0, 1e-6)
        return max(0.0, min(float(self.ncpu), self.ncpu - others))


def local_workers(free: float, cpus_per_client: float, driver_runs_clients: bool) -> int:
    """Workers for a private local Ray: one per ``cpus_per_client`` of the free cores, less
    the core the driver itself runs clients on (rounded to the nearest core)."""
    cores = int(free + 0.25) - (1 if driver_runs_clients else 0)
    return max(0, int(cores // cpus_per_client)) if cores > 0 else 0


class PoolWorker:
    """One persistent client process (a Ray actor): the ClientApp and its runtime built once."""

    def __init__(self, scenario_json: str, run_dir: str | None) -> None:
        scenario = Scenario.model_validate_json(scenario_json)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        self.app = make_client_app(scenario, run_dir, eager=True)  # warm: data and model now, not at the first call

    def where(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def run(self, msg: Message, context: Context) -> tuple[Message, Context, float, int]:
        """The ClientApp call; the node's context comes back with the reply."""
        reply, elapsed = call_client(self.app, msg, context)
        return reply, context, elapsed, os.getpid()


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
    calls: dict[int, int] = field(default_factory=dict)

    def line(self) -> str:
        driver = self.calls.get(os.getpid(), 0)
        total = sum(self.calls.values())
        free = "" if self.free_cores is None else f", {self.free_cores:.1f} free cores"
        ready = "" if self.ray_started_s is None else f", first warm after {self.ray_started_s:.1f} s"
        return (
            f"runtime ray (pool): {self.workers} workers{free}{ready}; {total} client calls, "
            f"{driver} in the driver, {total - driver} in {max(0, len(self.calls) - (1 if driver else 0))} worker processes"
        )


class WorkerPool:
    """The work queue, the driver's share of it, and the Ray workers that join it."""

    def __init__(
        self,
        scenario: Scenario,
        run_dir: str | None,
        contexts: dict[int, Context],
        init_args: dict[str, Any],
        actor_options: dict[str, Any],
    ) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.rt = scenario.runtime
        self.contexts = contexts
        self.init_args = dict(init_args)
        self.actor_options = dict(actor_options)
        self.timeout_s = scenario.faults.client_timeout_s
        self.driver_runs = self.rt.driver_runs_clients
        self.stats = PoolStats()
        self._cond = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._results: dict[int, tuple[Message | None, Context, int]] = {}
        self._inflight = 0
        self._closed = False
        self._starting = True
        self._error: BaseException | None = None
        self._checked = False
        self._lanes: list[threading.Thread] = []
        self._ray_up = False
        self._app: ClientApp | None = None
        self._t0 = time.monotonic()
        self._sizes = partitions(scenario.data, scenario.seed).num_train
        self._starter = threading.Thread(target=self._start, name="fedsim-pool-start", daemon=True)

    # -- start-up (background thread) --------------------------------------------------
    def start(self) -> None:
        self._starter.start()

    def _where(self) -> str:
        return f"Ray at {self.rt.address}" if self.rt.address else "local Ray"

    def _start(self) -> None:
        """Start Ray and the workers, then hold Ray until the pool closes and shut it down
        here: Ray's daemons (a private Ray's raylet and GCS) die with the *thread* that
        started them (Linux's parent-death signal is per thread)."""
        try:
            self._start_ray()
        except BaseException as exc:  # noqa: BLE001 - reported by the driver at its next call
            with self._cond:
                if not self._closed:
                    text = str(exc).strip().splitlines()
                    self._error = PoolStartFailed(
                        f"runtime ray ({self._where()}): {type(exc).__name__}: {text[0] if text else ''}"
                    )
        finally:
            with self._cond:
                self._starting = False
                self._cond.notify_all()
                while not self._closed:
                    self._cond.wait()
            if self._ray_up:
                for lane in list(self._lanes):
                    lane.join(POLL_S * 10)
                import ray

                ray.shutdown()

    def _start_ray(self) -> None:
        rt = self.rt
        n = rt.workers
        if n is None and not rt.address:
            # Ray is imported only after the sample, and only if workers are wanted: on a
            # loaded machine its import (~1.5 s of CPU) would slow the driver's round 1.
            sample = CpuSample()
            self.stats.free_cores = sample.free_cores()
            n = local_workers(self.stats.free_cores, rt.cpus_per_client, self.driver_runs)
            if rt.gpus_per_client > 0:
                n = min(n, int(_local_gpus() // rt.gpus_per_client))
            if n == 0 and not self.driver_runs:
                n = 1  # someone has to run the clients
        if n == 0:
            self.stats.workers = 0
            return  # no core to spare: the driver runs every client, Ray is not started
        import ray  # heavy: only once workers are wanted, in this background thread

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        args = dict(self.init_args)
        if not rt.address and n is not None:
            # a private Ray holds exactly the workers: Ray prestarts one idle worker process per
            # CPU it is given (~0.5 s of CPU each), and the driver needs none
            args["num_cpus"] = max(1, int(-(-n * rt.cpus_per_client // 1)))
        with self._cond:
            if self._closed:
                return
        ray.init(**args)
        self._ray_up = True
        need = {"CPU": rt.cpus_per_client, "GPU": rt.gpus_per_client}
        hosts = [
            node.get("Resources", {})
            for node in ray.nodes()
            if node.get("Alive") and all(node.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items() if v > 0)
        ]
        if not hosts:
            raise RuntimeError(
                f"no node can host a client worker ({rt.cpus_per_client:g} CPUs, {rt.gpus_per_client:g} GPUs each)"
            )
        with self._cond:
            self._checked = True  # Ray is up and can host workers: what a run's end waits for
            self._cond.notify_all()
        if n is None:  # a cluster: as many workers as its nodes hold
            n = max(1, sum(int(min(h.get(k, 0.0) // v for k, v in need.items() if v > 0)) for h in hosts))
        self.stats.workers = n
        worker_cls = ray.remote(PoolWorker).options(
            num_cpus=rt.cpus_per_client, num_gpus=rt.gpus_per_client, **self.actor_options
        )
        scenario_json = self.scenario.model_dump_json()
        actors = [worker_cls.remote(scenario_json, self.run_dir) for _ in range(n)]
        pending = {a.where.remote(): a for a in actors}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            with self._cond:
                if self._closed:
                    return
            for ref in ready:
                actor = pending.pop(ref)
                ray.get(ref)  # raises if the worker could not start
                if self.stats.ray_started_s is None:
                    self.stats.ray_started_s = time.monotonic() - self._t0
                self.stats.workers_ready += 1
                lane = threading.Thread(target=self._serve, args=(actor,), name="fedsim-pool-lane", daemon=True)
                with self._cond:
                    self._lanes.append(lane)
                    self._cond.notify_all()
                lane.start()

    # -- a worker's feeder thread ------------------------------------------------------
    def _serve(self, actor: Any) -> None:
        import ray  # already imported by the start-up thread

        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                call = self._queue.popleft()
                self._inflight += 1
            try:
                ref = actor.run.remote(call.message, call.context)
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
        if self._error is not None:
            raise self._error

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

    def close(self) -> None:
        """Stop the feeders, wait (bounded) for the start-up thread, shut Ray down."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._starter.join(START_JOIN_S)  # it stops the workers' feeders and shuts Ray down

    def finish(self) -> None:
        """At the end of a run: a Ray that failed to start, or cannot host a worker, is an
        error even if the driver ran every client meanwhile (the user asked for Ray). Waits
        until Ray is up and checked, not for the workers' warm-up."""
        with self._cond:
            while self._starting and not self._checked and self._error is None:
                self._cond.wait(POLL_S)
        self._check()


def calls_in_order(calls: list[_Call]) -> list[_Call]:
    return sorted(calls, key=lambda c: c.index)


def _local_gpus() -> float:
    try:
        import torch

        return float(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPU
        return 0.0


class PoolGrid(LocalGrid):
    """Flower's ``Grid`` over a :class:`WorkerPool`: each batch runs on the driver and the
    warm workers together."""

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__(pool.contexts)  # the pool updates this dict as calls come back
        self.pool = pool

    def _run_batch(self, messages: list[Message]) -> Iterable[Message]:
        return self.pool.run_batch(messages)


def run_pool(
    experiment: FederatedRun, contexts: dict[int, Context], init_args: dict[str, Any], actor_options: dict[str, Any]
) -> PoolStats:
    """Drive ``experiment`` on the pool (see the module docstring); Ray is shut down at the
    end whatever happens (Ctrl-C included). Returns where the client calls ran."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    pool = WorkerPool(experiment.scenario, str(experiment.run.path), contexts, init_args, actor_options)
    pool.start()
    try:
        if pool.driver_runs:  # built before round 1, as the inline runtime does, while Ray starts
            pool.client_app()
        experiment.drive(PoolGrid(pool))
        pool.finish()
    finally:
        pool.close()
    log.info(pool.stats.line())
    return pool.stats


__all__ = ["PoolGrid", "PoolStartFailed", "PoolStats", "PoolWorker", "WorkerPool", "CpuSample", "run_pool"]
