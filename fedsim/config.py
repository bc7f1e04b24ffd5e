"""The scenario's root schema: one YAML file describes a whole experiment.

Every section is a :class:`fedsim.schema.Section` (pydantic, ``extra="forbid"``), so unknown
keys, wrong types and out-of-range values are errors. This module only declares the
sections: reading a file, applying overrides and the checks that need registries or data
are :mod:`fedsim.scenario`'s.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from fedsim.data.config import DataConfig
from fedsim.edge.config import EdgeConfig
from fedsim.schema import MAX_SEED, ScenarioError, Section
from fedsim.tracking.config import TrackingConfig
from fedsim.tta.config import AdaptationConfig

__all__ = [
    "MAX_SEED",
    "AdaptationConfig",
    "ClientConfig",
    "DataConfig",
    "EdgeConfig",
    "EvaluationConfig",
    "FaultConfig",
    "ModelConfig",
    "RuntimeConfig",
    "Scenario",
    "ScenarioError",
    "StrategyConfig",
]


class RuntimeConfig(Section):
    """Where clients run. ``inline``: in-process, one after another. ``ray``: on Ray, by the
    engine ``engine`` names (``address`` joins an existing cluster, e.g. ``auto``)."""

    name: Literal["inline", "ray"] = "inline"
    # Which engine runs the clients under ``name: ray``. ``pool`` (default): fedsim's
    # persistent worker actors and the driver on one work queue (fedsim.engine.ray_pool).
    # ``flower``: Flower's own simulation engine (fedsim.superlink.run).
    engine: Literal["pool", "flower"] = "pool"
    # pool engine: client worker actors. None: matched to the cores other processes leave
    # free (less the driver's own), or to the cluster's resources with ``address``; 0: no
    # Ray, the driver runs every client.
    workers: int | None = Field(None, ge=0, le=4096)
    # pool engine: the driver also runs client calls from the work queue (while Ray starts
    # and alongside the workers). False: only workers run clients (the driver waits for the
    # first; e.g. a cluster whose driver node should not train).
    driver_runs_clients: bool = True
    # Upper bounds: no machine has more; a local Ray cluster is also checked against this
    # machine's CPUs and GPUs (fedsim.scenario), since Ray waits forever for resources.
    cpus_per_client: float = Field(1.0, gt=0, le=1024)
    gpus_per_client: float = Field(0.0, ge=0, le=64)
    address: str | None = None
    # pool engine, private local Ray (no ``address``): start Ray's head without the two
    # Python daemons a per-run Ray never uses, the autoscaler's monitor (one node, fixed
    # CPUs) and the dashboard's API server (job submission, state API): ray.init 1.7 s
    # instead of 2.7 s here, about 1 s less CPU (fedsim.engine.ray_start.lean_head;
    # benchmarks.process_costs). False: Ray's full head (Ray's default).
    lean_head: bool = True
    # One torch thread per client process by default: on a busy 2-core machine two threads
    # per process ran ~35x slower (spin-waiting), and equal thread counts keep the inline
    # and Ray runtimes bit-identical. Raise it for big models on an idle machine.
    num_threads: int = Field(1, ge=1, le=1024, description="torch threads per client process")
    # Every process that trains clients fixes glibc's mmap and trim thresholds, so memory a
    # training step frees is reused by the next instead of being faulted in again (8-21% of a
    # CPU client fit here: benchmarks.process_costs; fedsim.engine.malloc). False: glibc's
    # defaults.
    keep_freed_memory: bool = True
    # Opt-in, inline only: train each round's eligible clients at once with torch.func
    # (vmap over stacked parameters; fedsim.engine.vectorized, which says who is eligible).
    vectorize: bool = Field(False, description="inline runtime: train a round's cohort as one vectorized batch")

    @field_validator("num_threads", mode="before")
    @classmethod
    def _default_threads(cls, value: Any) -> Any:
        return 1 if value is None else value  # run folders written before the default was 1

    @model_validator(mode="after")
    def _someone_runs_clients(self) -> RuntimeConfig:
        if self.workers == 0 and not self.driver_runs_clients:
            raise ValueError("workers: 0 with driver_runs_clients: false leaves no one to run the clients")
        return self


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
    agc_lambda: float | None = Field(
        None, ge=0, description="adaptive gradient clipping factor for any strategy (FedWon's AGC)"
    )


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
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="TensorBoard / MLflow / W&B sinks (README, Tracking)"
    )

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
        if self.runtime.vectorize and self.runtime.name != "inline":
            raise ValueError(
                f"runtime.vectorize: only the inline runtime vectorizes cohorts (runtime {self.runtime.name})"
            )
        return self

    def to_yaml(self) -> str:
        """The fully resolved scenario as YAML (what a run folder keeps as scenario.yaml)."""
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)
