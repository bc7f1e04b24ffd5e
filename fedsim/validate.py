"""Checks that need registries or data: names resolve, strategy args fit, data suffices.

Each failure raises ScenarioError with ``file: dotted.key: message``.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from pathlib import Path
from typing import Any

from fedsim.config import Scenario, ScenarioError, short_repr, short_source
from fedsim.registry import RegistryError
from fedsim.section import did_you_mean
from fedsim.tracking.sinks import check_tracking

# Flower strategy arguments that make the server wait until that many clients connect;
# larger than the population, the run waits forever. Current names, then Flower's older ones.
MIN_NODE_ARGS = ("min_available_nodes", "min_train_nodes", "min_evaluate_nodes", "min_available_clients", "min_fit_clients", "min_evaluate_clients")
# (fraction, minimum) pairs: a round samples max(int(fraction * clients), minimum) clients.
SAMPLING_ARGS = (("fraction_train", "min_train_nodes"), ("fraction_fit", "min_fit_clients"))


def _fail(source: str, key: str, message: str) -> None:
    raise ScenarioError(f"{short_source(source)}: {key}: {message}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_finite(value: Any, key: str, source: str) -> None:
    """No infinite or NaN number anywhere in a free-form ``args``/``options`` mapping."""
    if isinstance(value, float) and not math.isfinite(value):
        _fail(source, key, f"must be a finite number (got {value})")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, f"{key}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]", source)


def constructor_params(cls: type) -> tuple[set[str], bool]:
    """Keyword names a class's constructor accepts, following ``**kwargs`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = inspect.signature(klass.__init__).parameters
        names.update(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return names, False
    return names, True


def _registered(registry: Any, name: str, key: str, source: str) -> Any:
    """``registry.get(name)``; a plug-in module that fails to import (any exception) is
    bad input too, reported on ``key``."""
    try:
        return registry.get(name)
    except RegistryError as exc:
        _fail(source, key, str(exc))
    except Exception as exc:  # noqa: BLE001 - a user's module raised while importing
        _fail(source, key, f"importing '{name}' failed: {_one_line(exc)}")


def check_strategy(scenario: Scenario, source: str, num_clients: int) -> None:
    from flwr.serverapp.strategy import Strategy

    from strategies import STRATEGIES

    cls = _registered(STRATEGIES, scenario.strategy.name, "strategy.name", source)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        _fail(source, "strategy.name", f"'{scenario.strategy.name}' is not a subclass of flwr.serverapp.strategy.Strategy")
    params, accepts_any = constructor_params(cls)
    check_finite(scenario.strategy.args, "strategy.args", source)
    for key, value in scenario.strategy.args.items():
        if key not in params and not accepts_any:
            _fail(source, f"strategy.args.{key}", f"unknown argument of {cls.__name__}{did_you_mean(key, params)}")
        if key.startswith(("fraction_", "min_")) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            _fail(source, f"strategy.args.{key}", f"must be a number (got {short_repr(value)})")
        if key.startswith("fraction_") and not 0 < value <= 1:
            _fail(source, f"strategy.args.{key}", f"must be in (0, 1] (got {value})")
        if key.startswith("min_") and (not isinstance(value, int) or value < 0):
            _fail(source, f"strategy.args.{key}", f"must be an integer >= 0 (got {value})")
    if scenario.strategy.name == "fedwon" and scenario.model.normalization != "none":
        _fail(source, "model.normalization", f"FedWon needs a normalization-free model: set model.normalization: none (got {scenario.model.normalization})")
    args = dict(scenario.strategy.args)
    if "seed" in params and "seed" not in args:
        args["seed"] = scenario.seed  # as fedsim.engine.server.build_strategy passes it
    try:
        strategy = cls(**args)
    except Exception as exc:  # noqa: BLE001 - any constructor error is about these arguments
        _fail(source, "strategy.args", f"{cls.__name__} rejects these arguments: {_one_line(exc)}")
    check_sampling(strategy, scenario, source, num_clients)


def check_sampling(strategy: Any, scenario: Scenario, source: str, n: int) -> None:
    """Against the real population: a strategy that waits for more clients than exist
    hangs, one whose round samples no client trains nothing."""
    given = scenario.strategy.args
    for name in MIN_NODE_ARGS:
        value = getattr(strategy, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > n:
            origin = "" if name in given else f" (the default of {type(strategy).__name__}; set it)"
            _fail(source, f"strategy.args.{name}", f"{value} is more than the run's {n} client{'s' if n != 1 else ''}: the server would wait for them forever{origin}")
    for fraction, minimum in SAMPLING_ARGS:
        frac, low = getattr(strategy, fraction, None), getattr(strategy, minimum, 0)
        if isinstance(frac, (int, float)) and isinstance(low, int) and max(int(frac * n), low) == 0:
            _fail(source, f"strategy.args.{fraction}", f"{frac} of {n} clients samples no client in a round (raise it to >= {1 / n:.3g} or set {minimum} >= 1)")


def check_model(scenario: Scenario, source: str, dataset: Any) -> None:
    """Build the model as the run will (same dataset shapes, args) and run one batch."""
    import torch
    from torch import nn

    from fedsim.models import MODELS, build_model

    m = scenario.model
    factory = _registered(MODELS, m.name, "model.name", source)
    if not callable(factory):
        _fail(source, "model.name", f"'{m.name}' is not a class or function building an nn.Module")
    if scenario.client.batch_size == 1 and m.normalization == "bn":
        _fail(source, "client.batch_size", "1 cannot train BatchNorm; use model.normalization none/gn/ln (e.g. FedWon)")
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
                _fail(source, f"model.args.{key}", f"unknown argument of {getattr(factory, '__name__', m.name)}{did_you_mean(key, known)}")
    try:
        with warnings.catch_warnings():  # e.g. torch on zero-sized layers: the error below says it in one line
            warnings.simplefilter("ignore")
            model = build_model(m.name, dataset.num_classes, dataset.channels, dataset.image_size, m.normalization, m.args, seed=scenario.seed)
    except Exception as exc:  # noqa: BLE001 - a factory may raise anything on bad args
        _fail(source, "model.args", f"{getattr(factory, '__name__', m.name)} rejects these arguments: {_one_line(exc)}")
    if not isinstance(model, nn.Module):
        _fail(source, "model.name", f"'{m.name}' returned a value of type {type(model).__name__}, not a torch nn.Module")
    if not any(True for _ in model.parameters()):
        _fail(source, "model.args", f"'{m.name}' has no parameters to train")
    x = torch.zeros(2, dataset.channels, dataset.image_size, dataset.image_size)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - e.g. width 0, or an image size the model cannot take
        _fail(source, "model.args", f"the model fails on a batch of {dataset.image_size}x{dataset.image_size} images: {_one_line(exc)}")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, dataset.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        _fail(source, "model.name", f"'{m.name}' must return logits of shape [batch, {dataset.num_classes}] (got {got})")


def check_data(scenario: Scenario, source: str) -> Any:
    """Load the dataset and partition it as the run will; return the dataset."""
    from fedsim.data.base import DATASETS, MultiDomainDataset
    from fedsim.data.loading import load_dataset, partitions
    from fedsim.data.partition import PartitionError

    _registered(DATASETS, scenario.data.dataset, "data.dataset", source)
    check_finite(scenario.data.options, "data.options", source)
    try:
        dataset = load_dataset(scenario.data)
    except ScenarioError as exc:
        raise ScenarioError(f"{short_source(source)}: {exc}") from None
    except KeyError as exc:
        _fail(source, "data.domains", f"unknown domain {exc}")
    except Exception as exc:  # noqa: BLE001 - a loader (possibly a user's) failed on these settings
        _fail(source, "data", f"loading {scenario.data.dataset} failed: {_one_line(exc)}")
    if not isinstance(dataset, MultiDomainDataset):
        _fail(source, "data.dataset", f"the loader of '{scenario.data.dataset}' returned a {type(dataset).__name__}, not a fedsim.data.base.MultiDomainDataset")
    if not dataset.domains:
        _fail(source, "data.dataset", f"the loader of '{scenario.data.dataset}' returned no domains")
    if scenario.data.domains:
        for d in scenario.data.domains:
            if d not in dataset.domains:
                _fail(source, "data.domains", f"unknown domain '{d}' (known: {', '.join(dataset.domains)})")
    try:
        parts = partitions(scenario.data, scenario.seed)
    except PartitionError as exc:
        msg = str(exc)
        key, _, rest = msg.partition(": ")
        _fail(source, key if rest else "data", rest or msg)
    smallest = min(parts, key=lambda p: p.num_train)
    if scenario.client.batch_size > smallest.num_train:
        _fail(source, "client.batch_size", f"{scenario.client.batch_size} is larger than client {smallest.client_id}'s {smallest.num_train} training samples")
    return dataset


def check_cuda(device: str | None, key: str, source: str) -> None:
    """``device: cuda`` needs CUDA here; without it the run would fail after starting."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        _fail(source, key, "cuda, but CUDA is not available on this machine (use cpu or auto)")


def check_resources(scenario: Scenario, source: str) -> None:
    """CUDA where a section asks for it; a local Ray cluster can hold one client."""
    import torch

    check_cuda(scenario.device, "device", source)
    if scenario.adaptation is not None:
        check_cuda(scenario.adaptation.device, "adaptation.device", source)
    rt = scenario.runtime
    if rt.name == "ray" and rt.address is None:  # a local cluster of this machine's resources
        cpus = os.cpu_count() or 1
        if rt.cpus_per_client > cpus:
            _fail(source, "runtime.cpus_per_client", f"{rt.cpus_per_client:g} is more than this machine's {cpus} CPUs: Ray would never start a client")
        gpus = torch.cuda.device_count()
        if rt.gpus_per_client > gpus:
            _fail(source, "runtime.gpus_per_client", f"{rt.gpus_per_client:g} is more than this machine's {gpus} GPUs: Ray would never start a client")


def check_scenario(scenario: Scenario, source: str) -> None:
    check_resources(scenario, source)
    dataset = check_data(scenario, source)
    check_model(scenario, source, dataset)
    check_strategy(scenario, source, scenario.num_clients)
    if scenario.adaptation is not None:  # before training, not after it
        from fedsim.tta.experiment import check_adaptation

        check_adaptation(scenario, scenario.adaptation, source)
    if scenario.edge is not None:
        check_edge(scenario, source)
    check_tracking(scenario.tracking, source)


def check_out_folder(out: str | Path, option: str = "--out") -> None:
    """The folder a command will create or fill: not a file, not under a file, and in a
    writable place. Checked before anything is created."""
    shown = short_source(str(out))
    if "\0" in str(out):
        raise ScenarioError(f"{option} {shown}: a path must not contain a NUL byte")
    path = Path(out)
    try:
        if path.exists() and not path.is_dir():
            raise ScenarioError(f"{option} {shown}: is a file, not a folder")
        existing = path
        while not existing.exists():
            if existing.is_symlink():  # a dangling link: mkdir would fail on it
                raise ScenarioError(f"{option} {shown}: {existing} is a broken symbolic link")
            existing = existing.parent
        if not existing.is_dir():
            raise ScenarioError(f"{option} {shown}: {existing} is a file, so no folder can be made under it")
        readonly = bool(os.statvfs(existing).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
        if readonly or not os.access(existing, os.W_OK | os.X_OK):
            raise ScenarioError(f"{option} {shown}: {existing} is not writable")
    except OSError as exc:  # e.g. a name too long for the file system
        raise ScenarioError(f"{option} {shown}: {exc.strerror or exc}") from None


def check_edge(scenario: Scenario, source: str) -> None:
    """Device assignments name existing clients and profiles; TLS files exist."""
    edge = scenario.edge
    assert edge is not None
    n = scenario.num_clients
    for cid, profile in edge.devices.items():
        if cid < 0 or cid >= n:
            _fail(source, f"edge.devices.{cid}", f"client {cid} does not exist (the run has clients 0..{n - 1})")
        if profile not in edge.profiles:
            _fail(source, f"edge.devices.{cid}", f"no profile '{profile}' in edge.profiles (profiles: {', '.join(edge.profiles)})")
    if edge.tls is not None:
        base = Path(source).parent
        for key in ("ca", "cert", "key"):
            path = base / getattr(edge.tls, key)
            if not path.is_file():
                _fail(source, f"edge.tls.{key}", f"file not found: {path} (make them with: fedsim edge certs DIR)")
