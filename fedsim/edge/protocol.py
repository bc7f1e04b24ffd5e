"""Test-time adaptation as messages between the cloud (ServerApp) and edges (SuperNodes).

Two message types, both answered by fedsim's deployed ClientApp (:mod:`fedsim.edge.apps`):

- ``query.adapt`` (on-device adapters: source, tbn, alpha_bn, unmix_tns, tent, ...): the
  cloud sends the global model; the edge deploys it (with its own local state when the
  deployment is personalized), builds its own stream and plays it through each adapter,
  then replies with the per-batch scores. Nothing is uploaded.
- ``query.cema`` (cloud-edge adapters, :class:`adapters.cema.CEMA`): the edge predicts
  forward-only and runs CEMA's filters; it plays batches until it has uploaded what the
  cloud still needs for its next round (or a shift boundary where the adapter resets, or
  the end of its stream), then replies with the selected uint8 images. The cloud buffers
  them, runs its rounds (:class:`adapters.cema.CemaCloud`) and sends the new normalization
  affine parameters with the next message. The edge's filter state lives in the
  SuperNode's ``Context.state`` between messages (each message runs in a fresh process).

The sequence of edge forwards, uploads, cloud rounds and parameter updates is the one the
in-process :class:`adapters.cema.CEMA` runs, so a demo scores what the simulation scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedsim.arrays import numpy_to_record, record_to_numpy
from fedsim.tta.config import AdaptationConfig, AdapterSpec
from fedsim.tta.runner import BatchRecord, StreamResult

if TYPE_CHECKING:
    from fedsim.engine.client import ClientRuntime
    from fedsim.engine.grid import PartitionGrid
    from fedsim.tta.deploy import ModelRun

ADAPT = "query.adapt"
CEMA_STEP = "query.cema"
LOCAL_ITEM = "local"


# -- results as JSON -----------------------------------------------------------------------
def result_to_json(res: StreamResult) -> dict[str, Any]:
    return {
        "adapter": res.adapter,
        "reset": res.reset_on_new_shift,
        "batches": [[b.index, b.segment, b.shift, b.samples, b.correct, b.seconds, b.metrics] for b in res.batches],
        "metrics": res.metrics,
        "segment_metrics": {str(k): v for k, v in res.segment_metrics.items()},
        "stream": res.stream,
    }


def result_from_json(d: dict[str, Any]) -> StreamResult:
    res = StreamResult(adapter=d["adapter"], reset_on_new_shift=bool(d["reset"]))
    res.batches = [BatchRecord(*row) for row in d["batches"]]
    res.metrics = dict(d["metrics"])
    res.segment_metrics = {int(k): v for k, v in d["segment_metrics"].items()}
    res.stream = dict(d["stream"])
    return res


def segment_changes(batches: list[BatchRecord]) -> dict[int, dict[str, float]]:
    """Change of each cumulative metric over each segment (what ``run_stream`` records)."""
    out: dict[int, dict[str, float]] = {}
    start: dict[str, float] = {}
    for i, b in enumerate(batches):
        last_of_segment = i + 1 == len(batches) or batches[i + 1].segment != b.segment
        if last_of_segment and b.metrics is not None:
            out[b.segment] = {k: v - start.get(k, 0.0) for k, v in b.metrics.items()}
            start = dict(b.metrics)
    return out


# -- the edge side (runs in the ClientApp) -------------------------------------------------
def _config(msg: Message) -> dict[str, Any]:
    return dict(msg.content["config"]) if "config" in msg.content else {}


def _adaptation(runtime: ClientRuntime) -> AdaptationConfig:
    cfg = runtime.scenario.adaptation
    if cfg is None:
        raise RuntimeError("the scenario has no adaptation section")
    return cfg


def _deploy(runtime: ClientRuntime, global_arrays: dict[str, np.ndarray], cid: int, config: dict[str, Any]) -> torch.nn.Module:
    """The edge's model: the global arrays it was sent plus its own local state."""
    from fedsim.engine.client_state import ClientState
    from fedsim.tta.deploy import deploy_arrays

    which = _adaptation(runtime).model
    rnd = int(config["fedsim.checkpoint_round"])
    local, local_round = None, None
    if which != "global" and runtime.run_dir:
        from pathlib import Path

        state = ClientState(Path(runtime.run_dir), cid, rnd, inclusive=True)
        local, local_round = state.get(LOCAL_ITEM), state._read_round.get(LOCAL_ITEM)
    model, _ = deploy_arrays(runtime.scenario, global_arrays, local, local_round, cid, which, rnd, f"edge {cid}")
    return model.to(runtime.device)


