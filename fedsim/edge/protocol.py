"""Test-time adaptation as messages between the cloud (ServerApp) and edges (SuperNodes).

Two message types, both answered by fedsim's deployed ClientApp (:mod:`fedsim.edge.apps`):

- ``query.adapt`` (on-device adapters: source, tbn, alpha_bn, unmix_tns, tent, ...): the
  cloud sends the global model; the edge deploys it (with its own local state when the
  deployment is personalized), builds its own stream and plays it through each adapter,
  then replies with the per-batch scores. Nothing is uploaded.
- ``query.split`` (cloud-edge adapters: any :class:`fedsim.adapters.base.SplitAdapter`, e.g. CEMA):
  the edge builds the adapter's edge half (``make_edge``) around its deployed model and
  plays batches (:func:`play_edge`: predict, select the upload) until its uploads reach
  the cloud half's ``upload_budget`` (at least one batch), a shift where the adapter
  resets, or the end of its stream; it replies with each batch's upload. The cloud hands
  them to its cloud half batch by batch (:func:`cloud_take`) and sends the model update it
  returns with the next message. The edge half's state (``state()`` / ``load_state()``)
  and counters live in the SuperNode's ``Context.state`` between messages (each message
  runs in a fresh process).

The sequence of edge forwards, uploads, cloud steps and model updates is the one the
in-process :class:`~fedsim.adapters.base.SplitAdapter` runs, so a demo scores what the simulation
scores. Nothing here names a particular adapter.
"""

from __future__ import annotations

import inspect
import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fedsim.adapters import adapter_class, adapter_settings, build_adapter
from fedsim.adapters.base import (
    CloudHalf,
    EdgeHalf,
    Payload,
    SplitAdapter,
    payload_bytes,
    uploaded_samples,
)
from fedsim.arrays import numpy_to_record, record_to_numpy
from fedsim.engine.client import ClientRuntime
from fedsim.engine.client_state import ClientState
from fedsim.engine.grid import PartitionGrid
from fedsim.tta.config import AdaptationConfig, AdapterSpec
from fedsim.tta.deploy import ModelRun, deploy_arrays
from fedsim.tta.players import adapter_args, play_stream
from fedsim.tta.runner import BatchRecord, StreamResult
from fedsim.tta.streams import edge_stream, stream_record, stream_seed

ADAPT = "query.adapt"
SPLIT_STEP = "query.split"
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


def _deploy(
    runtime: ClientRuntime, global_arrays: dict[str, np.ndarray], cid: int, config: dict[str, Any]
) -> torch.nn.Module:
    """The edge's model: the global arrays it was sent plus its own local state."""

    which = _adaptation(runtime).model
    rnd = int(config["fedsim.checkpoint_round"])
    local, local_round = None, None
    if which != "global" and runtime.run_dir:
        state = ClientState(Path(runtime.run_dir), cid, rnd, inclusive=True)
        local, local_round = state.get(LOCAL_ITEM), state._read_round.get(LOCAL_ITEM)
    model, _ = deploy_arrays(runtime.scenario, global_arrays, local, local_round, cid, which, rnd, f"edge {cid}")
    return model.to(runtime.device)


def _stream(runtime: ClientRuntime, cid: int, seed: int) -> tuple[list[Any], dict[str, Any], bool, int]:
    """This edge's stream for ``seed`` (batches), its record, reset policy and stream seed."""

    cfg = _adaptation(runtime)
    domain = runtime.data.partition(cid).domain
    sseed = stream_seed(seed, cid)
    stream = edge_stream(runtime.scenario, cfg, cid, domain, sseed)
    record, reset = stream_record(cfg, stream, cid, domain, seed)
    return list(stream), record, reset, sseed


def edge_adapt(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """``query.adapt``: play this edge's stream through each on-device adapter."""

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


def split_class(spec: AdapterSpec) -> type[SplitAdapter] | None:
    """The spec's adapter class if it is a cloud-edge (split) adapter, else None."""
    cls = adapter_class(spec.name)
    return cls if issubclass(cls, SplitAdapter) else None


def edge_settings(cls: type[SplitAdapter], spec: AdapterSpec) -> dict[str, Any]:
    """The settings a device builds its edge half with: defaults, then the spec's args
    (settings fedsim injects, such as a foundation model, stay absent)."""
    defaults = {k: v for k, v in adapter_settings(cls).items() if v is not inspect.Parameter.empty}
    return {**defaults, **spec.args}


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes, device: torch.device) -> Any:
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)


