"""The Ray pool's start-up decision that needs no Ray: how many workers the free cores give."""

from __future__ import annotations

from fedsim.engine.ray_pool import local_workers


def test_local_workers_leave_the_driver_its_core():
    assert local_workers(2.0, 1.0, driver_runs_clients=True) == 1
    assert local_workers(1.0, 1.0, driver_runs_clients=True) == 0  # a loaded 2-core machine
    assert local_workers(1.8, 1.0, driver_runs_clients=True) == 1  # rounded to the nearest core
    assert local_workers(0.6, 1.0, driver_runs_clients=True) == 0
    assert local_workers(2.0, 1.0, driver_runs_clients=False) == 2
    assert local_workers(8.0, 2.0, driver_runs_clients=True) == 3
