"""The adaptation phase: every edge client deploys its model and adapts on its own stream.

:func:`run_adaptation` takes a trained run (:class:`fedsim.tta.deploy.ModelRun`) and an
:class:`~fedsim.tta.config.AdaptationConfig` and writes into ``out``:

- ``adaptation.jsonl``: one JSON object per batch (adapter, edge, domain, seed, stream
  seed, shift, segment, batch index, samples, correct, online accuracy, cumulative accuracy,
  wall seconds of ``predict_and_adapt``, the adapter's cumulative metrics);
- ``adaptation_summary.json``: the plot's title, per adapter, overall / per edge / per shift mean online
  error (mean over edges and seeds), CEMA's upload fraction and bytes both ways, seconds
  per batch, what each edge deployed, the foundation model's record, and every stream's
  record (protocol, reset policy, sample counts, seeds);
- ``adaptation.png``: running online accuracy over the stream (and each shift's accuracy),
  one panel per edge (first seed), every adapter, shift boundaries named; its title names
  the adaptation, the trained run's scenario, strategy, rounds and seed, and the round of
  the deployed checkpoint when that is not the last.

Each edge's stream is built from its domain's global test set (corruption shifts corrupt
it; ``clean`` plays it as it is; a domain name plays that domain's test set), seeded per
edge: ``stream seed = SeedSequence([seed, client_id])``. A dataset with pre-corrupted test
sets (CIFAR-10-C) supplies the corruption shifts instead of generating them. Adapters with a ``seed`` setting get the stream seed unless ``args`` set it;
adapters with a ``foundation`` setting (CEMA) get the foundation model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsim.arrays import atomic_write_bytes
from fedsim.data.loading import num_clients, partitions
from fedsim.engine.client import resolve_device
from fedsim.results import ADAPTATION_SUMMARY, describe
from fedsim.tta.config import AdaptationConfig
from fedsim.tta.deploy import ModelRun, deploy_model, foundation_model
from fedsim.tta.players import InProcessPlayer, StreamPlayer, needs_foundation
from fedsim.tta.runner import StreamResult, plot_streams
from fedsim.tta.streams import stream_seed
from fedsim.tta.summary import print_table, summarize_results

__all__ = ["JSONL", "PLOT", "SUMMARY", "print_table", "run_adaptation"]

JSONL = "adaptation.jsonl"
SUMMARY = ADAPTATION_SUMMARY
PLOT = "adaptation.png"


def run_adaptation(
    model_run: ModelRun,
    cfg: AdaptationConfig,
    out: str | Path,
    *,
    name: str = "adaptation",
    source: str = "scenario",
    log: Callable[[str], None] | None = None,
    player: Callable[[dict[int, torch.nn.Module], torch.nn.Module | None], StreamPlayer] | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Adapt each edge's deployed model on its stream(s); write the files listed in the
    module docstring into ``out`` and return the summary. ``cfg`` is checked against the run
    beforehand (:func:`fedsim.scenario.check_adaptation`); a stream or adapter that still
    fails raises :class:`~fedsim.schema.ScenarioError` (``source: adaptation.key: message``).
    ``player`` builds what
    plays the streams from the deployed models and the foundation (default: this process;
    the edge demo plays them on SuperNodes). ``on_batch`` gets each ``adaptation.jsonl`` row
    (the experiment trackers)."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scenario = model_run.scenario
    say = log or (lambda _msg: None)
    device = resolve_device(cfg.device or scenario.device)
    parts = partitions(scenario.data, scenario.seed)
    edges = cfg.edge_ids(num_clients(scenario.data))
    specs = cfg.adapter_specs()

    foundation, foundation_record = None, None
    if needs_foundation(cfg):
        foundation, foundation_record = foundation_model(model_run, cfg.foundation, device, log=say)
        say(
            f"foundation {cfg.foundation.model}: {'cached' if foundation_record.get('cached') else 'trained'} ({foundation_record['file']})"
        )

    deployed: dict[str, Any] = {}
    models: dict[int, torch.nn.Module] = {}
    for e in edges:
        model, info = deploy_model(model_run, e, cfg.model)
        info["domain"] = parts[e].domain
        models[e] = model.to(device)
        deployed[str(e)] = info
    streams_player = (
        player(models, foundation) if player else InProcessPlayer(scenario, cfg, models, foundation, source)
    )

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
                    if on_batch is not None:
                        on_batch(row)
                fh.flush()
                extra = ""
                if "upload_fraction" in res.metrics:
                    extra = f"  upload {res.metrics['upload_fraction']:.3f}"
                say(
                    f"{spec.display:>16}  edge {e} ({parts[e].domain})  seed {seed}  online error {1 - res.accuracy:.4f}  {res.summary()['seconds_per_batch'] * 1e3:.1f} ms/batch{extra}"
                )

    # the plot's title: the adaptation and the trained run it deployed (strategy, rounds, seed)
    deployed_round = (
        "" if model_run.checkpoint.round == scenario.rounds else f", model of round {model_run.checkpoint.round}"
    )
    trained = f"{describe(scenario)}{deployed_round}"
    title = (
        f"{trained}: online accuracy after training"
        if name == scenario.name
        else f"{name}: online accuracy, model of {trained}"
    )
    summary: dict[str, Any] = {
        "name": name,
        "title": title,
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
    plot_streams(panels, out / PLOT, title=title)
    summary["files"] = {"jsonl": str(jsonl), "summary": str(out / SUMMARY), "plot": str(out / PLOT)}
    return summary
