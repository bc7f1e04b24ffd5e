"""The adaptation phase: every edge client deploys its model and adapts on its own stream.

:func:`run_adaptation` takes a trained run (:class:`fedsim.tta.deploy.ModelRun`) and an
:class:`~fedsim.tta.config.AdaptationConfig` and writes into ``out``:

- ``adaptation.jsonl``: one JSON object per batch (adapter, edge, domain, seed, stream
  seed, shift, segment, batch index, samples, correct, online accuracy, cumulative accuracy,
  wall seconds of ``predict_and_adapt``, the adapter's cumulative metrics);
- ``adaptation_summary.json``: per adapter, overall / per edge / per shift mean online
  error (mean over edges and seeds), CEMA's upload fraction and bytes both ways, seconds
  per batch, what each edge deployed, the foundation model's record, and every stream's
  record (protocol, reset policy, sample counts, seeds);
- ``adaptation.png``: online accuracy over the stream, one panel per edge (first seed),
  every adapter, shift boundaries marked.

Each edge's stream is built from its domain's global test set (corruption shifts corrupt
it; ``clean`` plays it as it is; a domain name plays that domain's test set), seeded per
edge: ``stream seed = SeedSequence([seed, client_id])``. With the ``cifar10c`` dataset the
corruption shifts are read from the CIFAR-10-C files (:func:`load_cifar10c`) instead of
being generated. Adapters with a ``seed`` setting get the stream seed unless ``args`` set it;
adapters with a ``foundation`` setting (CEMA) get the foundation model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fedsim.arrays import atomic_write_bytes
from fedsim.config import Scenario, ScenarioError
from fedsim.data.base import MultiDomainDataset
from fedsim.tta.config import CLEAN, AdaptationConfig, AdapterSpec
from fedsim.tta.deploy import ModelRun, deploy_model, foundation_model
from fedsim.tta.runner import StreamResult, plot_streams, run_stream
from fedsim.tta.streams import TestStream, build_stream

JSONL = "adaptation.jsonl"
SUMMARY = "adaptation_summary.json"
PLOT = "adaptation.png"
MATERIALIZE_BYTES = 512 * 2**20  # streams smaller than this are generated once and replayed per adapter


def _fail(source: str, key: str, message: str) -> None:
    raise ScenarioError(f"{source}: {key}: {message}")


def _full_dataset(scenario: Scenario) -> MultiDomainDataset:
    """The run's dataset with every domain (training may have used a subset)."""
    from fedsim.data.loading import load_dataset

    if scenario.data.domains is None:
        return load_dataset(scenario.data)
    return load_dataset(scenario.data.model_copy(update={"domains": None}))


def edge_ids(cfg: AdaptationConfig, num_clients: int) -> list[int]:
    return list(range(num_clients)) if cfg.edges == "all" else list(cfg.edges)


def check_adaptation(scenario: Scenario, cfg: AdaptationConfig, source: str) -> None:
    """Checks that need the run's data: edge ids exist, domain shifts name domains."""
    from fedsim.data.loading import load_dataset

    n = scenario.num_clients
    for e in edge_ids(cfg, n):
        if e >= n:
            _fail(source, "adaptation.edges", f"client {e} does not exist (the run has clients 0..{n - 1})")
    from fedsim.tta.corruptions import CORRUPTIONS

    trained = load_dataset(scenario.data)
    names = {name: None for e in edge_ids(cfg, n) for name in cfg.stream_for(e).shift_names()}
    for e in cfg.edge_streams:
        if e >= n:
            _fail(source, f"adaptation.edge_streams.{e}", f"client {e} does not exist (the run has clients 0..{n - 1})")
    for name in names:
        if name == CLEAN or name.partition("@")[0] in CORRUPTIONS:
            continue
        if name not in trained.domains:
            full = _full_dataset(scenario)
            if name not in full.domains:
                _fail(
                    source,
                    "adaptation.stream.shifts",
                    f"'{name}' is neither corruption@severity, clean, nor a domain of {full.name} (domains: {', '.join(full.domains)})",
                )


def reset_on_new_shift(cfg: AdaptationConfig, stream: TestStream) -> bool:
    if cfg.reset == "auto":
        return stream.reset_between_shifts
    return cfg.reset == "each-shift"


def stream_seed(seed: int, client_id: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(client_id)]).generate_state(1)[0] % (2**31))


def _cifar10c_source(scenario: Scenario) -> Callable[[str, int], tuple[Any, np.ndarray]]:
    from fedsim.data.loaders._files import resolve_root, to_rgb_uint8
    from fedsim.data.loaders.cifar10c import NAME, SOURCE, load_cifar10c

    root = resolve_root(scenario.data, NAME, SOURCE)
    size = scenario.data.image_size

    def read(corruption: str, severity: int) -> tuple[Any, np.ndarray]:
        images, labels = load_cifar10c(root, corruption, severity)
        return (images if size == 32 else to_rgb_uint8(np.asarray(images), size)), labels

    return read


