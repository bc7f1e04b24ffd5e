"""Scenario schema: one YAML file describes a whole experiment.

Every section is a pydantic model with ``extra="forbid"``, so unknown keys, wrong types
and out-of-range values are errors. :func:`load_scenario` turns any such error into a
:class:`ScenarioError` whose message names the file and the dotted key path, e.g.
``scenarios/x.yaml: strategy.args.fraction_train: must be in (0, 1]``.
"""

from __future__ import annotations

import copy
import json
import os
import reprlib
import stat
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fedsim import safe_yaml
from fedsim.edge.config import EdgeConfig
from fedsim.section import Section, did_you_mean
from fedsim.tracking.config import TrackingConfig
from fedsim.tta.config import AdaptationConfig

MAX_MESSAGE = 400
"""Characters of an error message; longer ones end in ``...`` (values can be huge)."""

MAX_SEED = 2**64 - 1
"""torch.manual_seed takes 64 bits."""

MAX_PATH = 4096


class ScenarioError(ValueError):
    """Bad input in a scenario file or an override; the message is one line of at most
    :data:`MAX_MESSAGE` characters."""

    def __init__(self, message: object = "") -> None:
        text = " ".join(str(message).split("\n"))
        if len(text) > MAX_MESSAGE:
            text = text[: MAX_MESSAGE - 3] + "..."
        super().__init__(text)


_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 60, 60, 6, 6, 3


def short_repr(value: Any) -> str:
    """``repr`` bounded in length and depth, for echoing user input in a message."""
    return _repr.repr(value)


def check_path_text(value: str | None) -> str | None:
    """A path given in a scenario: no NUL byte, not absurdly long."""
    if value is None:
        return value
    if "\0" in value:
        raise ValueError("a path must not contain a NUL byte")
    if len(value) > MAX_PATH:
        raise ValueError(f"a path of {len(value)} characters (at most {MAX_PATH})")
    return value


