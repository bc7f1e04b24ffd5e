"""fedsim's Flower ClientApp: local training and evaluation of one partition.

The same ClientApp object runs in-process (inline runtime), in Ray actors (Flower's
simulation engine) and on SuperNodes. Everything a client needs comes from the scenario
it was built with, the message it receives and its partition id
(``context.node_config["partition-id"]``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedsim.arrays import NamedArrays, numpy_to_record, record_to_numpy
from fedsim.config import ClientConfig, Scenario
from fedsim.data.loading import ClientDataCache
from fedsim.engine.client_state import ClientState
from fedsim.engine.hooks import HOOKS_KEY, TASK_KEY, ClientHooks
from fedsim.engine.malloc import keep_freed_memory
from fedsim.engine.optim import ClientOptimizer
from fedsim.models import build_model
from fedsim.registry import import_object

HELLO = "query"  # message type of the discovery round (node id -> partition id)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def client_seed(seed: int, server_round: int, client_id: int, salt: int = 0) -> int:
    """A seed that depends only on (scenario seed, round, client), not on execution order,
    so the inline and Ray runtimes train every client identically."""
    return int(np.random.SeedSequence([seed, server_round, client_id, salt]).generate_state(1)[0])


def hooks_from_config(config: dict[str, Any]) -> ClientHooks:
    path = config.get(HOOKS_KEY)
    cls = ClientHooks if not path else import_object(str(path))
    return cls(config)  # type: ignore[operator]


def batch_indices(n: int, client: ClientConfig, seed: int, skip_singletons: bool) -> Iterator[torch.Tensor]:
    """The index batches of one client's local training, in order: ``client.local_steps``
    steps, or ``client.local_epochs`` epochs of ``ceil(n / batch)`` steps (``n // batch``
    with ``drop_last``), each epoch a fresh permutation from a generator seeded with ``seed``.
    ``skip_singletons``: a batch of one sample is drawn but not trained on (BatchNorm cannot
    train on it) and does not count as a step. Every runtime draws through this function,
    so one seed gives one sample order wherever the client trains."""
    gen = torch.Generator().manual_seed(seed)
    bs = min(client.batch_size, n)
    per_epoch = n // bs if client.drop_last else math.ceil(n / bs)
    total = client.local_steps if client.local_steps is not None else client.local_epochs * per_epoch
    end = per_epoch * bs if client.drop_last else n
    perm, pos, steps = torch.randperm(n, generator=gen), 0, 0
    while steps < total:
        if pos >= end:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs]
        pos += bs
        if skip_singletons and len(idx) < 2:
            continue
        steps += 1
        yield idx


@dataclass
class TrainJob:
    """One client's train message between :meth:`ClientRuntime.begin_train` and
    :meth:`ClientRuntime.finish_train`: what the reply needs, and the data to train on."""

    msg: Message
    t0: float
    cid: int
    spoil: str | None
    received: NamedArrays
    hooks: ClientHooks
    state: ClientState
    x: torch.Tensor
    y: torch.Tensor
    seed: int


class ClientRuntime:
    """Per-process client machinery: the dataset cache and one reusable model instance."""

    def __init__(self, scenario: Scenario, run_dir: str | None) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.device = resolve_device(scenario.device)
        torch.set_num_threads(scenario.runtime.num_threads)
        if scenario.runtime.keep_freed_memory:
            keep_freed_memory()
        self.data = ClientDataCache(scenario.data, scenario.seed)
        ds = self.data.dataset
        m = scenario.model
        self.model: nn.Module = build_model(
            m.name, ds.num_classes, ds.channels, ds.image_size, m.normalization, m.args, seed=scenario.seed
        ).to(self.device)
        # Reset to this before loading a message, so no state leaks between clients that
        # share this process (e.g. FedBN's local BN of the previous client).
        self.initial_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _reset(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(self.initial_state[k])

    def _state(self, context: Context, server_round: int, inclusive: bool) -> ClientState:
        from pathlib import Path

        root = Path(self.run_dir) if self.run_dir else None
        return ClientState(root, self.client_id(context), server_round, context, inclusive=inclusive)

    @staticmethod
    def client_id(context: Context) -> int:
        return int(context.node_config["partition-id"])

    def _optimizer(self) -> ClientOptimizer | torch.optim.Optimizer:
        """A fresh optimizer for one client's local training. On CPU fedsim's own copy of
        torch.optim's update (:mod:`fedsim.engine.optim`: the same bits, without importing
        torch._dynamo); elsewhere torch.optim (its foreach kernels)."""
        c = self.scenario.client
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.device.type == "cpu":
            return ClientOptimizer(c, params)
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _inject_faults(self, cid: int, server_round: int, attempt: int) -> str | None:
        """Scenario-driven fault injection (seeded per client and round): may sleep
        (straggler), raise (failure), or return how to spoil the reply ("nan", "shape")."""
        f = self.scenario.faults
        if not (f.failure_prob or f.nan_prob or f.straggler_prob or f.bad_shape_prob):
            return None
        rng = np.random.default_rng(client_seed(self.scenario.seed, server_round, cid, 0xFA17 + attempt))
        fail, nan, slow, shape = rng.random(4)
        if slow < f.straggler_prob and f.straggler_delay_s > 0:
            time.sleep(f.straggler_delay_s)
        if fail < f.failure_prob:
            raise RuntimeError("injected client failure (faults.failure_prob)")
        if nan < f.nan_prob:
            return "nan"
        return "shape" if shape < f.bad_shape_prob else None

    def train(self, msg: Message, context: Context) -> Message:
        job = self.begin_train(msg, context)
        return self.finish_train(job, self._fit(job.hooks, job.x, job.y, job.seed))

    def begin_train(self, msg: Message, context: Context) -> TrainJob:
        """First half of :meth:`train`: faults drawn, the received arrays and the client's
        local state loaded into :attr:`model` by the strategy's hooks. Raises what the
        client raises (an injected failure)."""
        t0 = time.perf_counter()
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        server_round = int(config.get("server-round", 0))
        attempt = int(config.get("fedsim.attempt", 0))
        cid = self.client_id(context)
        spoil = self._inject_faults(cid, server_round, attempt)
        received = record_to_numpy(next(iter(msg.content.array_records.values())))
        hooks = hooks_from_config(config)
        state = self._state(context, server_round, inclusive=False)
        self._reset()
        hooks.load(self.model, received, state)
        data = self.data.client(cid)
        seed = client_seed(self.scenario.seed, server_round, cid)
        return TrainJob(msg, t0, cid, spoil, received, hooks, state, data.x_train, data.y_train, seed)

    def finish_train(self, job: TrainJob, fit: tuple[float, int, int, int]) -> Message:
        """Second half of :meth:`train`: the reply from :attr:`model` (trained by ``fit``,
        which gave (loss sum, correct, samples seen, steps)), client state committed."""
        loss_sum, correct, seen, steps = fit
        reply = job.hooks.reply(self.model, job.received, job.state)
        if job.spoil == "nan":
            reply = {k: np.full_like(v, np.nan) if np.issubdtype(v.dtype, np.floating) else v for k, v in reply.items()}
        elif job.spoil == "shape":
            first = next(iter(reply))
            reply[first] = np.zeros(reply[first].size + 1, reply[first].dtype)
        job.state.commit()
        metrics = {
            "num-examples": int(len(job.y)),
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "train_steps": steps,
            "client_wall_s": time.perf_counter() - job.t0,
            **job.hooks.metrics(),
        }
        content = RecordDict({"arrays": numpy_to_record(reply), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=job.msg)

    def _fit(self, hooks: ClientHooks, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[float, int, int, int]:
        c = self.scenario.client
        model = self.model
        model.train()
        opt = self._optimizer()
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        # running sums stay on the device: converting to Python numbers every step would
        # synchronise a GPU twice per step. float64 products and sums of float32 losses give
        # the same bits as the Python-float accumulation they replace.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen, steps = 0, 0
        for idx in batch_indices(len(y), c, seed, skip_singletons=has_bn):
            xb, yb = x[idx].to(self.device, non_blocking=True), y[idx].to(self.device, non_blocking=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            extra = hooks.extra_loss(model)
            total_loss = loss if extra is None else loss + extra
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            hooks.before_step(model)
            opt.step()
            hooks.after_step(model)
            steps += 1
            loss_sum += loss.detach().double() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(idx)
        return float(loss_sum), int(correct), seen, steps

    @torch.no_grad()
    def _score(self, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> tuple[int, float, int]:
        self.model.eval()
        correct, loss = 0, 0.0
        for i in range(0, len(y), batch):
            xb, yb = x[i : i + batch].to(self.device), y[i : i + batch].to(self.device)
            logits = self.model(xb)
            loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        return correct, loss, len(y)

    def evaluate(self, msg: Message, context: Context) -> Message:
        config = dict(msg.content["config"]) if "config" in msg.content else {}
        server_round = int(config.get("server-round", 0))
        cid = self.client_id(context)
        received = record_to_numpy(next(iter(msg.content.array_records.values())))
        hooks = hooks_from_config(config)
        task = config.get(TASK_KEY)
        state = self._state(context, server_round, inclusive=not task)
        self._reset()
        if task:  # a strategy-specific forward-only job (e.g. FedTiny's BN re-estimation)
            content = hooks.run_task(str(task), self, cid, received, state)
            state.commit()
            return Message(content, reply_to=msg)
        hooks.load(self.model, received, state)
        data = self.data.client(cid)
        correct, loss, n = self._score(data.x_test, data.y_test)
        metrics: dict[str, Any] = {
            "num-examples": n,
            "accuracy": correct / max(n, 1),
            "loss": loss / max(n, 1),
        }
        part = self.data.partition(cid)
        held = set(part.domains)
        # Same keys from every client (Flower requires it): zeros for domains not held.
        for d in self.data.dataset.domains:
            dc, dn = 0, 0
            if d in held and self.scenario.evaluation.per_domain:
                xd, yd = self.data.domain_test(d)
                dc, _, dn = self._score(xd, yd)
            metrics[f"domain_correct.{d}"] = dc
            metrics[f"domain_total.{d}"] = dn
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    def hello(self, msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": self.client_id(context)})}), reply_to=msg)


_RUNTIMES: dict[tuple[str, str | None], ClientRuntime] = {}


def client_runtime(scenario_json: str, run_dir: str | None) -> ClientRuntime:
    """One ClientRuntime per process and scenario (a Ray actor builds it once)."""
    key = (scenario_json, run_dir)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # one experiment per process at a time
        _RUNTIMES[key] = ClientRuntime(Scenario.model_validate_json(scenario_json), run_dir)
    return _RUNTIMES[key]


def serve_runtime(app: ClientApp, runtime_of: Callable[[Context], ClientRuntime], hello: bool = True) -> None:
    """Register ``app``'s train and evaluate handlers (and, with ``hello``, its discovery
    query) on the :class:`ClientRuntime` that ``runtime_of(context)`` gives: every fedsim
    ClientApp (in-process, Ray, Flower's simulation and deployment runtimes) trains this way."""

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return runtime_of(context).train(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return runtime_of(context).evaluate(msg, context)

    if hello:

        @app.query()
        def query(msg: Message, context: Context) -> Message:
            return runtime_of(context).hello(msg, context)


def make_client_app(scenario: Scenario, run_dir: str | None, eager: bool = False) -> ClientApp:
    """Build the ClientApp for a scenario; ``run_dir`` holds client state between rounds.

    ``eager``: build this process's :class:`ClientRuntime` now, for runtimes that time each
    call in this process (``faults.client_timeout_s``): its one-time setup (data, model and,
    on an accelerator, torch's first optimizer importing torch._dynamo, 1.3 s here) must not
    count against the first client called. Elsewhere it is built on the first call, where the
    data is needed."""
    scenario_json = scenario.model_dump_json()
    if eager:
        client_runtime(scenario_json, run_dir)._optimizer()
    app = ClientApp()
    serve_runtime(app, lambda context: client_runtime(scenario_json, run_dir))
    return app


__all__ = [
    "make_client_app",
    "serve_runtime",
    "ClientRuntime",
    "TrainJob",
    "batch_indices",
    "client_seed",
    "client_runtime",
    "HELLO",
    "ArrayRecord",
    "ConfigRecord",
]