def play_edge(
    edge: EdgeHalf,
    batches: list[Any],
    start: int,
    budget: int,
    reset_on_new_shift: bool,
    counters: dict[str, float],
    device: torch.device,
    was_reset: bool = False,
) -> tuple[list[list[Any]], list[Payload | None], int, bool]:
    """Play batches from ``start`` through ``edge`` until its uploads since ``start`` reach
    ``budget`` (at least one batch), a shift where the adapter resets (``boundary``: the
    cloud resets before that batch; ``was_reset``: this message already reset for the
    shift at ``start``) or the end. ``counters`` (the edge's cumulative
    samples, batches, adapt_seconds, samples_uploaded, bytes_up) are updated in place.
    Returns the rows played (BatchRecord fields, metrics without the cloud's), each
    batch's upload, the next batch index and ``boundary``."""
    rows: list[list[Any]] = []
    uploads: list[Payload | None] = []
    uploaded, i, boundary = 0, start, False
    while i < len(batches):
        b = batches[i]
        if reset_on_new_shift and i > 0 and b.segment != batches[i - 1].segment and not (i == start and was_reset):
            boundary = True
            break
        t0 = time.perf_counter()
        x = b.x.to(device, torch.float32)
        logits = edge.predict(x)
        upload = edge.select(x, logits)
        seconds = time.perf_counter() - t0
        correct = int((logits.argmax(1).cpu() == torch.as_tensor(b.y)).sum())
        n = int(b.x.shape[0])
        counters["samples"] += n
        counters["batches"] += 1
        counters["adapt_seconds"] += seconds
        counters["samples_uploaded"] += uploaded_samples(upload)
        counters["bytes_up"] += payload_bytes(upload)
        uploaded += uploaded_samples(upload)
        uploads.append(upload)
        rows.append([b.index, b.segment, b.shift, n, correct, seconds, dict(counters)])
        i += 1
        if uploaded >= budget:
            break
    return rows, uploads, i, boundary


def cloud_take(
    cloud: CloudHalf, rows: list[BatchRecord], uploads: list[Payload | None], bytes_down: float
) -> tuple[Payload | None, float]:
    """The cloud's side of one reply: each played batch's upload in order, as the
    in-process :class:`~fedsim.adapters.base.SplitAdapter` hands them over. Completes each row's
    metrics as the in-process adapter reports them after that batch and returns the update
    for the edge's next message (None: none) and the bytes sent down so far."""
    update: Payload | None = None
    for j, (row, upload) in enumerate(zip(rows, uploads, strict=True)):
        update = cloud.receive(upload)
        if update is not None:
            if j + 1 < len(rows):
                raise RuntimeError("the split adapter's upload_budget let the edge play past a model update")
            bytes_down += payload_bytes(update)
        seen = row.metrics["samples"]
        row.metrics = {
            **row.metrics,
            "upload_fraction": row.metrics["samples_uploaded"] / seen if seen else 0.0,
            "bytes_down": float(bytes_down),
            **cloud.metrics(),
        }
    return update, bytes_down


def _payload_record(payload: Payload, prefix: str = "") -> ArrayRecord:
    return numpy_to_record({f"{prefix}{k}": v.detach().cpu().numpy() for k, v in payload.items()})


def edge_split(runtime: ClientRuntime, msg: Message, context: Context) -> Message:
    """``query.split``: the edge half of a cloud-edge adapter (module docstring)."""
    config = _config(msg)
    cid = runtime.client_id(context)
    spec_index, seed = int(config["fedsim.spec"]), int(config["fedsim.seed"])
    spec = _adaptation(runtime).adapter_specs()[spec_index]
    cls = split_class(spec)
    if cls is None:
        raise RuntimeError(f"adapter '{spec.name}' is not a cloud-edge (split) adapter")
    key = f"fedsim.split.{seed}.{spec_index}"
    arrays = msg.content.array_records
    if "model" in arrays:  # first message of this stream: keep the deployed model's arrays
        context.state[f"{key}.model"] = arrays["model"]
        context.state[f"{key}.state"] = ConfigRecord({"next": 0, "blob": b""})
    saved_record = context.state.config_records[f"{key}.state"]
    edge = cls.make_edge(
        _deploy(runtime, record_to_numpy(context.state.array_records[f"{key}.model"]), cid, config),
        edge_settings(cls, spec),
    )
    counters = {"samples": 0.0, "batches": 0.0, "adapt_seconds": 0.0, "samples_uploaded": 0.0, "bytes_up": 0.0}
    blob = bytes(saved_record["blob"])  # type: ignore[arg-type]
    if blob:
        saved = _from_bytes(blob, runtime.device)
        edge.load_state(saved["edge"])
        counters = saved["counters"]
    if "update" in arrays:
        edge.apply(
            {k: torch.from_numpy(v.copy()).to(runtime.device) for k, v in record_to_numpy(arrays["update"]).items()}
        )
    was_reset = bool(config.get("fedsim.reset", False))
    if was_reset:  # the adapter resets at a new shift
        edge.reset()
    batches, record, reset, _ = _stream(runtime, cid, seed)
    start = int(saved_record["next"])  # type: ignore[arg-type]
    played, uploads, i, boundary = play_edge(
        edge, batches, start, int(config["fedsim.budget"]), reset, counters, runtime.device, was_reset
    )
    context.state[f"{key}.state"] = ConfigRecord(
        {"next": i, "blob": _to_bytes({"edge": edge.state(), "counters": counters})}
    )
    content = RecordDict(
        {
            "config": ConfigRecord(
                {
                    "batches": json.dumps(played),
                    "done": i >= len(batches),
                    "boundary": boundary,
                    "record": json.dumps(record) if start == 0 else "",
                }
            ),
            "metrics": MetricRecord({"uploaded": sum(uploaded_samples(u) for u in uploads)}),
        }
    )
    sent = {f"{j}/{k}": v for j, u in enumerate(uploads) if u for k, v in u.items()}
    if sent:
        content["uploads"] = _payload_record(sent)
    return Message(content, reply_to=msg)


