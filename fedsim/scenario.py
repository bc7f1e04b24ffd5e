"""A scenario from file to a validated object, and every check that needs more than the schema.

:func:`load_scenario` reads a YAML file (bounded: :mod:`fedsim.safe_yaml`), applies
``key.sub=value`` overrides, validates the schema (:mod:`fedsim.config`) and then runs the
late checks that need registries or data: names resolve, plug-ins import and construct,
the model builds and runs one batch, the dataset loads and partitions, strategy settings fit
the real population, adaptation and edge sections name existing clients, adapters and
files, CUDA exists where asked for. Every failure is a :class:`~fedsim.schema.ScenarioError`
of one line ``file: dotted.key: message``, raised before anything is created. A run
validates its scenario once and passes the object down.

A strategy may declare its own cross-section rules as a classmethod
``check_scenario(scenario)`` raising ``ValueError("dotted.key: message")`` (FedWon's
normalization-free model).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.serverapp.strategy import Strategy
from pydantic import ValidationError
from torch import nn

from fedsim.adapters import adapter_class, adapter_settings
from fedsim.config import Scenario
from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.loading import load_dataset, num_clients, partitions
from fedsim.data.partition import PartitionError
from fedsim.engine.checkpoint import load_latest
from fedsim.engine.server import FederatedRun
from fedsim.models import MODELS, build_model
from fedsim.registry import RegistryError, constructor_params
from fedsim.results import RunFolder
from fedsim.scenario_file import apply_overrides, read_yaml
from fedsim.schema import ScenarioError, did_you_mean, fail, short_repr, short_source, validation_error_line
from fedsim.strategies import STRATEGIES
from fedsim.tracking.config import TrackingConfig
from fedsim.tracking.sinks import check_tracking
from fedsim.tta.config import CLEAN, INJECTED, AdaptationConfig
from fedsim.tta.corruptions import CORRUPTIONS
from fedsim.tta.deploy import ModelRun, ModelRunError
from fedsim.tta.streams import full_dataset


def build_scenario(raw: dict[str, Any], source: str) -> Scenario:
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(validation_error_line(source, exc, Scenario)) from None
    check_scenario(scenario, source)
    return scenario


def load_scenario(path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Scenario:
    """Read, override and validate a scenario; raise ScenarioError with one line."""
    path = Path(path)
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    return build_scenario(raw, str(path))


def adaptation_from_raw(raw: dict[str, Any], source: str) -> tuple[str, AdaptationConfig, TrackingConfig]:
    """An adapt scenario (already read and overridden) validated against the schema; return
    (name, adaptation, tracking).

    Only ``name``, ``adaptation`` and ``tracking`` are used by ``fedsim adapt`` (data, model and strategy
    come from the model run, which :func:`check_adaptation` checks it against), so the
    registry/data checks of the other sections are skipped; every key is still validated.
    """
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(validation_error_line(source, exc, Scenario)) from None
    if scenario.adaptation is None:
        raise ScenarioError(f"{source}: adaptation: required key is missing (fedsim adapt needs an adaptation section)")
    check_cuda(scenario.adaptation.device, "adaptation.device", source)  # before the model run is opened
    check_tracking(scenario.tracking, source)
    return scenario.name, scenario.adaptation, scenario.tracking


def load_adaptation_file(
    path: str | Path, overrides: list[str] | dict[str, Any] | None = None
) -> tuple[str, AdaptationConfig, TrackingConfig]:
    """Read an adapt scenario file, override and validate it (:func:`adaptation_from_raw`)."""
    path = Path(path)
    return adaptation_from_raw(apply_overrides(read_yaml(path), overrides or []), str(path))


# -- late checks ---------------------------------------------------------------------------

# Flower strategy arguments that make the server wait until that many clients connect;
# larger than the population, the run waits forever. Current names, then Flower's older ones.
MIN_NODE_ARGS = (
    "min_available_nodes",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_clients",
    "min_fit_clients",
    "min_evaluate_clients",
)
# (fraction, minimum) pairs: a round samples max(int(fraction * clients), minimum) clients.
SAMPLING_ARGS = (("fraction_train", "min_train_nodes"), ("fraction_fit", "min_fit_clients"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_finite(value: Any, key: str, source: str) -> None:
    """No infinite or NaN number anywhere in a free-form ``args``/``options`` mapping."""
    if isinstance(value, float) and not math.isfinite(value):
        fail(source, key, f"must be a finite number (got {value})")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]", source)


def _registered(registry: Any, name: str, key: str, source: str) -> Any:
    """``registry.get(name)``; a plug-in module that fails to import (any exception) is
    bad input too, reported on ``key``."""
    try:
        return registry.get(name)
    except RegistryError as exc:
        fail(source, key, str(exc))
    except Exception as exc:  # noqa: BLE001 - a user's module raised while importing
        fail(source, key, f"importing '{name}' failed: {_one_line(exc)}")


def check_strategy(scenario: Scenario, source: str, num_clients: int) -> None:
    cls = _registered(STRATEGIES, scenario.strategy.name, "strategy.name", source)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        fail(
            source, "strategy.name", f"'{scenario.strategy.name}' is not a subclass of flwr.serverapp.strategy.Strategy"
        )
    params, accepts_any = constructor_params(cls)
    check_finite(scenario.strategy.args, "strategy.args", source)
    for key, value in scenario.strategy.args.items():
        if key not in params and not accepts_any:
            fail(source, f"strategy.args.{key}", f"unknown argument of {cls.__name__}{did_you_mean(key, params)}")
        if key.startswith(("fraction_", "min_")) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            fail(source, f"strategy.args.{key}", f"must be a number (got {short_repr(value)})")
        if key.startswith("fraction_") and not 0 < value <= 1:
            fail(source, f"strategy.args.{key}", f"must be in (0, 1] (got {value})")
        if key.startswith("min_") and (not isinstance(value, int) or value < 0):
            fail(source, f"strategy.args.{key}", f"must be an integer >= 0 (got {value})")
    rule = getattr(cls, "check_scenario", None)  # a strategy's own cross-section rules (FedWon's model)
    if callable(rule):
        try:
            rule(scenario)
        except ValueError as exc:  # "dotted.key: message"
            key, _, message = str(exc).partition(": ")
            fail(source, key if message else "strategy.name", message or key)
    args = dict(scenario.strategy.args)
    if "seed" in params and "seed" not in args:
        args["seed"] = scenario.seed  # as build_strategy passes it
    try:
        strategy = cls(**args)
    except Exception as exc:  # noqa: BLE001 - any constructor error is about these arguments
        fail(source, "strategy.args", f"{cls.__name__} rejects these arguments: {_one_line(exc)}")
    check_sampling(strategy, scenario, source, num_clients)


def check_sampling(strategy: Any, scenario: Scenario, source: str, n: int) -> None:
    """Against the real population: a strategy that waits for more clients than exist
    hangs, one whose round samples no client trains nothing."""
    given = scenario.strategy.args
    for name in MIN_NODE_ARGS:
        value = getattr(strategy, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > n:
            origin = "" if name in given else f" (the default of {type(strategy).__name__}; set it)"
            fail(
                source,
                f"strategy.args.{name}",
                f"{value} is more than the run's {n} client{'s' if n != 1 else ''}: the server would wait for them forever{origin}",
            )
    for fraction, minimum in SAMPLING_ARGS:
        frac, low = getattr(strategy, fraction, None), getattr(strategy, minimum, 0)
        if isinstance(frac, (int, float)) and isinstance(low, int) and max(int(frac * n), low) == 0:
            fail(
                source,
                f"strategy.args.{fraction}",
                f"{frac} of {n} clients samples no client in a round (raise it to >= {1 / n:.3g} or set {minimum} >= 1)",
            )


def check_model(scenario: Scenario, source: str, dataset: Any) -> None:
    """Build the model as the run will (same dataset shapes, args) and run one batch."""
    m = scenario.model
    factory = _registered(MODELS, m.name, "model.name", source)
    if not callable(factory):
        fail(source, "model.name", f"'{m.name}' is not a class or function building an nn.Module")
    if scenario.client.batch_size == 1 and m.normalization == "bn":
        fail(source, "client.batch_size", "1 cannot train BatchNorm; use model.normalization none/gn/ln (e.g. FedWon)")
    check_finite(m.args, "model.args", source)
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        known = [n for n in sig.parameters if n != "self"]
        for key in m.args:
            if key not in known:
                fail(
                    source,
                    f"model.args.{key}",
                    f"unknown argument of {getattr(factory, '__name__', m.name)}{did_you_mean(key, known)}",
                )
    try:
        with warnings.catch_warnings():  # e.g. torch on zero-sized layers: the error below says it in one line
            warnings.simplefilter("ignore")
            model = build_model(
                m.name,
                dataset.num_classes,
                dataset.channels,
                dataset.image_size,
                m.normalization,
                m.args,
                seed=scenario.seed,
            )
    except Exception as exc:  # noqa: BLE001 - a factory may raise anything on bad args
        fail(source, "model.args", f"{getattr(factory, '__name__', m.name)} rejects these arguments: {_one_line(exc)}")
    if not isinstance(model, nn.Module):
        fail(source, "model.name", f"'{m.name}' returned a value of type {type(model).__name__}, not a torch nn.Module")
    if not any(True for _ in model.parameters()):
        fail(source, "model.args", f"'{m.name}' has no parameters to train")
    x = torch.zeros(2, dataset.channels, dataset.image_size, dataset.image_size)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - e.g. width 0, or an image size the model cannot take
        fail(
            source,
            "model.args",
            f"the model fails on a batch of {dataset.image_size}x{dataset.image_size} images: {_one_line(exc)}",
        )
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, dataset.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        fail(source, "model.name", f"'{m.name}' must return logits of shape [batch, {dataset.num_classes}] (got {got})")


def check_data(scenario: Scenario, source: str) -> Any:
    """Load the dataset and partition it as the run will; return the dataset."""
    _registered(DATASETS, scenario.data.dataset, "data.dataset", source)
    check_finite(scenario.data.options, "data.options", source)
    try:
        dataset = load_dataset(scenario.data)
    except ScenarioError as exc:
        raise ScenarioError(f"{short_source(source)}: {exc}") from None
    except KeyError as exc:
        fail(source, "data.domains", f"unknown domain {exc}")
    except Exception as exc:  # noqa: BLE001 - a loader (possibly a user's) failed on these settings
        fail(source, "data", f"loading {scenario.data.dataset} failed: {_one_line(exc)}")
    if not isinstance(dataset, MultiDomainDataset):
        fail(
            source,
            "data.dataset",
            f"the loader of '{scenario.data.dataset}' returned a {type(dataset).__name__}, not a fedsim.data.base.MultiDomainDataset",
        )
    if not dataset.domains:
        fail(source, "data.dataset", f"the loader of '{scenario.data.dataset}' returned no domains")
    if scenario.data.domains:
        for d in scenario.data.domains:
            if d not in dataset.domains:
                fail(source, "data.domains", f"unknown domain '{d}' (known: {', '.join(dataset.domains)})")
    try:
        parts = partitions(scenario.data, scenario.seed)
    except PartitionError as exc:
        msg = str(exc)
        key, _, rest = msg.partition(": ")
        fail(source, key if rest else "data", rest or msg)
    smallest = int(np.argmin(parts.num_train))  # the first of the smallest, without building any client
    if scenario.client.batch_size > parts.num_train[smallest]:
        fail(
            source,
            "client.batch_size",
            f"{scenario.client.batch_size} is larger than client {smallest}'s {parts.num_train[smallest]} training samples",
        )
    return dataset


def check_cuda(device: str | None, key: str, source: str) -> None:
    """``device: cuda`` needs CUDA here; without it the run would fail after starting."""
    if device == "cuda" and not torch.cuda.is_available():
        fail(source, key, "cuda, but CUDA is not available on this machine (use cpu or auto)")


def check_resources(scenario: Scenario, source: str) -> None:
    """CUDA where a section asks for it; a local Ray cluster can hold one client."""
    check_cuda(scenario.device, "device", source)
    if scenario.adaptation is not None:
        check_cuda(scenario.adaptation.device, "adaptation.device", source)
    rt = scenario.runtime
    if rt.name == "ray" and rt.address is None:  # a local cluster of this machine's resources
        cpus = os.cpu_count() or 1
        if rt.cpus_per_client > cpus:
            fail(
                source,
                "runtime.cpus_per_client",
                f"{rt.cpus_per_client:g} is more than this machine's {cpus} CPUs: Ray would never start a client",
            )
        gpus = torch.cuda.device_count()
        if rt.gpus_per_client > gpus:
            fail(
                source,
                "runtime.gpus_per_client",
                f"{rt.gpus_per_client:g} is more than this machine's {gpus} GPUs: Ray would never start a client",
            )


def check_scenario(scenario: Scenario, source: str) -> None:
    check_resources(scenario, source)
    dataset = check_data(scenario, source)
    check_model(scenario, source, dataset)
    check_strategy(scenario, source, num_clients(scenario.data))
    if scenario.adaptation is not None:  # before training, not after it
        check_adaptation(scenario, scenario.adaptation, source)
    if scenario.edge is not None:
        check_edge(scenario, source)
    check_tracking(scenario.tracking, source)


def check_edge(scenario: Scenario, source: str) -> None:
    """Device assignments name existing clients and profiles; TLS files exist."""
    edge = scenario.edge
    assert edge is not None
    n = num_clients(scenario.data)
    for cid, profile in edge.devices.items():
        if cid < 0 or cid >= n:
            fail(source, f"edge.devices.{cid}", f"client {cid} does not exist (the run has clients 0..{n - 1})")
        if profile not in edge.profiles:
            fail(
                source,
                f"edge.devices.{cid}",
                f"no profile '{profile}' in edge.profiles (profiles: {', '.join(edge.profiles)})",
            )
    if edge.tls is not None:
        base = Path(source).parent
        for key in ("ca", "cert", "key"):
            path = base / getattr(edge.tls, key)
            if not path.is_file():
                fail(source, f"edge.tls.{key}", f"file not found: {path} (make them with: fedsim edge certs DIR)")


def check_adapters(cfg: AdaptationConfig, source: str) -> None:
    """Every adapter resolves to an Adapter class and ``args`` name its settings only."""
    specs = (
        [("adaptation.adapter", cfg.adapter)]
        if cfg.adapter is not None
        else [(f"adaptation.adapters.{i}", s) for i, s in enumerate(cfg.adapters or [])]
    )
    for key, spec in specs:
        if spec is None:
            continue
        try:
            cls = adapter_class(spec.name)
        except ValueError as exc:
            fail(source, f"{key}.name", str(exc))
        except Exception as exc:  # noqa: BLE001 - a user's module raised while importing
            fail(source, f"{key}.name", f"importing '{spec.name}' failed: {_one_line(exc)}")
        known = [k for k in adapter_settings(cls) if k not in INJECTED]
        check_finite(spec.args, f"{key}.args", source)
        for setting in spec.args:
            if setting in INJECTED:
                fail(source, f"{key}.args", f"'{setting}' is set by fedsim (see adaptation.foundation), not in args")
            if setting not in known:
                fail(
                    source,
                    f"{key}.args",
                    f"unknown setting '{setting}' of adapter '{spec.name}'{did_you_mean(setting, known)} (settings: {', '.join(known) or 'none'})",
                )


def check_adaptation(scenario: Scenario, cfg: AdaptationConfig, source: str) -> None:
    """Checks that need registries or the run's data: adapters and their settings exist,
    edge ids exist, domain shifts name domains, CUDA where asked for."""
    check_cuda(cfg.device, "adaptation.device", source)
    check_adapters(cfg, source)
    n = num_clients(scenario.data)
    for e in cfg.edge_ids(n):
        if e >= n:
            fail(source, "adaptation.edges", f"client {e} does not exist (the run has clients 0..{n - 1})")
    trained = load_dataset(scenario.data)
    names = {name: None for e in cfg.edge_ids(n) for name in cfg.stream_for(e).shift_names()}
    for e in cfg.edge_streams:
        if e >= n:
            fail(source, f"adaptation.edge_streams.{e}", f"client {e} does not exist (the run has clients 0..{n - 1})")
    for name in names:
        if name == CLEAN or name.partition("@")[0] in CORRUPTIONS:
            continue
        if name not in trained.domains:
            full = full_dataset(scenario)
            if name not in full.domains:
                fail(
                    source,
                    "adaptation.stream.shifts",
                    f"'{name}' is neither corruption@severity, clean, nor a domain of {full.name} (domains: {', '.join(full.domains)})",
                )


# -- building and opening -----------------------------------------------------------------


def build_strategy(scenario: Scenario) -> Strategy:
    """The scenario's strategy, built as validation built it (strategies with their own RNG
    follow the scenario seed unless ``args`` set one)."""
    cls = STRATEGIES.get(scenario.strategy.name)
    args = dict(scenario.strategy.args)
    if "seed" in constructor_params(cls)[0] and "seed" not in args:
        args["seed"] = scenario.seed
    strategy = cls(**args)  # type: ignore[operator]
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy.name: '{scenario.strategy.name}' is not a flwr.serverapp.strategy.Strategy")
    return strategy


def new_run(
    scenario: Scenario, run: RunFolder, resume: bool = False, on_round: Callable[[dict[str, Any]], None] | None = None
) -> FederatedRun:
    """The server side of a validated scenario, handed its strategy."""
    return FederatedRun(scenario, run, lambda: build_strategy(scenario), resume=resume, on_round=on_round)


def open_run(path: str | Path, lock: bool = False) -> tuple[RunFolder, Scenario]:
    """A run folder and its ``scenario.yaml``, re-validated; ``lock``: for writing (taken
    first, so a folder another process writes is refused before any other work). Plug-in
    code comes only from import paths in that scenario; checkpoint contents are data."""
    run = RunFolder(path)
    if not run.scenario_file.exists():
        raise ScenarioError(f"{run.path}: not a fedsim run folder (no scenario.yaml)")
    if lock:
        run.lock()
    try:
        return run, build_scenario(read_yaml(run.scenario_file), str(run.scenario_file))
    except BaseException:
        run.unlock()
        raise


def open_model_run(path: str | Path) -> ModelRun:
    """A run folder with at least one complete checkpoint (else :class:`ModelRunError`)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelRunError(f"{path}: not a fedsim run folder (no such folder)")
    if not (path / "scenario.yaml").is_file():
        raise ModelRunError(f"{path}: not a fedsim run folder (no scenario.yaml)")
    run, scenario = open_run(path)
    ckpt = load_latest(run.checkpoints)
    if ckpt is None:
        raise ModelRunError(f"{path}: run has no complete checkpoint (train it first, or fedsim run --resume {path})")
    return ModelRun(run, scenario, ckpt)
