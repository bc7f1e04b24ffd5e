"""Scenario schema: one YAML file describes a whole experiment.

Every section is a pydantic model with ``extra="forbid"``, so unknown keys, wrong types
and out-of-range values are errors. :func:`load_scenario` turns any such error into a
:class:`ScenarioError` whose message names the file and the dotted key path, e.g.
``scenarios/x.yaml: strategy.args.fraction_train: must be in (0, 1]``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedsim.edge.config import EdgeConfig
from fedsim.tta.config import AdaptationConfig


class ScenarioError(ValueError):
    """Bad input in a scenario file or an override; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(Section):
    """Where clients run. ``inline``: in-process, one after another. ``ray``: Flower's
    simulation engine on Ray (``address`` joins an existing cluster, e.g. ``auto``)."""

    name: Literal["inline", "ray"] = "inline"
    cpus_per_client: float = Field(1.0, gt=0)
    gpus_per_client: float = Field(0.0, ge=0)
    address: str | None = None
    # One torch thread per client process by default: on a busy 2-core machine two threads
    # per process ran ~35x slower (spin-waiting), and equal thread counts keep the inline
    # and Ray runtimes bit-identical. Raise it for big models on an idle machine.
    num_threads: int = Field(1, ge=1, description="torch threads per client process")

    @field_validator("num_threads", mode="before")
    @classmethod
    def _default_threads(cls, value: Any) -> Any:
        return 1 if value is None else value  # run folders written before the default was 1


class DataConfig(Section):
    """Dataset and partition of it into clients.

    partition: ``by-domain`` (each client holds one domain, ``clients_per_domain`` each),
    ``dirichlet`` (label skew with concentration ``alpha`` within each domain),
    ``iid`` (uniform shards within each domain), and flwr-datasets' partitioners under
    their names, applied within each domain (``fedsim/data/partitioners.py``):
    ``pathological`` (``num_classes_per_partition``, ``class_assignment_mode``), ``shard``
    (``num_shards_per_partition``, ``shard_size``, ``keep_incomplete_shard``), quantity skew
    ``linear`` / ``square`` / ``exponential`` and ``size`` (``partition_sizes``).
    A parameter of another partition than the chosen one is an error, not ignored.
    """

    dataset: str = "digits5"
    root: str | None = Field(None, description="folder of a downloaded dataset")
    download: bool = False
    domains: list[str] | None = None
    image_size: int = Field(28, ge=8, le=512)
    clients_per_domain: int = Field(1, ge=1)
    partition: Literal["by-domain", "dirichlet", "iid", "pathological", "shard", "linear", "square", "exponential", "size"] = "by-domain"
    alpha: float = Field(0.5, gt=0)
    num_classes_per_partition: int | None = Field(None, ge=1, validate_default=True, description="pathological: exact number of classes per client")
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] | None = Field(None, validate_default=True, description="pathological: how classes are dealt (default random)")
    num_shards_per_partition: int | None = Field(None, ge=1, validate_default=True, description="shard: shards per client")
    shard_size: int | None = Field(None, ge=1, validate_default=True, description="shard: samples per shard")
    keep_incomplete_shard: bool | None = Field(None, validate_default=True, description="shard: deal out the shorter last shard too (default false)")
    partition_sizes: list[int] | None = Field(None, validate_default=True, description="size: train-pool samples of each client of a domain")
    samples_per_client: int | None = Field(None, ge=1, description="cap on train samples per client")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="client's own test split")
    domain_test_samples: int | None = Field(None, ge=1, description="cap on each domain's global test set")
    options: dict[str, Any] = Field(default_factory=dict, description="loader-specific settings")

    @field_validator("num_classes_per_partition", "class_assignment_mode", "num_shards_per_partition", "shard_size", "keep_incomplete_shard", "partition_sizes")
    @classmethod
    def _partition_parameter(cls, value: Any, info: ValidationInfo) -> Any:
        # A parameter of a partition other than the chosen one would be silently ignored.
        partition = info.data.get("partition")
        if partition is None:  # partition itself is invalid: that error is reported
            return value
        owner = _PARTITION_PARAMETERS[info.field_name]
        if value is not None and partition != owner:
            raise ValueError(f"only used by partition {owner} (partition is {partition})")
        if value is None and partition == owner:
            if info.field_name == "num_classes_per_partition":
                raise ValueError("required by partition pathological")
            if info.field_name == "shard_size" and info.data.get("num_shards_per_partition") is None:
                raise ValueError("partition shard needs data.shard_size, data.num_shards_per_partition or both")
            if info.field_name == "partition_sizes":
                raise ValueError("required by partition size (one size per client of a domain)")
        if info.field_name == "partition_sizes" and value is not None and (not value or any(s < 1 for s in value)):
            raise ValueError(f"must be a non-empty list of sizes >= 1 (got {value})")
        return value