def _uploads_of(reply: Message, count: int) -> list[Payload | None]:
    out: list[Payload | None] = [None] * count
    if "uploads" in reply.content:
        for name, arr in record_to_numpy(reply.content["uploads"]).items():
            j, key = name.split("/", 1)
            payload = out[int(j)] or {}
            payload[key] = torch.from_numpy(arr.copy())
            out[int(j)] = payload
    return out


# -- the cloud side (runs in the ServerApp) ------------------------------------------------
def is_cloud_edge(spec: AdapterSpec) -> bool:
    return split_class(spec) is not None


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

    def play(
        self, seed: int, edges: list[int], specs: list[AdapterSpec]
    ) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]:
        on_device = [self.specs.index(s) for s in specs if not is_cloud_edge(s)]
        if on_device:
            msgs = [
                Message(
                    RecordDict(
                        {
                            "model": self.global_record,
                            "config": ConfigRecord(self._config(seed, **{"fedsim.specs": json.dumps(on_device)})),
                        }
                    ),
                    dst_node_id=e,
                    message_type=ADAPT,
                )
                for e in edges
            ]
            replies = self._send(msgs)
            for e in edges:
                for item in json.loads(str(replies[e].content["config"]["results"])):
                    res = result_from_json(item["result"])
                    self.progress(
                        {
                            "edge": e,
                            "adapter": res.adapter,
                            "seed": seed,
                            "batches": len(res.batches),
                            "samples": res.samples,
                            "correct": sum(b.correct for b in res.batches),
                            "done": True,
                            "on_device": True,
                            "seconds": sum(b.seconds for b in res.batches),
                        }
                    )
                    yield self.specs[item["spec"]], e, res, item["description"]
        for spec in specs:
            if is_cloud_edge(spec):
                yield from self._play_split(seed, edges, spec)

    def _play_split(
        self, seed: int, edges: list[int], spec: AdapterSpec
    ) -> Iterator[tuple[AdapterSpec, int, StreamResult, dict[str, Any]]]:
        index = self.specs.index(spec)
        adapters: dict[int, SplitAdapter] = {}
        for e in edges:
            adapter = build_adapter(
                spec.name, self.models[e], **adapter_args(spec, stream_seed(seed, e), self.foundation)
            )
            assert isinstance(adapter, SplitAdapter)
            adapters[e] = adapter
        batches: dict[int, list[BatchRecord]] = {e: [] for e in edges}
        records: dict[int, dict[str, Any]] = {}
        update: dict[int, Payload | None] = {e: None for e in edges}
        bytes_down: dict[int, float] = {e: 0.0 for e in edges}
        reset_next: dict[int, bool] = {e: False for e in edges}
        active = list(edges)
        first = True
        while active:
            msgs = []
            for e in active:
                extra = {
                    "fedsim.spec": index,
                    "fedsim.budget": adapters[e].cloud.upload_budget(),
                    "fedsim.reset": reset_next[e],
                }
                content = RecordDict({"config": ConfigRecord(self._config(seed, **extra))})
                if first:
                    content["model"] = self.global_record
                pending = update[e]
                if pending is not None:
                    content["update"] = _payload_record(pending)
                msgs.append(Message(content, dst_node_id=e, message_type=SPLIT_STEP))
            replies = self._send(msgs)
            first = False
            still = []
            for e in active:
                reply = replies[e]
                cfg = reply.content["config"]
                if cfg["record"]:
                    records[e] = json.loads(str(cfg["record"]))
                cloud = adapters[e].cloud
                rows = [BatchRecord(*row) for row in json.loads(str(cfg["batches"]))]
                update[e], bytes_down[e] = cloud_take(cloud, rows, _uploads_of(reply, len(rows)), bytes_down[e])
                reset_next[e] = False
                if bool(cfg["boundary"]):
                    cloud.reset()
                    update[e], reset_next[e] = None, True
                batches[e].extend(rows)
                done = bool(cfg["done"])
                last = batches[e][-1] if batches[e] else None
                m = last.metrics if last and last.metrics else {}
                self.progress(
                    {
                        "edge": e,
                        "adapter": spec.display,
                        "seed": seed,
                        "batches": len(batches[e]),
                        "samples": sum(b.samples for b in batches[e]),
                        "correct": sum(b.correct for b in batches[e]),
                        "uploaded": int(m.get("samples_uploaded", 0)),
                        "bytes_up": float(m.get("bytes_up", 0.0)),
                        "bytes_down": bytes_down[e],
                        "cloud_steps": int(m.get("cloud_steps", 0)),
                        "done": done,
                        "on_device": False,
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
            yield spec, e, res, adapters[e].describe()
