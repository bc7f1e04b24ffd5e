"""``fedsim run`` on the Ray pool engine starts Ray before its own imports.

The run command's module imports torch, Flower and the registries (about 2 s of one core), then
validates the scenario, loads the data and builds the driver's client runtime; on a small
machine, Ray's start (its daemons, then each worker's imports) costs more CPU than a round
lasts. :func:`prestart_ray` reads only the scenario file's schema (light modules), and when it
names ``runtime: ray`` with the pool engine it starts :class:`fedsim.engine.ray_start.RayStart`
in the background, so Ray starts on the other cores while the command imports and validates.

It never reports anything: a file it cannot read or validate is left to the full validation,
which gives the one-line error; whoever prestarted closes the RayStart (Ray is shut down and
nothing of it is left when the command ends, used or not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsim.config import Scenario
from fedsim.engine.ray_start import RayStart
from fedsim.scenario_file import apply_overrides, read_yaml


def prestart_ray(args: argparse.Namespace) -> RayStart | None:
    """A :class:`RayStart` for the runtime of ``fedsim run``'s scenario (``args.scenario``
    with ``args.overrides``, or ``--resume``'s saved ``scenario.yaml``) when it is the Ray pool
    engine; None otherwise, or when the scenario is not valid."""
    try:
        if args.resume:
            raw = read_yaml(Path(args.resume) / "scenario.yaml")
        elif args.scenario:
            raw = apply_overrides(read_yaml(Path(args.scenario)), list(args.overrides))
        else:
            return None
        runtime = Scenario.model_validate(raw).runtime
    except Exception:  # noqa: BLE001 - the full validation reports it, in one line
        return None
    if runtime.name != "ray" or runtime.engine != "pool":
        return None
    try:
        return RayStart(runtime)
    except RuntimeError:  # no thread could be started: the run's pool tries again and reports it
        return None


__all__ = ["prestart_ray"]
