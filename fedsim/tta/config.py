"""The ``adaptation:`` section of a scenario: test-time adaptation after federated training.

Every section forbids unknown keys; :func:`fedsim.scenario.load_scenario` reports an error as
``file: adaptation.stream.batch_size: must be >= 1 (got 0)``. Checks that need registries or
the run's dataset (adapter names and settings, edge ids, domain shifts) happen in
:func:`fedsim.scenario.check_adaptation` with the same message form.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedsim.schema import MAX_SEED, Section

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
"""The corruption names a stream may use (the 15 of CIFAR-10-C; :mod:`fedsim.tta.corruptions`
implements each, a test keeps the two in step). Named here so the schema imports no image code."""

CLEAN = "clean"
"""Shift name for an edge's own domain test set played as it is (no corruption)."""

INJECTED = ("foundation",)
"""Adapter settings fedsim fills in itself (CEMA's cloud model): not allowed in ``args``."""


class AdapterSpec(Section):
    """One adapter: ``name`` is a registered adapter (``fedsim list``) or an import path
    ``package.module:Class`` of an :class:`fedsim.adapters.base.Adapter` subclass; ``args`` are its
    settings (unknown ones are errors); ``label`` names it in outputs (default: the name, or
    for an import path its last part, the class name: ``my_tta:EMABN`` -> ``EMABN``)."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @property
    def display(self) -> str:
        if self.label:
            return self.label
        if ":" in self.name:  # package.module:Class -> Class (the attribute may be dotted)
            return self.name.rpartition(":")[2].rpartition(".")[2]
        return self.name.rpartition(".")[2]  # a registered name has no dot; package.module.Class -> Class


def _exactly_one(value: Any, info: ValidationInfo, other: str, neither: str, both: str) -> bool:
    """For two mutually exclusive keys validated in order (``other`` first): raise unless
    exactly one is given; True when ``value`` is the one given (and needs checking)."""
    other_value = info.data.get(other)
    if value is None:
        if other_value is None and other in info.data:  # absent from data: ``other`` itself failed
            raise ValueError(neither)
        return False
    if other_value is not None:
        raise ValueError(both)
    return True


class StreamConfig(Section):
    """The test stream each edge plays (``docs/tta.md``).

    Shifts: either ``shifts`` (explicit, in play order: ``"corruption@severity"``, a domain
    name of the run's dataset, or ``clean`` for the edge's own domain as it is), or
    ``corruptions`` x ``severities`` (corruption-major order). With protocol ``gradual``
    give corruption names only (severities 1..5..1 are implied).
    """

    protocol: Literal["reset-each-shift", "continual", "gradual", "mixed"] = "continual"
    shifts: list[str] | None = None
    corruptions: list[str] | None = Field(None, validate_default=True)
    severities: list[int] = Field(default_factory=lambda: [5])
    dirichlet_delta: float | None = Field(
        None, ge=0, description="label-temporal correlation; null = i.i.d., 0 = sorted by label"
    )
    shuffle_slots: bool = True
    batch_size: int = Field(64, ge=1)
    samples_per_shift: int | None = Field(None, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], description="one stream per seed and edge")
    quantize: bool = True

    @field_validator("severities")
    @classmethod
    def _severities(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one severity")
        for s in value:
            if not 1 <= s <= 5:
                raise ValueError(f"severities must be in 1..5 (got {s})")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("give at least one seed")
        if any(s < 0 or s > MAX_SEED for s in value):
            raise ValueError(f"seeds must be in 0..2**64-1 (got {value})")
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct (got {value})")
        return value

    @field_validator("shifts")
    @classmethod
    def _shifts(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one shift")
        gradual = info.data.get("protocol") == "gradual"
        for name in value:
            corruption, sep, sev = name.partition("@")
            if gradual:
                if name not in CORRUPTIONS:
                    raise ValueError(f"protocol gradual takes corruption names without severity (got '{name}')")
                continue
            if name in CORRUPTIONS:
                raise ValueError(f"'{name}' needs a severity, e.g. '{name}@5'")
            if sep and corruption not in CORRUPTIONS:
                raise ValueError(f"unknown corruption '{corruption}' in '{name}' (known: {', '.join(CORRUPTIONS)})")
            if sep and (not sev.isdigit() or not 1 <= int(sev) <= 5):
                raise ValueError(f"shift '{name}': severity must be 1..5")
        return value

    @field_validator("corruptions")
    @classmethod
    def _corruptions(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if not _exactly_one(
            value,
            info,
            "shifts",
            "give stream.corruptions (with severities) or stream.shifts",
            "give stream.corruptions or stream.shifts, not both",
        ):
            return value
        if not value:
            raise ValueError("give at least one corruption")
        for name in value:
            if name not in CORRUPTIONS:
                raise ValueError(f"unknown corruption '{name}' (known: {', '.join(CORRUPTIONS)})")
        return value

    def shift_names(self) -> list[str]:
        """The shifts in play order (corruption names alone for ``gradual``)."""
        if self.shifts is not None:
            return list(self.shifts)
        if self.protocol == "gradual":
            return list(self.corruptions or [])
        return [f"{c}@{s}" for c in self.corruptions or [] for s in self.severities]


def _merged_stream(base: StreamConfig, override: dict[str, Any], prefix: str = "") -> StreamConfig:
    """``base`` with ``override``'s keys; giving shifts drops the base's corruptions and
    severities and vice versa (they are alternatives). Errors name ``prefix + key``."""
    from pydantic import ValidationError

    raw = base.model_dump()
    if "shifts" in override:
        raw.pop("corruptions", None)
        raw.pop("severities", None)
    if "corruptions" in override:
        raw.pop("shifts", None)
    raw.update(override)
    try:
        return StreamConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{prefix}{loc}: {err['msg']}") from None


class FoundationConfig(Section):
    """CEMA's cloud foundation model: trained centrally on the pooled train data of the
    run's clients (all training domains), seeded, cached in the model run's folder
    (``foundation/<key>.safetensors``) so repeated adapt calls reuse it."""

    model: str = "cnn-small"
    args: dict[str, Any] = Field(default_factory=lambda: {"width": 64})
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="default: the run's scenario seed")
    # CEMA's premise is a cloud model much stronger than the edge (trained on far more data);
    # ``domains`` gives it every training domain's whole train split, not just the clients' shares.
    train_data: Literal["clients", "domains"] = Field(
        "clients",
        description="clients: the pooled train data of the run's clients; domains: the full train split of every domain the run trained on",
    )
    augment: bool = Field(
        False,
        description="random affine (rotation, scale, translation) and brightness jitter per training sample; never a corruption of the test streams",
    )
    augment_corruptions: list[str] = Field(
        default_factory=list,
        description="train on a copy of the data in which half the images carry one of these corruptions at a random severity (a stand-in for a large model's robustness; keep them apart from the streams' corruptions)",
    )
    train_per_domain: int | None = Field(
        None,
        ge=1,
        description="with train_data: domains, build each domain's train split with this many images (datasets with a train_per_domain option, e.g. digits5; the test split is unchanged): more data than the edges trained on, as a large pre-trained model has seen; default: the run's split",
    )

    @field_validator("augment_corruptions")
    @classmethod
    def _augment_corruptions(cls, value: list[str]) -> list[str]:
        from fedsim.tta.corruptions import CORRUPTIONS

        for name in value:
            if name not in CORRUPTIONS:
                raise ValueError(f"unknown corruption '{name}' (known: {', '.join(CORRUPTIONS)})")
        return value

    @model_validator(mode="after")
    def _train_per_domain(self) -> FoundationConfig:
        if self.train_per_domain is not None and self.train_data != "domains":
            raise ValueError("train_per_domain needs train_data: domains (the clients' shares have a fixed size)")
        return self


class AdaptationConfig(Section):
    """Test-time adaptation of the trained model on each edge client's stream.

    ``adapter`` (one) or ``adapters`` (several, run on the same streams for comparison);
    a string is shorthand for ``{name: ...}``. ``edges``: ``all`` or a list of client ids.
    ``model``: what each edge deploys: ``global`` (the global checkpoint), ``personalized``
    (the global model with the client's own local state, e.g. FedBN's BN layers; an error
    if the run has none), ``auto`` (personalized where the client has local state, else
    global). ``reset``: ``auto`` (reset between shifts only under protocol
    reset-each-shift), ``each-shift`` or ``never``. ``device``: default the scenario's.
    """

    adapter: AdapterSpec | None = None
    adapters: list[AdapterSpec] | None = Field(None, validate_default=True)
    stream: StreamConfig
    edge_streams: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description="client id -> stream keys that differ for that edge"
    )
    edges: Literal["all"] | list[int] = "all"
    model: Literal["auto", "global", "personalized"] = "auto"
    reset: Literal["auto", "each-shift", "never"] = "auto"
    foundation: FoundationConfig = Field(default_factory=FoundationConfig)
    device: Literal["auto", "cpu", "cuda"] | None = None

    @field_validator("adapter", mode="before")
    @classmethod
    def _adapter_shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters_shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("edges", mode="before")
    @classmethod
    def _edges(cls, value: Any) -> Any:
        if isinstance(value, str) and value == "all":
            return value
        if not isinstance(value, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in value):
            raise ValueError(f"must be all or a list of client ids (got {value!r})")
        if isinstance(value, list):
            if not value:
                raise ValueError("give at least one client id, or all")
            if any(e < 0 for e in value):
                raise ValueError(f"client ids must be >= 0 (got {value})")
            if len(set(value)) != len(value):
                raise ValueError(f"client ids must be distinct (got {value})")
        return value

    @field_validator("adapters")
    @classmethod
    def _one_adapter_key(cls, value: list[AdapterSpec] | None, info: ValidationInfo) -> list[AdapterSpec] | None:
        if not _exactly_one(
            value, info, "adapter", "give adapter (one) or adapters (a list)", "give adapter or adapters, not both"
        ):
            return value
        if not value:
            raise ValueError("give at least one adapter")
        labels = [a.display for a in value]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"labels must be distinct; give 'label' to tell apart {', '.join(dup)}")
        return value

    @field_validator("edge_streams")
    @classmethod
    def _edge_streams(cls, value: dict[int, dict[str, Any]], info: ValidationInfo) -> dict[int, dict[str, Any]]:
        base = info.data.get("stream")
        for edge, override in value.items():
            if edge < 0:
                raise ValueError(f"client ids must be >= 0 (got {edge})")
            if "seeds" in override:
                raise ValueError(f"{edge}.seeds: the seeds are shared by every edge (set stream.seeds)")
            if base is not None:
                _merged_stream(base, override, prefix=f"{edge}.")
        return value

    def stream_for(self, edge: int) -> StreamConfig:
        """The stream settings of edge ``edge``: ``stream`` with its ``edge_streams`` keys."""
        override = self.edge_streams.get(int(edge))
        return self.stream if not override else _merged_stream(self.stream, override)

    def edge_ids(self, num_clients: int) -> list[int]:
        """The clients that adapt: all of the run's clients, or the listed ones."""
        return list(range(num_clients)) if self.edges == "all" else list(self.edges)

    def adapter_specs(self) -> list[AdapterSpec]:
        return [self.adapter] if self.adapter is not None else list(self.adapters or [])