def edge_stream(scenario: Scenario, cfg: AdaptationConfig, edge: int, domain: str, seed: int) -> TestStream:
    """The stream of edge ``edge`` whose data is ``domain``: shifts of that domain's global
    test set, as ``cfg.stream_for(edge)`` describes them."""
    from fedsim.data.loading import load_dataset
    from fedsim.tta.corruptions import CORRUPTIONS

    ds = load_dataset(scenario.data)
    split = ds.domains[domain]
    st = cfg.stream_for(edge)
    names = st.shift_names()
    domains: dict[str, tuple[Any, np.ndarray]] = {}
    for name in names:
        if name == CLEAN:
            domains[CLEAN] = (split.x_test, np.asarray(split.y_test))
        elif name.partition("@")[0] not in CORRUPTIONS:
            src = ds if name in ds.domains else _full_dataset(scenario)
            domains[name] = (src.domains[name].x_test, np.asarray(src.domains[name].y_test))
    corrupted = _cifar10c_source(scenario) if scenario.data.dataset == "cifar10c" else None
    return build_stream(
        names,
        images=split.x_test,
        labels=np.asarray(split.y_test),
        domains=domains or None,
        protocol=st.protocol,
        batch_size=st.batch_size,
        samples_per_shift=st.samples_per_shift,
        num_classes=ds.num_classes,
        dirichlet_delta=st.dirichlet_delta,
        shuffle_slots=st.shuffle_slots,
        seed=seed,
        corrupted_source=corrupted,
        quantize=st.quantize,
    )


class _Replay(list):
    """A materialized stream (its batches) that keeps the stream's record."""

    def __init__(self, stream: TestStream) -> None:
        super().__init__(stream)
        self._record = stream.record()

    def record(self) -> dict[str, Any]:
        return dict(self._record)


def _materialize(stream: TestStream, channels: int, size: int) -> TestStream | _Replay:
    if stream.num_samples * channels * size * size * 4 <= MATERIALIZE_BYTES:
        return _Replay(stream)
    return stream


def _adapter_args(spec: AdapterSpec, seed: int, foundation: torch.nn.Module | None) -> dict[str, Any]:
    from adapters import adapter_settings
    from fedsim.tta.config import adapter_class

    known = adapter_settings(adapter_class(spec.name))
    args = dict(spec.args)
    if "seed" in known and "seed" not in args:
        args["seed"] = seed
    if "foundation" in known:
        args["foundation"] = foundation
    return args


def _needs_foundation(cfg: AdaptationConfig) -> bool:
    from adapters import adapter_settings
    from fedsim.tta.config import adapter_class

    return any("foundation" in adapter_settings(adapter_class(s.name)) for s in cfg.adapter_specs())


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _std(values: list[float]) -> float:
    return float(np.std(values)) if len(values) > 1 else 0.0


class StreamPlayer(Protocol):
    """Plays every edge's stream of one seed through each adapter and yields
    ``(spec, edge, result, adapter description)``; ``result.stream`` is the stream record."""

    def play(self, seed: int, edges: list[int], specs: list[AdapterSpec]) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]: ...


def stream_record(cfg: AdaptationConfig, stream: TestStream, edge: int, domain: str, seed: int) -> tuple[dict[str, Any], bool]:
    """The stream's record as results keep it, and whether the adapter resets between shifts."""
    reset = reset_on_new_shift(cfg, stream)
    record = stream.record()
    record.update(edge=edge, domain=domain, base_seed=seed, reset_policy=cfg.reset, reset_on_new_shift=reset)
    return record, reset


def play_stream(spec: AdapterSpec, model: torch.nn.Module, played: Any, reset: bool, record: dict[str, Any], sseed: int, foundation: torch.nn.Module | None, source: str) -> tuple[StreamResult, dict[str, Any]]:
    """One adapter built around ``model`` and run online over a (materialized) stream."""
    from adapters import build_adapter

    try:
        adapter = build_adapter(spec.name, model, **_adapter_args(spec, sseed, foundation))
    except (TypeError, ValueError) as exc:
        _fail(source, "adaptation.adapter", f"{spec.display}: {str(exc).splitlines()[0]}")
    res = run_stream(adapter, played, reset, record_metrics=True)
    res.adapter = spec.display
    res.stream = record
    return res, adapter.describe()


