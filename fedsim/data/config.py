"""The ``data:`` section of a scenario: which dataset, and how it is partitioned into clients.

Loaders receive this section (they never see the whole scenario).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from fedsim.schema import Section, check_path_text


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
    partition: Literal[
        "by-domain", "dirichlet", "iid", "pathological", "shard", "linear", "square", "exponential", "size"
    ] = "by-domain"
    alpha: float = Field(0.5, gt=0)
    num_classes_per_partition: int | None = Field(
        None, ge=1, validate_default=True, description="pathological: exact number of classes per client"
    )
    class_assignment_mode: Literal["random", "deterministic", "first-deterministic"] | None = Field(
        None, validate_default=True, description="pathological: how classes are dealt (default random)"
    )
    num_shards_per_partition: int | None = Field(
        None, ge=1, validate_default=True, description="shard: shards per client"
    )
    shard_size: int | None = Field(None, ge=1, validate_default=True, description="shard: samples per shard")
    keep_incomplete_shard: bool | None = Field(
        None, validate_default=True, description="shard: deal out the shorter last shard too (default false)"
    )
    partition_sizes: list[int] | None = Field(
        None, validate_default=True, description="size: train-pool samples of each client of a domain"
    )
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

    @field_validator(
        "num_classes_per_partition",
        "class_assignment_mode",
        "num_shards_per_partition",
        "shard_size",
        "keep_incomplete_shard",
        "partition_sizes",
    )
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


_PARTITION_PARAMETERS = {
    "num_classes_per_partition": "pathological",
    "class_assignment_mode": "pathological",
    "num_shards_per_partition": "shard",
    "shard_size": "shard",
    "keep_incomplete_shard": "shard",
    "partition_sizes": "size",
}
