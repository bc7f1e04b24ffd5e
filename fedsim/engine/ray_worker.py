"""One persistent client process of the ``pool`` engine (a Ray actor).

It is created as soon as Ray is up (:class:`fedsim.engine.ray_start.RayStart`), usually while
``fedsim run`` is still importing and validating: its constructor imports the client stack
(torch, Flower, fedsim's client: the longest part of a fresh process's start) before the
scenario is known. :meth:`PoolWorker.setup` then builds the ClientApp and its client runtime
(data cache, model) once, and :meth:`PoolWorker.run` serves calls one at a time.

This module itself is light: the driver imports it to name the actor class, the worker
process does the heavy imports.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any


class PoolWorker:
    """A client process: the client stack imported at construction, the ClientApp built by
    :meth:`setup`."""

    def __init__(self) -> None:
        t0 = time.perf_counter()
        import fedsim.engine.client  # noqa: F401 - the heavy imports, while the run is prepared
        import fedsim.engine.grid  # noqa: F401

        self.import_s = time.perf_counter() - t0
        self.app: Any = None

    def setup(self, scenario_json: str, run_dir: str | None) -> tuple[int, str, float, float]:
        """Build the ClientApp and its runtime (data and model now, not at the first call);
        returns where this worker runs (pid, host) and how long its start took: the
        constructor's imports and this build, in seconds."""
        t0 = time.perf_counter()
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        from fedsim.config import Scenario
        from fedsim.engine.client import make_client_app

        scenario = Scenario.model_validate_json(scenario_json)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
        self.app = make_client_app(scenario, run_dir, eager=True)
        return os.getpid(), socket.gethostname(), self.import_s, time.perf_counter() - t0

    def run(self, msg: Any, context: Any, setup: tuple[str, str | None]) -> tuple[Any, Any, float, int]:
        """The ClientApp call on ``msg`` (a Flower ``Message``) for the node whose ``Context``
        travels with it; the context comes back with the reply, the call's seconds and pid.
        ``setup`` is :meth:`setup`'s arguments: a worker that Ray restarted after its process
        died has no ClientApp yet when its call is retried."""
        from fedsim.engine.grid import call_client

        if self.app is None:
            self.setup(*setup)

        reply, elapsed = call_client(self.app, msg, context)
        return reply, context, elapsed, os.getpid()


__all__ = ["PoolWorker"]