class InProcessPlayer:
    """Every edge in this process: its stream is generated once and replayed per adapter."""

    def __init__(self, scenario: Scenario, cfg: AdaptationConfig, models: dict[int, torch.nn.Module], foundation: torch.nn.Module | None, source: str) -> None:
        from fedsim.data.loading import load_dataset, partitions

        self.scenario, self.cfg, self.models, self.foundation, self.source = scenario, cfg, models, foundation, source
        self.ds = load_dataset(scenario.data)
        self.parts = partitions(scenario.data, scenario.seed)

    def play(self, seed: int, edges: list[int], specs: list[AdapterSpec]) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]:
        for e in edges:
            domain = self.parts[e].domain
            sseed = stream_seed(seed, e)
            try:
                stream = edge_stream(self.scenario, self.cfg, e, domain, sseed)
            except ValueError as exc:
                _fail(self.source, "adaptation.stream", str(exc).splitlines()[0])
            record, reset = stream_record(self.cfg, stream, e, domain, seed)
            played = _materialize(stream, self.ds.channels, self.ds.image_size)
            for spec in specs:
                res, description = play_stream(spec, self.models[e], played, reset, record, sseed, self.foundation, self.source)
                yield spec, e, res, description


def summarize_results(results: dict[str, dict[int, dict[int, StreamResult]]], cfg: AdaptationConfig) -> dict[str, Any]:
    """Per adapter label: overall, per edge and per shift (segment) mean online error over
    edges and seeds, timing and the mean of every adapter metric per stream."""
    out: dict[str, Any] = {}
    for label, by_edge in results.items():
        all_res = [r for by_seed in by_edge.values() for r in by_seed.values()]
        per_seed_err: dict[int, list[float]] = {}
        for by_seed in by_edge.values():
            for seed, r in by_seed.items():
                per_seed_err.setdefault(seed, []).append(1.0 - r.accuracy)
        seed_means = [_mean(v) for v in per_seed_err.values()]
        segments: dict[int, dict[str, Any]] = {}
        for r in all_res:
            for s in r.per_shift():
                e = segments.setdefault(s["segment"], {"segment": s["segment"], "shift": s["shift"], "errors": []})
                e["errors"].append(s["error"])
        metric_keys = sorted({k for r in all_res for k in r.metrics})
        metrics_mean = {k: _mean([r.metrics.get(k, 0.0) for r in all_res]) for k in metric_keys}
        entry: dict[str, Any] = {
            "error": _mean([1.0 - r.accuracy for r in all_res]),
            "error_std_over_seeds": _std(seed_means),
            "error_per_seed": {str(s): m for s, m in zip(per_seed_err, seed_means)},
            "mean_shift_error": _mean([r.summary()["mean_shift_error"] for r in all_res]),
            "seconds_per_batch": _mean([b.seconds for r in all_res for b in r.batches]),
            "samples_per_stream": _mean([r.samples for r in all_res]),
            "streams": len(all_res),
            "per_shift": [
                {"segment": e["segment"], "shift": e["shift"], "error": _mean(e["errors"]), "streams": len(e["errors"])}
                for e in sorted(segments.values(), key=lambda e: e["segment"])
            ],
            "per_edge": {
                str(edge): {
                    "error": _mean([1.0 - r.accuracy for r in by_seed.values()]),
                    "per_seed": {str(seed): r.summary() for seed, r in by_seed.items()},
                }
                for edge, by_seed in by_edge.items()
            },
            "metrics_mean_per_stream": metrics_mean,
        }
        if "upload_fraction" in metrics_mean:
            samples = sum(r.metrics.get("samples", 0.0) for r in all_res)
            uploaded = sum(r.metrics.get("samples_uploaded", 0.0) for r in all_res)
            entry["communication"] = {
                "upload_fraction": uploaded / samples if samples else 0.0,
                "bytes_up_total": float(sum(r.metrics.get("bytes_up", 0.0) for r in all_res)),
                "bytes_down_total": float(sum(r.metrics.get("bytes_down", 0.0) for r in all_res)),
                "bytes_up_per_stream": metrics_mean.get("bytes_up", 0.0),
                "bytes_down_per_stream": metrics_mean.get("bytes_down", 0.0),
            }
        out[label] = entry
    return out


