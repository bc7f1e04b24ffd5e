"""The ``tracking:`` section of a scenario: which experiment trackers receive the metrics.

Pure schema (no backend is imported here): ``tensorboard`` is ``true``/``false``;
``mlflow`` and ``wandb`` are ``true``/``false`` or a mapping of their options. Checks that
need the installed packages happen in :func:`fedsim.tracking.sinks.check_tracking`.

This module must not import :mod:`fedsim.config` (which imports it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictBool, field_validator

from fedsim.schema import Section


class MLflowOptions(Section):
    """MLflow: one MLflow run per fedsim run folder."""

    tracking_uri: str | None = Field(None, description="default: a local file store, <run folder>/mlruns")
    experiment: str | None = Field(None, description="MLflow experiment name (default: the scenario name)")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\0" in value or len(value) > 4096):
            raise ValueError("must be a non-empty URI (a path, file:///..., sqlite:///... or http://...)")
        return value


class WandbOptions(Section):
    """Weights & Biases: ``offline`` (default) writes the run under <run folder>/wandb for a
    later ``wandb sync``; ``online`` needs a login and the network."""

    project: str = Field("fedsim", min_length=1, max_length=128)
    entity: str | None = Field(None, min_length=1, max_length=128)
    mode: Literal["offline", "online"] = "offline"


def _shorthand(value: Any) -> Any:
    """``true`` -> default options, ``false``/null -> off, a mapping -> those options."""
    if value is True:
        return {}
    if value is False or value is None:
        return None
    if isinstance(value, (dict, Section)):
        return value
    raise ValueError(f"expected true, false or a mapping of options (got {value!r:.60})")


class TrackingConfig(Section):
    """Experiment trackers fed while a run trains (per evaluated round) and adapts (per batch).
    All off by default; each backend is an optional extra (``pip install fedsim[tensorboard]``,
    ``fedsim[mlflow]``, ``fedsim[wandb]``)."""

    tensorboard: StrictBool = Field(False, description="event files in <run folder>/tensorboard")
    mlflow: MLflowOptions | None = Field(None, description="true or {tracking_uri, experiment}")
    wandb: WandbOptions | None = Field(None, description="true or {project, entity, mode}")
    per_client: StrictBool = Field(
        False, description="also one accuracy series per client (many series with many clients)"
    )

    @field_validator("mlflow", "wandb", mode="before")
    @classmethod
    def _options(cls, value: Any) -> Any:
        return _shorthand(value)

    @property
    def enabled(self) -> list[str]:
        """The backends switched on, in a fixed order."""
        return [name for name in ("tensorboard", "mlflow", "wandb") if getattr(self, name)]


__all__ = ["MLflowOptions", "TrackingConfig", "WandbOptions"]
