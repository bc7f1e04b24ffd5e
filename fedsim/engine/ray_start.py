"""Starting Ray for the ``pool`` engine (:mod:`fedsim.engine.ray_pool`) in the background, as
early as the caller can.

On a small machine, starting Ray costs more CPU than a round lasts (issue #19): a private
Ray's daemons (GCS, raylet, monitors, agents: several Python processes) and then each worker's
imports (torch, Flower, fedsim). :class:`RayStart` does all of it in one background thread:

1. samples the cores other processes leave free (:class:`CpuSample`, over
   :data:`LOAD_SAMPLE_S`) and decides how many workers (none on a loaded machine: then Ray
   is not even imported);
2. imports Ray and starts a private one (or joins ``runtime.address``): a lean head by
   default (:func:`lean_head`);
3. creates the worker actors right away: each imports the client stack while the run is
   still being prepared (:class:`fedsim.engine.ray_worker.PoolWorker`); the pool sends each
   the scenario when its run starts;
4. holds Ray until :meth:`RayStart.close`, and shuts it down there: a private Ray's daemons
   die with the *thread* that started them (Linux's parent-death signal is per thread).

``fedsim run`` creates it before its own imports (:mod:`fedsim.cli.prestart`), so Ray starts
while the CLI imports torch and Flower and validates the scenario; a run through the Python
API creates it when its pool starts. This module is light (no torch, Flower or Ray at import).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fedsim.config import RuntimeConfig

# How long the free-core sample lasts (in the background thread, while the CLI imports; Ray
# starts after it: 0.5 s of /proc/stat's 100 Hz ticks tells a busy core from an idle one).
LOAD_SAMPLE_S = 0.5
# How long closing waits for the start thread to shut Ray down (it may be inside ray.init).
START_JOIN_S = 60.0
# Ray actor options of every client process (Flower's ``client_resources`` pass them to its
# ``ClientAppActor``): a client process that dies (e.g. cannot start a thread on a loaded
# machine) is restarted and its call retried, instead of failing the round. A retried
# ClientApp call gives the same reply: client training is seeded by (seed, round, client).
ACTOR_RETRIES = {"max_restarts": 2, "max_task_retries": 2}


class PoolStartFailed(RuntimeError):
    """Ray could not start or host a worker (one line, naming where)."""


def ray_init_args(address: str | None, cpus_per_client: float) -> dict[str, Any]:
    """``ray.init`` arguments. Without ``address`` a private local Ray is started,
    even when ``ray start`` left an address file or RAY_ADDRESS is set (``ray.init()``
    would join that cluster and then refuse ``num_cpus``); with it, that cluster is
    joined as it is (its resources are its own)."""
    if address:
        return {"address": address, "logging_level": logging.ERROR, "log_to_driver": True}
    return {
        "address": "local",
        "num_cpus": max(int(os.cpu_count() or 1), int(cpus_per_client)),
        "include_dashboard": False,
        "logging_level": logging.ERROR,
        "log_to_driver": True,
    }


# Ray's head-node methods that ``lean_head`` skips: each starts a Python daemon that a
# private, single-node, per-run Ray never uses (see RuntimeConfig.lean_head).
LEAN_HEAD_SKIPS = ("start_monitor", "start_api_server")


def _skip(*_args: Any, **_kwargs: Any) -> None:
    return None


@contextmanager
def lean_head(enabled: bool = True) -> Iterator[list[str]]:
    """While ``ray.init`` starts a private head node in this block, skip its autoscaler
    monitor and its dashboard API server (``include_dashboard=False`` still starts the API
    server, for job submission and the state API). ``python -m benchmarks.process_costs`` on
    2 cores: ``ray.init`` 1.7 s instead of 2.7 s, the Ray processes' CPU 2.5 s instead of
    3.4-3.5 s in their first 5 s. Ray's public API has no
    switch for either (``ray start`` has ``--no-monitor`` only), so this replaces the two
    methods of Ray's ``Node`` class for the duration of the block; a Ray without them is
    started as it is. Yields the names of the methods skipped."""
    skipped: list[str] = []
    saved: dict[str, Any] = {}
    if enabled:
        try:
            from ray._private.node import Node
        except ImportError:  # another layout: start Ray as it is
            Node = None  # noqa: N806
        for name in LEAN_HEAD_SKIPS if Node is not None else ():
            if callable(vars(Node).get(name)):
                saved[name] = vars(Node)[name]
                setattr(Node, name, _skip)
                skipped.append(name)
    try:
        yield skipped
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)


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


def _local_gpus() -> float:
    try:
        import torch

        return float(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPU
        return 0.0


class RayStart:
    """Ray and the pool's worker actors for ``runtime``, started by a background thread from
    construction on (see the module docstring). Thread-safe; :meth:`close` ends it in bounded
    time whatever state it is in."""

    def __init__(self, runtime: RuntimeConfig) -> None:
        self.runtime = runtime
        self.init_args = ray_init_args(runtime.address, runtime.cpus_per_client)
        self.t0 = time.monotonic()
        self._sample = CpuSample() if runtime.workers is None and not runtime.address else None
        self.free_cores: float | None = None
        self.workers = 0  # actors asked for
        self.actors: list[Any] = []
        self.ray_up_s: float | None = None  # ray.init returned, seconds after construction
        self._cond = threading.Condition()
        self._starting = True
        self._checked = False  # Ray is up and can host the workers
        self._closed = False
        self._ray_up = False
        self.error: PoolStartFailed | None = None
        self._thread = threading.Thread(target=self._run, name="fedsim-ray-start", daemon=True)
        self._thread.start()

    def where(self) -> str:
        return f"Ray at {self.runtime.address}" if self.runtime.address else "local Ray"

    # -- the start thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._start()
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits for the start
            with self._cond:
                if not self._closed:
                    text = str(exc).strip().splitlines()
                    self.error = PoolStartFailed(
                        f"runtime ray ({self.where()}): {type(exc).__name__}: {text[0] if text else ''}"
                    )
        finally:
            with self._cond:
                self._starting = False
                self._cond.notify_all()
                while not self._closed:
                    self._cond.wait()
            if self._ray_up:
                import ray

                ray.shutdown()

    def _start(self) -> None:
        rt = self.runtime
        n = rt.workers
        if self._sample is not None:
            # Ray is imported only after the sample, and only if workers are wanted: on a
            # loaded machine its import (~0.4 s of CPU) and daemons would slow the driver.
            self.free_cores = self._sample.free_cores()
            n = local_workers(self.free_cores, rt.cpus_per_client, rt.driver_runs_clients)
            if rt.gpus_per_client > 0:
                n = min(n, int(_local_gpus() // rt.gpus_per_client))
            if n == 0 and not rt.driver_runs_clients:
                n = 1  # someone has to run the clients
        if n == 0:
            return  # no core to spare: the driver runs every client, Ray is not started
        import ray  # heavy: only once workers are wanted, in this background thread

        from fedsim.engine.ray_worker import PoolWorker

        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        args = dict(self.init_args)
        if not rt.address and n is not None:
            # a private Ray holds exactly the workers: Ray prestarts one idle worker process per
            # CPU it is given (~0.5 s of CPU each), and the driver needs none
            args["num_cpus"] = max(1, int(-(-n * rt.cpus_per_client // 1)))
        with self._cond:
            if self._closed:
                return
        with lean_head(rt.lean_head and not rt.address):
            ray.init(**args)
        self._ray_up = True
        self.ray_up_s = time.monotonic() - self.t0
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
        if n is None:  # a cluster: as many workers as its nodes hold
            n = max(1, sum(int(min(h.get(k, 0.0) // v for k, v in need.items() if v > 0)) for h in hosts))
        worker_cls = ray.remote(PoolWorker).options(
            num_cpus=rt.cpus_per_client, num_gpus=rt.gpus_per_client, **ACTOR_RETRIES
        )
        actors = [worker_cls.remote() for _ in range(n)]  # they import the client stack now
        with self._cond:
            self.workers, self.actors = n, actors
            self._checked = True
            self._cond.notify_all()

    # -- for the pool ------------------------------------------------------------------
    def wait_started(self, timeout: float | None = None) -> bool:
        """Wait until the start has ended (actors created, no workers wanted, or failed);
        True if it has."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._starting or self._checked, timeout)

    def check(self) -> None:
        """Raise the start's failure, if any."""
        if self.error is not None:
            raise self.error

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, join_s: float = START_JOIN_S) -> None:
        """Shut Ray down (after ray.init returns, if the thread is inside it), waiting up to
        ``join_s`` for it (0: return at once; a later close waits); idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(join_s)


__all__ = [
    "ACTOR_RETRIES",
    "CpuSample",
    "LEAN_HEAD_SKIPS",
    "LOAD_SAMPLE_S",
    "PoolStartFailed",
    "RayStart",
    "START_JOIN_S",
    "lean_head",
    "local_workers",
    "ray_init_args",
]
