"""Who plays the edge streams: the adapters built around each edge's model, run online.

A :class:`StreamPlayer` yields one result per (adapter, edge) of a seed. The default,
:class:`InProcessPlayer`, plays every edge in this process (its stream generated once and
replayed per adapter); the edge demo plays them on SuperNodes through the same
:func:`play_stream`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from fedsim.adapters import adapter_class, adapter_settings, build_adapter
from fedsim.config import Scenario, ScenarioError
from fedsim.data.loading import load_dataset, partitions
from fedsim.tta.config import AdaptationConfig, AdapterSpec
from fedsim.tta.runner import StreamResult, run_stream
from fedsim.tta.streams import TestStream, edge_stream, stream_record, stream_seed

MATERIALIZE_BYTES = 512 * 2**20  # streams smaller than this are generated once and replayed per adapter


def _fail(source: str, key: str, message: str) -> None:
    raise ScenarioError(f"{source}: {key}: {message}")


class _Replay(list):
    """A materialized stream (its batches) that keeps the stream's record."""

    def __init__(self, stream: TestStream) -> None:
        super().__init__(stream)
        self._record = stream.record()

    def record(self) -> dict[str, Any]:
        return dict(self._record)


def materialize(stream: TestStream, channels: int, size: int) -> TestStream | _Replay:
    """The stream's batches held in memory when they fit in ``MATERIALIZE_BYTES``, else the stream."""
    if stream.num_samples * channels * size * size * 4 <= MATERIALIZE_BYTES:
        return _Replay(stream)
    return stream


def adapter_args(spec: AdapterSpec, seed: int, foundation: torch.nn.Module | None) -> dict[str, Any]:
    """The adapter's arguments: ``spec.args`` plus the stream seed (for adapters with a
    ``seed`` setting that ``args`` leave unset) and the foundation model (for adapters that
    take one)."""
    known = adapter_settings(adapter_class(spec.name))
    args = dict(spec.args)
    if "seed" in known and "seed" not in args:
        args["seed"] = seed
    if "foundation" in known:
        args["foundation"] = foundation
    return args


def needs_foundation(cfg: AdaptationConfig) -> bool:
    """Whether any adapter of ``cfg`` takes a foundation model (CEMA)."""
    return any("foundation" in adapter_settings(adapter_class(s.name)) for s in cfg.adapter_specs())


def play_stream(
    spec: AdapterSpec,
    model: torch.nn.Module,
    played: Any,
    reset: bool,
    record: dict[str, Any],
    sseed: int,
    foundation: torch.nn.Module | None,
    source: str,
) -> tuple[StreamResult, dict[str, Any]]:
    """One adapter built around ``model`` and run online over a (materialized) stream."""
    try:
        adapter = build_adapter(spec.name, model, **adapter_args(spec, sseed, foundation))
    except (TypeError, ValueError) as exc:
        _fail(source, "adaptation.adapter", f"{spec.display}: {str(exc).splitlines()[0]}")
    res = run_stream(adapter, played, reset, record_metrics=True)
    res.adapter = spec.display
    res.stream = record
    return res, adapter.describe()


class StreamPlayer(Protocol):
    """Plays every edge's stream of one seed through each adapter and yields
    ``(spec, edge, result, adapter description)``; ``result.stream`` is the stream record."""

    def play(
        self, seed: int, edges: list[int], specs: list[AdapterSpec]
    ) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]: ...


class InProcessPlayer:
    """Every edge in this process: its stream is generated once and replayed per adapter."""

    def __init__(
        self,
        scenario: Scenario,
        cfg: AdaptationConfig,
        models: dict[int, torch.nn.Module],
        foundation: torch.nn.Module | None,
        source: str,
    ) -> None:
        self.scenario, self.cfg, self.models, self.foundation, self.source = scenario, cfg, models, foundation, source
        self.ds = load_dataset(scenario.data)
        self.parts = partitions(scenario.data, scenario.seed)

    def play(
        self, seed: int, edges: list[int], specs: list[AdapterSpec]
    ) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]:
        for e in edges:
            domain = self.parts[e].domain
            sseed = stream_seed(seed, e)
            try:
                stream = edge_stream(self.scenario, self.cfg, e, domain, sseed)
            except ValueError as exc:
                _fail(self.source, "adaptation.stream", str(exc).splitlines()[0])
            record, reset = stream_record(self.cfg, stream, e, domain, seed)
            played = materialize(stream, self.ds.channels, self.ds.image_size)
            for spec in specs:
                res, description = play_stream(
                    spec, self.models[e], played, reset, record, sseed, self.foundation, self.source
                )
                yield spec, e, res, description
