"""fedsim.engine.flower_simulation: exactly Flower's run_simulation deprecation warning is
dropped (Flower's own logger and message), nothing else, and only while fedsim runs it.
The end-to-end check (a real ray run prints no deprecation) is in test_ray_runtime.py."""

from __future__ import annotations

import inspect
import logging
import sys
import tomllib

import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.logger import warn_deprecated_feature
from flwr.supercore.utils import simulation_config_from_json

from fedsim.config import Scenario
from fedsim.engine.flower_simulation import (
    RUN_SIMULATION_DEPRECATION,
    FlowerSimulationUnavailable,
    flower_version,
    quiet_run_simulation_deprecation,
    simulation_entry,
)
from fedsim.registry import import_object
from fedsim.superlink.run import APP_PYPROJECT, fallback_reason, federation_config


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def flwr_log():
    handler = Collect()
    logging.getLogger("flwr").addHandler(handler)
    yield handler.messages
    logging.getLogger("flwr").removeHandler(handler)


def run_simulation_notice() -> str:
    """The text the installed Flower's run_simulation passes to warn_deprecated_feature
    (read from its source, so a reworded notice fails here instead of reaching users)."""
    source = inspect.getsource(run_simulation)
    start = source.index("warn_deprecated_feature(")
    literal = source[start : source.index("\n    )", start)]
    return "".join(part.split('"')[1] for part in literal.splitlines()[1:] if '"' in part)


def test_installed_flower_notice_matches_the_filter():
    assert ("DEPRECATED FEATURE: " + run_simulation_notice()).startswith(RUN_SIMULATION_DEPRECATION)


def test_only_the_run_simulation_notice_is_dropped_and_only_inside(flwr_log):
    notice = run_simulation_notice()
    with quiet_run_simulation_deprecation():
        warn_deprecated_feature(notice)
        warn_deprecated_feature("The `other_function` function is deprecated.")
        logging.getLogger("flwr").warning("plain warning")
    assert not any(RUN_SIMULATION_DEPRECATION in m for m in flwr_log)
    assert any("`other_function`" in m for m in flwr_log) and "plain warning" in flwr_log
    flwr_log.clear()
    warn_deprecated_feature(notice)  # outside: Flower's behaviour untouched
    assert len(flwr_log) == 1 and flwr_log[0].startswith(RUN_SIMULATION_DEPRECATION)
    assert logging.getLogger("flwr").filters == []


def test_the_installed_flower_has_run_simulation():
    assert simulation_entry() is run_simulation


def test_a_flower_without_run_simulation_is_refused_in_one_line(monkeypatch):
    # A Flower release that removed the module: importing it fails, as it would there.
    monkeypatch.setitem(sys.modules, "flwr.simulation", None)
    with pytest.raises(FlowerSimulationUnavailable) as info:
        simulation_entry()
    text = str(info.value)
    assert "\n" not in text and "has no flwr.simulation.run_simulation" in text and "runtime: inline" in text


# -- which path engine: flower takes (fedsim.superlink.run) ---------------------------------
def ray_scenario(**runtime) -> Scenario:
    return Scenario.model_validate({"runtime": {"name": "ray", "engine": "flower", **runtime}})


def test_the_supported_path_unless_flower_or_its_federation_config_cannot_carry_the_scenario(monkeypatch):
    assert fallback_reason(ray_scenario(cpus_per_client=2)) is None
    assert fallback_reason(ray_scenario(cpus_per_client=0.5)).startswith(
        "runtime.cpus_per_client=0.5: Flower's federation config takes whole CPUs per client"
    )
    assert fallback_reason(ray_scenario(address="127.0.0.1:6379")).startswith(
        "runtime.address=127.0.0.1:6379: Flower's federation config has no Ray address"
    )
    # A Flower release without the SuperLink simulation runtime (the module gone, as there)
    monkeypatch.setitem(sys.modules, "flwr.simulation.app", None)
    assert fallback_reason(ray_scenario()) == (
        f"flwr {flower_version()} has no SuperLink simulation runtime "
        "(flower-superlink --simulation with a federation config)"
    )


def test_federation_config_carries_clients_and_resources_as_flower_reads_them():
    config = federation_config(ray_scenario(cpus_per_client=2, gpus_per_client=0.5), 12)
    assert config["num-supernodes"] == 12
    assert config["client-resources-num-cpus"] == 2 and isinstance(config["client-resources-num-cpus"], int)
    assert config["client-resources-num-gpus"] == 0.5
    # every key is a field of Flower's SimulationConfig (flwr run turns '-' into '_')
    sim = simulation_config_from_json({k.replace("-", "_"): v for k, v in config.items()})
    assert sim.num_supernodes == 12 and sim.client_resources_num_cpus == 2


def test_the_submitted_app_declares_no_dependencies_and_fedsims_components():
    app = tomllib.loads(APP_PYPROJECT)
    assert app["project"]["dependencies"] == []  # nothing for Flower to install
    components = app["tool"]["flwr"]["app"]["components"]
    assert isinstance(import_object(components["serverapp"]), ServerApp)
    assert isinstance(import_object(components["clientapp"]), ClientApp)
    assert set(app["tool"]["flwr"]["app"]["config"]) == {"run-dir", "scenario-json", "resume", "owner-pid", "outcome"}