class RuntimeConfig(Section):
    """Where clients run. ``inline``: in-process, one after another. ``ray``: Flower's
    simulation engine on Ray (``address`` joins an existing cluster, e.g. ``auto``)."""

    name: Literal["inline", "ray"] = "inline"
    # Upper bounds: no machine has more; a local Ray cluster is also checked against this
    # machine's CPUs and GPUs (fedsim.validate), since Ray waits forever for resources.
    cpus_per_client: float = Field(1.0, gt=0, le=1024)
    gpus_per_client: float = Field(0.0, ge=0, le=64)
    address: str | None = None
    # One torch thread per client process by default: on a busy 2-core machine two threads
    # per process ran ~35x slower (spin-waiting), and equal thread counts keep the inline
    # and Ray runtimes bit-identical. Raise it for big models on an idle machine.
    num_threads: int = Field(1, ge=1, le=1024, description="torch threads per client process")

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

    @field_validator("root")
    @classmethod
    def _root(cls, value: str | None) -> str | None:
        return check_path_text(value)

    @field_validator("domains")
    @classmethod
    def _domains(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one domain, or leave domains out for all of them")
        dup = sorted({d for d in value if value.count(d) > 1})
        if dup:
            raise ValueError(f"domains must be distinct (repeated: {', '.join(dup)})")
        return value

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
    seed: int = Field(0, ge=0, le=MAX_SEED)
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
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard / MLflow / W&B sinks (README, Tracking)")

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


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The section class inside ``X``, ``X | None``, ``dict[k, X]`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, Annotated, list, dict):
        for arg in get_args(annotation):
            found = _section_class(arg)
            if found is not None:
                return found
    return None


def known_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """The keys the section at ``loc`` (a pydantic error location) accepts."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if cls is None:
            return []
        field = cls.model_fields.get(str(part))
        if field is None:
            continue  # a dict key or list index between sections
        cls = _section_class(field.annotation)
    return list(cls.model_fields) if cls is not None else []


def _format_message(err: dict[str, Any], root: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + did_you_mean(str(err["loc"][-1]), known_keys(tuple(err["loc"][:-1]), root))
    if kind == "missing":
        return "required key is missing"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {op} {bound} (got {short_repr(err.get('input'))})"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {short_repr(err.get('input'))})"
    if kind == "finite_number":
        return f"must be a finite number (got {short_repr(err.get('input'))})"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{msg} (got {short_repr(err.get('input'))})" if "input" in err and kind.endswith("_type") else msg


def validation_error_line(source: str, exc: ValidationError, root: type[BaseModel] | None = None) -> str:
    """The first error of a pydantic ValidationError as ``file: dotted.key: message``."""
    err = exc.errors()[0]
    message = _format_message(err, root or Scenario)
    loc = _format_location(err["loc"])
    if loc == "(top level)" and ": " in message and message.split(": ", 1)[0].replace(".", "").replace("_", "").isalnum():
        loc, message = message.split(": ", 1)
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{short_source(source)}: {loc}: {message}{suffix}"


def short_source(source: str) -> str:
    """A file name fit for a one-line message (names can be 4096 characters)."""
    text = source.replace("\n", " ").replace("\0", "\\0")
    return text if len(text) <= 200 else text[:197] + "..."


MAX_OVERRIDE = 10_000


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars
    under the same bounds as a scenario file (:mod:`fedsim.safe_yaml`)."""
    shown = short_repr(text)[1:-1]
    if len(text) > MAX_OVERRIDE:
        raise ScenarioError(f"override '{shown}': longer than {MAX_OVERRIDE} characters")
    if "=" not in text:
        raise ScenarioError(f"override '{shown}': expected key.sub=value")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ScenarioError(f"override '{shown}': empty key")
    try:
        value = safe_yaml.load(raw) if raw.strip() else ""
    except safe_yaml.YAMLInputError as exc:
        raise ScenarioError(f"override '{shown}': {exc}") from None
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
                raise ScenarioError(f"override '{short_repr(text)[1:-1]}': '{part}' is not a section")
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def read_text_file(path: Path) -> str:
    """The text of a regular file of at most safe_yaml.MAX_BYTES; ScenarioError (one
    line naming the file) for anything else. A FIFO, device or folder is refused before it
    is read (reading a FIFO would block forever)."""
    source = short_source(str(path))
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ScenarioError(f"{source}: file not found") from None
    except ValueError:  # embedded NUL byte
        raise ScenarioError(f"{source}: a file name must not contain a NUL byte") from None
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ScenarioError(f"{source}: is a folder, expected a scenario YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise ScenarioError(f"{source}: not a regular file (a FIFO, socket or device); expected a scenario YAML file")
    if info.st_size > safe_yaml.MAX_BYTES:
        raise ScenarioError(f"{source}: larger than {safe_yaml.MAX_BYTES // 1_000_000} MB; a scenario is a small text file")
    try:
        # O_NONBLOCK: should the path have become a FIFO since the stat, open does not block
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ScenarioError(f"{source}: not a regular file; expected a scenario YAML file")
        try:
            data = fh.read(safe_yaml.MAX_BYTES + 1)
        except OSError as exc:
            raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    if len(data) > safe_yaml.MAX_BYTES:
        raise ScenarioError(f"{source}: larger than {safe_yaml.MAX_BYTES // 1_000_000} MB; a scenario is a small text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ScenarioError(f"{source}: not a UTF-8 text file") from None


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    source = short_source(str(path))
    text = read_text_file(path)
    try:
        raw = safe_yaml.load(text)
    except safe_yaml.YAMLInputError as exc:
        raise ScenarioError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError(f"{source}: {where}YAML syntax error: {problem}") from None
    if raw is None:
        raise ScenarioError(f"{source}: the file is empty (or only comments); a scenario needs at least one section")
    if not isinstance(raw, dict):
        raise ScenarioError(f"{source}: (top level): expected a mapping of sections, got {type(raw).__name__}")
    return raw


def build_scenario(raw: dict[str, Any], source: str) -> Scenario:
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(validation_error_line(source, exc)) from None
    # Late checks that need registries (names, strategy args, data sizes).
    from fedsim.validate import check_scenario  # fedsim.validate imports this module

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