def run_adaptation(
    model_run: ModelRun,
    cfg: AdaptationConfig,
    out: str | Path,
    *,
    name: str = "adaptation",
    source: str = "scenario",
    log: Callable[[str], None] | None = None,
    player: Callable[[dict[int, torch.nn.Module], torch.nn.Module | None], StreamPlayer] | None = None,
) -> dict[str, Any]:
    """Adapt each edge's deployed model on its stream(s); write the files listed in the
    module docstring into ``out`` and return the summary. Bad settings raise
    :class:`ScenarioError` (``source: adaptation.key: message``). ``player`` builds what
    plays the streams from the deployed models and the foundation (default: this process;
    the edge demo plays them on SuperNodes)."""
    from fedsim.data.loading import partitions
    from fedsim.engine.client import resolve_device

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenario = model_run.scenario
    check_adaptation(scenario, cfg, source)
    say = log or (lambda _msg: None)
    device = resolve_device(cfg.device or scenario.device)
    parts = partitions(scenario.data, scenario.seed)
    edges = edge_ids(cfg, scenario.num_clients)
    specs = cfg.adapter_specs()

    foundation, foundation_record = None, None
    if _needs_foundation(cfg):
        foundation, foundation_record = foundation_model(model_run, cfg.foundation, device, log=say)
        say(f"foundation {cfg.foundation.model}: {'cached' if foundation_record.get('cached') else 'trained'} ({foundation_record['file']})")

    deployed: dict[str, Any] = {}
    models: dict[int, torch.nn.Module] = {}
    for e in edges:
        model, info = deploy_model(model_run, e, cfg.model)
        info["domain"] = parts[e].domain
        models[e] = model.to(device)
        deployed[str(e)] = info
    streams_player = player(models, foundation) if player else InProcessPlayer(scenario, cfg, models, foundation, source)

    results: dict[str, dict[int, dict[int, StreamResult]]] = {s.display: {} for s in specs}
    streams: dict[str, dict[str, Any]] = {}
    described: dict[str, dict[str, Any]] = {}
    jsonl = out / JSONL
    with open(jsonl, "w") as fh:
        for seed in cfg.stream.seeds:
            for spec, e, res, description in streams_player.play(seed, edges, specs):
                described.setdefault(spec.display, description)
                streams[f"edge{e}/seed{seed}"] = res.stream
                results[spec.display].setdefault(e, {})[seed] = res
                sseed = stream_seed(seed, e)
                for row in res.to_records():
                    row.update(edge=e, domain=parts[e].domain, seed=seed, stream_seed=sseed, batch=row.pop("index"))
                    fh.write(json.dumps(row) + "\n")
                fh.flush()
                extra = ""
                if "upload_fraction" in res.metrics:
                    extra = f"  upload {res.metrics['upload_fraction']:.3f}"
                say(f"{spec.display:>16}  edge {e} ({parts[e].domain})  seed {seed}  online error {1 - res.accuracy:.4f}  {res.summary()['seconds_per_batch'] * 1e3:.1f} ms/batch{extra}")

    summary: dict[str, Any] = {
        "name": name,
        "model_run": str(model_run.path),
        "checkpoint_round": model_run.checkpoint.round,
        "strategy": scenario.strategy.name,
        "dataset": scenario.data.dataset,
        "model": scenario.model.name,
        "device": str(device),
        "edges": edges,
        "seeds": list(cfg.stream.seeds),
        "reset_policy": cfg.reset,
        "deployment": cfg.model,
        "deployed": deployed,
        "adapters": {s.display: {"name": s.name, "args": s.args, **described.get(s.display, {})} for s in specs},
        "config": json.loads(cfg.model_dump_json()),
        "results": summarize_results(results, cfg),
        "streams": streams,
        "foundation": foundation_record,
        "wall_s": time.perf_counter() - t0,
    }
    atomic_write_bytes(out / SUMMARY, json.dumps(summary, indent=2).encode())
    first = cfg.stream.seeds[0]
    panels = {
        f"edge {e} ({parts[e].domain}), seed {first}": [results[s.display][e][first] for s in specs] for e in edges
    }
    plot_streams(panels, out / PLOT, window=cfg.plot_window)
    summary["files"] = {"jsonl": str(jsonl), "summary": str(out / SUMMARY), "plot": str(out / PLOT)}
    return summary


def print_table(console: Any, summary: dict[str, Any], title: str | None = None) -> None:
    """A rich table: per adapter the online error per edge, the mean (+- sd over seeds),
    ms per batch, and CEMA's upload fraction and megabytes each way."""
    from rich.table import Table

    results = summary["results"]
    edges = [str(e) for e in summary["edges"]]
    comm = any("communication" in r for r in results.values())
    table = Table(title=title or f"{summary['name']}: online error (mean over {len(summary['seeds'])} seed(s))")
    table.add_column("adapter")
    for e in edges:
        table.add_column(f"edge {e} ({summary['deployed'][e]['domain']})", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("sd seeds", justify="right")
    table.add_column("ms/batch", justify="right")
    if comm:
        for col in ("upload", "MB up", "MB down"):
            table.add_column(col, justify="right")
    for label, r in results.items():
        row = [label, *[f"{r['per_edge'][e]['error']:.4f}" for e in edges], f"[b]{r['error']:.4f}[/b]", f"{r['error_std_over_seeds']:.4f}", f"{r['seconds_per_batch'] * 1e3:.1f}"]
        if comm:
            c = r.get("communication")
            row += [f"{c['upload_fraction']:.3f}", f"{c['bytes_up_total'] / 1e6:.2f}", f"{c['bytes_down_total'] / 1e6:.3f}"] if c else ["-", "-", "-"]
        table.add_row(*row)
    console.print(table)
