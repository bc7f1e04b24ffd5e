"""``flwr.simulation.run_simulation``: the in-process fallback of fedsim's ``ray`` runtime.

Recent Flower (1.42 here) marks ``run_simulation`` deprecated in favour of ``flwr run`` against a
SuperLink started with ``flower-superlink --simulation``, which ``runtime: ray`` takes by default
(:mod:`fedsim.superlink.run`). That path runs the very same engine (its ``flwr-simulation``
process calls the function ``run_simulation`` wraps), fed through a ``SimulationConfig`` that
cannot carry everything: fractional ``cpus_per_client`` (its CPU count is an integer) and a Ray
cluster to join (no address). For those scenarios, and on a Flower without that path,
:func:`fedsim.superlink.run.run_flower` falls back to this module (one INFO line saying why).

Here fedsim drops exactly one log record: Flower's "DEPRECATED FEATURE: The `run_simulation`
function is deprecated" warning, which would tell every user to change something they do not
call (and breaks the progress bar's line). Every other Flower message, deprecation notices
included, still reaches the user. A Flower without ``run_simulation`` is refused with one line
naming the installed version.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

# The start of the one record dropped (flwr.supercore.logger.warn_deprecated_feature's
# format with run_simulation's own text, as flwr 1.42 logs it).
RUN_SIMULATION_DEPRECATION = "DEPRECATED FEATURE: The `run_simulation` function is deprecated"
FLOWER_LOGGER = "flwr"


class FlowerSimulationUnavailable(RuntimeError):
    """The installed Flower has no ``flwr.simulation.run_simulation`` (one line)."""


class _SimulationEntry(Protocol):
    def __call__(
        self, server_app: ServerApp, client_app: ClientApp, num_supernodes: int, backend_config: dict[str, Any]
    ) -> None: ...


class DropRunSimulationDeprecation(logging.Filter):
    """Drops Flower's deprecation warning of ``run_simulation``, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.getMessage().startswith(RUN_SIMULATION_DEPRECATION))


@contextmanager
def quiet_run_simulation_deprecation() -> Iterator[None]:
    """While inside, Flower's logger drops the ``run_simulation`` deprecation warning.

    A filter on the ``flwr`` logger itself (Flower logs through it directly), so it holds
    whatever handlers Flower or the user attach; removed on exit."""
    logger = logging.getLogger(FLOWER_LOGGER)
    quiet = DropRunSimulationDeprecation()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def flower_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "unknown"


def simulation_entry() -> _SimulationEntry:
    """``flwr.simulation.run_simulation``, or a one-line error when this Flower lacks it."""
    try:
        from flwr.simulation import run_simulation  # Ray comes with it: only for this runtime
    except ImportError as exc:
        raise FlowerSimulationUnavailable(
            f"runtime ray: flwr {flower_version()} has no flwr.simulation.run_simulation ({exc}); "
            "install a Flower release in fedsim's supported range (pyproject.toml) or use runtime: inline"
        ) from None
    return run_simulation


def run_flower_simulation(
    server_app: ServerApp, client_app: ClientApp, num_supernodes: int, backend_config: dict[str, Any]
) -> None:
    """Flower's simulation engine (Ray backend) in this process, without its deprecation notice."""
    run_simulation = simulation_entry()
    with quiet_run_simulation_deprecation():
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend_config
        )


__all__ = [
    "RUN_SIMULATION_DEPRECATION",
    "DropRunSimulationDeprecation",
    "FlowerSimulationUnavailable",
    "flower_version",
    "quiet_run_simulation_deprecation",
    "run_flower_simulation",
    "simulation_entry",
]
