"""The Ray pool's start-up that needs no Ray: how many workers the free cores give, and
which `fedsim run` starts Ray before its imports (with Ray: tests/engine/test_ray_runtime.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys

from conftest import checkout_env

from fedsim.cli.main import build_parser
from fedsim.cli.prestart import prestart_ray
from fedsim.engine.ray_start import LEAN_HEAD_SKIPS, RayStart, lean_head, local_workers
from fedsim.scenario import load_scenario


def test_local_workers_leave_the_driver_its_core():
    assert local_workers(2.0, 1.0, driver_runs_clients=True) == 1
    assert local_workers(1.0, 1.0, driver_runs_clients=True) == 0  # a loaded 2-core machine
    assert local_workers(1.8, 1.0, driver_runs_clients=True) == 1  # rounded to the nearest core
    assert local_workers(0.6, 1.0, driver_runs_clients=True) == 0
    assert local_workers(2.0, 1.0, driver_runs_clients=False) == 2
    assert local_workers(8.0, 2.0, driver_runs_clients=True) == 3


def test_lean_head_skips_two_daemons_only_inside_its_block():
    """The monitor and the dashboard's API server are skipped while the block runs (a
    private Ray is started there), and Ray's own methods are back after it, an error
    included; disabled, nothing is touched. (Started for real: test_ray_runtime.py.)"""
    from ray._private.node import Node

    def methods() -> dict:
        return {name: vars(Node)[name] for name in LEAN_HEAD_SKIPS}

    ray_own = methods()
    with lean_head() as skipped:
        assert skipped == list(LEAN_HEAD_SKIPS)
        assert all(vars(Node)[name] is not ray_own[name] for name in skipped)
        assert Node.start_monitor(object()) is None
    assert methods() == ray_own
    try:
        with lean_head():
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert methods() == ray_own
    with lean_head(False) as skipped:
        assert skipped == [] and methods() == ray_own


# -- `fedsim run` starts Ray before its imports (fedsim.cli.prestart) ------------------------
def _run_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["run", *argv])


def test_prestart_only_for_a_valid_pool_scenario_and_with_the_runtime_the_run_uses(toy_yaml, tmp_path):
    """The light read of the scenario gives exactly the runtime the full validation gives
    (else the run would start a second Ray and this one would be wasted); anything that is
    not the pool engine, or not valid, starts nothing and reports nothing."""
    pool = ["runtime.name=ray", "runtime.workers=0"]  # workers 0: no Ray is started, nothing to stop
    started = prestart_ray(_run_args(str(toy_yaml), *pool))
    assert isinstance(started, RayStart)
    try:
        assert started.runtime == load_scenario(toy_yaml, pool).runtime
        assert started.wait_started(10.0) and started.workers == 0 and not started.actors
        started.check()
    finally:
        started.close()
    assert started.closed
    assert prestart_ray(_run_args(str(toy_yaml))) is None  # inline
    assert prestart_ray(_run_args(str(toy_yaml), "runtime.name=ray", "runtime.engine=flower")) is None
    assert prestart_ray(_run_args(str(toy_yaml), "runtime.name=ray", "runtime.nosuch=1")) is None
    assert prestart_ray(_run_args(str(tmp_path / "missing.yaml"), "runtime.name=ray")) is None
    assert prestart_ray(_run_args("--resume", str(tmp_path))) is None  # no saved scenario.yaml
    (tmp_path / "scenario.yaml").write_text(toy_yaml.read_text() + "runtime: {name: ray, workers: 0}\n")
    resumed = prestart_ray(_run_args("--resume", str(tmp_path)))
    assert resumed is not None and resumed.runtime.name == "ray"
    resumed.close()


def test_the_prestart_path_imports_no_torch_flower_or_ray():
    """What `fedsim run` imports before it starts Ray must stay light: with torch, Flower or
    Ray among them, Ray would start seconds later and the early start would be for nothing."""
    code = (
        "import sys\n"
        "import fedsim.cli.main, fedsim.cli.prestart, fedsim.engine.ray_start, fedsim.engine.ray_worker\n"
        "heavy = sorted(m for m in ('torch', 'flwr', 'ray', 'matplotlib') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=checkout_env(), check=True)
    assert out.stdout.strip() == "", out.stdout