def _stream(runtime: ClientRuntime, cid: int, seed: int) -> tuple[list[Any], dict[str, Any], bool, int]:
    """This edge's stream for ``seed`` (batches), its record, reset policy and stream seed."""
    from fedsim.tta.streams import edge_stream, stream_record, stream_seed

    cfg = _adaptation(runtime)
    domain = runtime.data.partition(cid).domain
    sseed = stream_seed(seed, cid)
    stream = edge_stream(runtime.scenario, cfg, cid, domain, sseed)
    record, reset = stream_record(cfg, stream, cid, domain, seed)
    return list(stream), record, reset, sseed


def edge_adapt(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """``query.adapt``: play this edge's stream through each on-device adapter."""
    from fedsim.tta.players import play_stream

    config = _config(msg)
    cid = runtime.client_id(context)
    specs = _adaptation(runtime).adapter_specs()
    model = _deploy(runtime, record_to_numpy(msg.content.array_records["model"]), cid, config)
    batches, record, reset, sseed = _stream(runtime, cid, int(config["fedsim.seed"]))
    out = []
    for i in json.loads(str(config["fedsim.specs"])):
        res, description = play_stream(specs[i], model, batches, reset, record, sseed, None, f"edge {cid}")
        out.append({"spec": i, "result": result_to_json(res), "description": description})
    return Message(RecordDict({"config": ConfigRecord({"results": json.dumps(out)})}), reply_to=msg)


def _cema_filter_settings(spec: AdapterSpec) -> dict[str, Any]:
    from adapters import adapter_settings
    from adapters.cema import CEMA

    return {**adapter_settings(CEMA), **spec.args}


def edge_cema(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """``query.cema``: forward-only predictions and CEMA's upload filter (module docstring)."""
    from adapters._norm import norm_affine_parameters
    from adapters.cema import CemaEdgeFilter, copy_affine, prepare_edge_model

    config = _config(msg)
    cid = runtime.client_id(context)
    spec_index, seed = int(config["fedsim.spec"]), int(config["fedsim.seed"])
    spec = _adaptation(runtime).adapter_specs()[spec_index]
    key = f"fedsim.cema.{seed}.{spec_index}"
    arrays = msg.content.array_records
    if "model" in arrays:  # first message of this stream: keep the deployed model's arrays
        context.state[f"{key}.model"] = arrays["model"]
        context.state[f"{key}.state"] = ConfigRecord({"next": 0, "json": json.dumps({})})
    saved = json.loads(str(context.state.config_records[f"{key}.state"]["json"]))
    settings = _cema_filter_settings(spec)
    model = prepare_edge_model(_deploy(runtime, record_to_numpy(context.state.array_records[f"{key}.model"]), cid, config), settings["edge_bn"])
    edge_filter = CemaEdgeFilter(settings)
    if saved.get("filter"):
        edge_filter.load_state({**saved["filter"], "p_mean": saved["filter"].get("p_mean")})
    if saved.get("affine") is not None:
        copy_affine(model, [torch.tensor(a, dtype=torch.float32) for a in saved["affine"]])
    if "affine" in arrays:
        copy_affine(model, [torch.from_numpy(v.copy()) for v in record_to_numpy(arrays["affine"]).values()])
    if bool(config.get("fedsim.reset", False)):  # the adapter resets at a new shift
        model = prepare_edge_model(_deploy(runtime, record_to_numpy(context.state.array_records[f"{key}.model"]), cid, config), settings["edge_bn"])
        edge_filter.clear()
    counters = saved.get("counters", {"samples": 0.0, "batches": 0.0, "adapt_seconds": 0.0, "samples_uploaded": 0.0, "bytes_up": 0.0})

    batches, record, reset, _ = _stream(runtime, cid, seed)
    start = int(context.state.config_records[f"{key}.state"]["next"])
    needed = int(config["fedsim.needed"])
    uploads: list[torch.Tensor] = []
    played: list[list[Any]] = []
    uploaded = 0
    i = start
    boundary = False
    while i < len(batches):
        b = batches[i]
        if reset and i > start and b.segment != batches[i - 1].segment:
            boundary = True  # the cloud must reset before this batch
            break
        t0 = time.perf_counter()
        x = b.x.to(runtime.device, torch.float32)
        with torch.no_grad():
            logits = model(x)
        images = edge_filter.uploads(x, edge_filter.select(logits))
        seconds = time.perf_counter() - t0
        correct = int((logits.argmax(1).cpu() == torch.as_tensor(b.y)).sum())
        n = int(b.x.shape[0])
        counters["samples"] += n
        counters["batches"] += 1
        counters["adapt_seconds"] += seconds
        if images is not None:
            uploads.append(images)
            uploaded += int(images.shape[0])
            counters["samples_uploaded"] += int(images.shape[0])
            counters["bytes_up"] += int(images.numel())
        played.append([b.index, b.segment, b.shift, n, correct, seconds, dict(counters)])
        i += 1
        if uploaded >= needed:
            break
    filter_state = edge_filter.state()
    if filter_state["p_mean"] is not None:
        filter_state["p_mean"] = filter_state["p_mean"].tolist()
    saved = {"filter": filter_state, "affine": [p.detach().cpu().tolist() for p in norm_affine_parameters(model)], "counters": counters}
    context.state[f"{key}.state"] = ConfigRecord({"next": i, "json": json.dumps(saved)})
    done = i >= len(batches)
    content = RecordDict(
        {
            "config": ConfigRecord({"batches": json.dumps(played), "done": done, "boundary": boundary, "record": json.dumps(record) if start == 0 else ""}),
            "metrics": MetricRecord({"uploaded": uploaded}),
        }
    )
    if uploads:
        content["uploads"] = numpy_to_record({"images": torch.cat(uploads).numpy()})
    return Message(content, reply_to=msg)


# -- the cloud side (runs in the ServerApp) ------------------------------------------------
def is_cloud_edge(spec: AdapterSpec) -> bool:
    from adapters.cema import CEMA
    from fedsim.tta.config import adapter_class

    cls = adapter_class(spec.name)
    return isinstance(cls, type) and issubclass(cls, CEMA)


class EdgePlayer:
    """Plays the adaptation phase on the SuperNodes behind ``grid`` (a
    :class:`~fedsim.engine.grid.PartitionGrid`); ``progress`` gets one dict per update
    (edge, adapter, batches, samples, correct, uploads and bytes so far)."""

    def __init__(
        self,
        grid: PartitionGrid,
        model_run: ModelRun,
        cfg: AdaptationConfig,
        models: dict[int, torch.nn.Module],
        foundation: torch.nn.Module | None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.grid = grid
        self.model_run = model_run
        self.cfg = cfg
        self.models = models
        self.foundation = foundation
        self.progress = progress or (lambda _u: None)
        self.global_record = numpy_to_record(model_run.checkpoint.arrays)
        self.specs = cfg.adapter_specs()

    def _config(self, seed: int, **extra: Any) -> dict[str, Any]:
        return {"fedsim.seed": int(seed), "fedsim.checkpoint_round": int(self.model_run.checkpoint.round), **extra}

    def _send(self, messages: list[Message]) -> dict[int, Message]:
        targets = [int(m.metadata.dst_node_id) for m in messages]
        replies = {int(r.metadata.src_node_id): r for r in self.grid.send_and_receive(messages)}
        missing = [t for t in targets if t not in replies]
        if missing:
            raise RuntimeError(f"edge(s) {missing} did not answer (SuperNode gone or timed out)")
        for cid, r in replies.items():
            if r.has_error():
                raise RuntimeError(f"edge {cid} failed: {r.error.reason}")
        return replies

    def play(self, seed: int, edges: list[int], specs: list[AdapterSpec]) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]:
        on_device = [self.specs.index(s) for s in specs if not is_cloud_edge(s)]
        if on_device:
            msgs = [
                Message(
                    RecordDict({"model": self.global_record, "config": ConfigRecord(self._config(seed, **{"fedsim.specs": json.dumps(on_device)}))}),
                    dst_node_id=e,
                    message_type=ADAPT,
                )
                for e in edges
            ]
            replies = self._send(msgs)
            for e in edges:
                for item in json.loads(str(replies[e].content["config"]["results"])):
                    res = result_from_json(item["result"])
                    self.progress({"edge": e, "adapter": res.adapter, "seed": seed, "batches": len(res.batches), "samples": res.samples, "correct": sum(b.correct for b in res.batches), "done": True, "on_device": True, "seconds": sum(b.seconds for b in res.batches)})
                    yield self.specs[item["spec"]], e, res, item["description"]
        for spec in specs:
            if is_cloud_edge(spec):
                yield from self._play_cema(seed, edges, spec)

    def _play_cema(self, seed: int, edges: list[int], spec: AdapterSpec) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]:
        from adapters import build_adapter
        from adapters.cema import CEMA
        from fedsim.tta.players import adapter_args
        from fedsim.tta.streams import stream_seed

        index = self.specs.index(spec)
        clouds: dict[int, CEMA] = {}
        for e in edges:
            adapter = build_adapter(spec.name, self.models[e], **adapter_args(spec, stream_seed(seed, e), self.foundation))
            assert isinstance(adapter, CEMA)
            clouds[e] = adapter
        batches: dict[int, list[BatchRecord]] = {e: [] for e in edges}
        records: dict[int, dict[str, Any]] = {}
        affine: dict[int, ArrayRecord | None] = {e: None for e in edges}
        reset_next: dict[int, bool] = {e: False for e in edges}
        active = list(edges)
        first = True
        while active:
            msgs = []
            for e in active:
                content = RecordDict({"config": ConfigRecord(self._config(seed, **{"fedsim.spec": index, "fedsim.needed": clouds[e].cloud.needed(), "fedsim.reset": reset_next[e]}))})
                if first:
                    content["model"] = self.global_record
                if affine[e] is not None:
                    content["affine"] = affine[e]
                msgs.append(Message(content, dst_node_id=e, message_type=CEMA_STEP))
            replies = self._send(msgs)
            first = False
            still = []
            for e in active:
                reply = replies[e]
                cfg = reply.content["config"]
                if cfg["record"]:
                    records[e] = json.loads(str(cfg["record"]))
                cloud = clouds[e].cloud
                rows = [BatchRecord(*row) for row in json.loads(str(cfg["batches"]))]
                # Cloud counters as the in-process adapter reports them after each batch:
                # only the last batch of a reply can have started cloud rounds.
                for row in rows:
                    row.metrics = {**row.metrics, "upload_fraction": row.metrics["samples_uploaded"] / row.metrics["samples"], "bytes_down": float(cloud.bytes_down), "cloud_steps": float(cloud.steps)}
                affine[e], reset_next[e] = None, False
                if "uploads" in reply.content:
                    images = torch.from_numpy(record_to_numpy(reply.content["uploads"])["images"].copy())
                    if cloud.receive(images):
                        affine[e] = numpy_to_record({f"p{i}": p.detach().cpu().numpy() for i, p in enumerate(cloud.edge_affine())})
                if rows:
                    rows[-1].metrics.update(bytes_down=float(cloud.bytes_down), cloud_steps=float(cloud.steps))
                if bool(cfg["boundary"]):
                    cloud.reset()
                    affine[e], reset_next[e] = None, True
                batches[e].extend(rows)
                done = bool(cfg["done"])
                last = batches[e][-1] if batches[e] else None
                self.progress(
                    {
                        "edge": e, "adapter": spec.display, "seed": seed, "batches": len(batches[e]),
                        "samples": sum(b.samples for b in batches[e]), "correct": sum(b.correct for b in batches[e]),
                        "uploaded": int(last.metrics["samples_uploaded"]) if last else 0,
                        "bytes_up": float(last.metrics["bytes_up"]) if last else 0.0,
                        "bytes_down": float(cloud.bytes_down), "cloud_steps": cloud.steps, "done": done, "on_device": False,
                        "seconds": sum(b.seconds for b in batches[e]),
                    }
                )
                if not done:
                    still.append(e)
            active = still
        for e in edges:
            res = StreamResult(adapter=spec.display, reset_on_new_shift=bool(records[e]["reset_on_new_shift"]))
            res.batches = batches[e]
            res.metrics = dict(batches[e][-1].metrics) if batches[e] else {}
            res.segment_metrics = segment_changes(batches[e])
            res.stream = records[e]
            yield spec, e, res, clouds[e].describe()
