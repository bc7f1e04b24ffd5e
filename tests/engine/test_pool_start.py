"""The Ray pool's start-up decisions that need no Ray: how many workers the free cores give,
and the lower priority of the processes a private Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from fedsim.engine.ray_pool import BACKGROUND_NICE, background_priority, local_workers


def test_local_workers_leave_the_driver_its_core():
    assert local_workers(2.0, 1.0, driver_runs_clients=True) == 1
    assert local_workers(1.0, 1.0, driver_runs_clients=True) == 0  # a loaded 2-core machine
    assert local_workers(1.8, 1.0, driver_runs_clients=True) == 1  # rounded to the nearest core
    assert local_workers(2.0, 1.0, driver_runs_clients=False) == 2
    assert local_workers(8.0, 2.0, driver_runs_clients=True) == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_background_priority_lowers_only_its_thread_and_what_that_thread_starts():
    main_tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, main_tid)
    seen: dict[str, int] = {}

    def starter() -> None:
        background_priority()
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        child = "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"
        seen["child"] = int(subprocess.check_output([sys.executable, "-c", child], text=True))

    t = threading.Thread(target=starter)
    t.start()
    t.join()
    assert seen["thread"] == min(19, before + BACKGROUND_NICE)
    assert seen["child"] == seen["thread"]  # Ray's daemons and workers, forked from that thread
    assert os.getpriority(os.PRIO_PROCESS, main_tid) == before  # the driver keeps its priority