_PARTITION_PARAMETERS = {"num_classes_per_partition": "pathological", "class_assignment_mode": "pathological", "num_shards_per_partition": "shard", "shard_size": "shard", "keep_incomplete_shard": "shard", "partition_sizes": "size"}


class ModelConfig(Section):
    name: str = "cnn-small"
    normalization: Literal["bn", "gn", "ln", "none"] = "bn"
    args: dict[str, Any] = Field(default_factory=dict)


class ClientConfig(Section):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, ge=1)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="fixed number of steps instead of epochs")
    drop_last: bool = False
    agc_lambda: float | None = Field(None, ge=0, description="adaptive gradient clipping factor for any strategy (FedWon's AGC)")


class StrategyConfig(Section):
    """``name``: a registered strategy or an import path ``package.module:Class`` of any
    subclass of ``flwr.serverapp.strategy.Strategy``; ``args`` go to its constructor."""

    name: str = "fedavg"
    args: dict[str, Any] = Field(default_factory=dict)


class EvaluationConfig(Section):
    every: int = Field(1, ge=1, description="evaluate every N rounds (and always the last)")
    per_client: bool = True
    per_domain: bool = True


class FaultConfig(Section):
    """Fault injection, for studying robustness."""

    failure_prob: float = Field(0.0, ge=0, le=1)
    nan_prob: float = Field(0.0, ge=0, le=1)
    bad_shape_prob: float = Field(0.0, ge=0, le=1, description="reply with a wrongly shaped array")
    straggler_prob: float = Field(0.0, ge=0, le=1)
    straggler_delay_s: float = Field(0.0, ge=0)
    min_success_fraction: float = Field(0.5, gt=0, le=1)
    max_round_retries: int = Field(1, ge=0)
    client_timeout_s: float | None = Field(None, gt=0)


class Scenario(Section):
    name: str = "experiment"
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    adaptation: AdaptationConfig | None = Field(None, description="test-time adaptation after training (docs/tta.md)")
    edge: EdgeConfig | None = Field(None, description="the edge demo on Flower's deployment runtime (docs/edge.md)")

    @field_validator("name")
    @classmethod
    def _name_is_one_path_component(cls, value: str) -> str:
        # the name becomes a folder (runs/<name>, runs/<name>-edge, adapt-<name>): it must
        # never reach outside runs/ or name runs/ itself
        if not value.strip():
            raise ValueError("must not be empty")
        if len(value) > 100:
            raise ValueError(f"at most 100 characters (got {len(value)})")
        if value in (".", "..") or any(c in value for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"must be one folder name: no '/', '\\', control characters, '.' or '..' (got {value!r})")
        return value

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime_shorthand(cls, value: Any) -> Any:
        # `runtime: ray` is shorthand for `runtime: {name: ray}`
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.device == "cuda" and self.runtime.name == "ray" and self.runtime.gpus_per_client == 0:
            raise ValueError("runtime.gpus_per_client: must be > 0 when device is cuda on ray")
        return self

    @property
    def num_clients(self) -> int:
        from fedsim.data.partition import count_clients

        return count_clients(self)


# --------------------------------------------------------------------------------------
# Loading, overrides and error messages


def _format_location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts) if parts else "(top level)"


def _format_message(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        return f"must be {op} {bound} (got {err.get('input')!r})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {err.get('input')!r})"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{msg} (got {err.get('input')!r})" if "input" in err and kind.endswith("_type") else msg


def validation_error_line(source: str, exc: ValidationError) -> str:
    """The first error of a pydantic ValidationError as ``file: dotted.key: message``."""
    err = exc.errors()[0]
    message = _format_message(err)
    loc = _format_location(err["loc"])
    if loc == "(top level)" and ": " in message and message.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum():
        loc, message = message.split(": ", 1)
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {loc}: {message}{suffix}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ScenarioError(f"override '{text}': expected key.sub=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part == "runtime":
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ScenarioError(f"override '{text}': '{part}' is not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    if not path.exists():
        raise ScenarioError(f"{source}: file not found")
    if path.is_dir():
        raise ScenarioError(f"{source}: is a folder, expected a scenario YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"{source}: {where}YAML syntax error: {problem}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{source}: not a text file") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: (top level): expected a mapping of sections, got {type(raw).__name__}")
    return raw


def build_scenario(raw: dict[str, Any], source: str) -> Scenario:
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(validation_error_line(source, exc)) from None
    # Late checks that need registries (names, strategy args, data sizes).
    from fedsim.validate import check_scenario

    check_scenario(scenario, source)
    return scenario


def load_scenario(path: str | Path, overrides: list[str] | None = None) -> Scenario:
    """Read, override and validate a scenario; raise ScenarioError with one line."""
    path = Path(path)
    raw = read_yaml(path)
    raw = apply_overrides(raw, overrides or [])
    return build_scenario(raw, str(path))


def scenario_to_yaml(scenario: Scenario) -> str:
    return yaml.safe_dump(json.loads(scenario.model_dump_json()), sort_keys=False)
