"""Checks that need registries or data: names resolve, strategy args fit, data suffices.

Each failure raises ScenarioError with ``file: dotted.key: message``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from fedsim.config import Scenario, ScenarioError
from fedsim.registry import RegistryError


def _fail(source: str, key: str, message: str) -> None:
    raise ScenarioError(f"{source}: {key}: {message}")


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


def check_strategy(scenario: Scenario, source: str) -> None:
    from flwr.serverapp.strategy import Strategy

    from strategies import STRATEGIES

    try:
        cls = STRATEGIES.get(scenario.strategy.name)
    except RegistryError as exc:
        _fail(source, "strategy.name", str(exc))
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        _fail(source, "strategy.name", f"'{scenario.strategy.name}' is not a subclass of flwr.serverapp.strategy.Strategy")
    params, accepts_any = constructor_params(cls)
    for key, value in scenario.strategy.args.items():
        if key not in params and not accepts_any:
            _fail(source, f"strategy.args.{key}", f"unknown argument of {cls.__name__}")
        if key.startswith("fraction_") and isinstance(value, (int, float)) and not 0 < value <= 1:
            _fail(source, f"strategy.args.{key}", f"must be in (0, 1] (got {value})")
        if key.startswith("min_") and isinstance(value, int) and value < 0:
            _fail(source, f"strategy.args.{key}", f"must be >= 0 (got {value})")
    if scenario.strategy.name == "fedwon" and scenario.model.normalization != "none":
        _fail(source, "model.normalization", f"FedWon needs a normalization-free model: set model.normalization: none (got {scenario.model.normalization})")
    try:
        cls(**scenario.strategy.args)
    except (TypeError, ValueError) as exc:
        _fail(source, "strategy.args", f"{cls.__name__} rejects these arguments: {str(exc).splitlines()[0]}")


def check_model(scenario: Scenario, source: str) -> None:
    from fedsim.models import MODELS

    try:
        MODELS.get(scenario.model.name)
    except RegistryError as exc:
        _fail(source, "model.name", str(exc))
    if scenario.client.batch_size == 1 and scenario.model.normalization == "bn":
        _fail(source, "client.batch_size", "1 cannot train BatchNorm; use model.normalization none/gn/ln (e.g. FedWon)")


def check_data(scenario: Scenario, source: str) -> None:
    from fedsim.data.base import DATASETS
    from fedsim.data.loading import load_dataset, partitions
    from fedsim.data.partition import PartitionError

    try:
        DATASETS.get(scenario.data.dataset)
    except RegistryError as exc:
        _fail(source, "data.dataset", str(exc))
    try:
        dataset = load_dataset(scenario.data)
    except ScenarioError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    except KeyError as exc:
        _fail(source, "data.domains", f"unknown domain {exc}")
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


def check_scenario(scenario: Scenario, source: str) -> None:
    check_model(scenario, source)
    check_strategy(scenario, source)
    check_data(scenario, source)
    if scenario.adaptation is not None:  # before training, not after it
        from fedsim.tta.experiment import check_adaptation

        check_adaptation(scenario, scenario.adaptation, source)
    if scenario.edge is not None:
        check_edge(scenario, source)


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
