"""Vectorized cohorts: a round's clients trained at once with ``torch.func`` (opt-in).

``runtime: {name: inline, vectorize: true}`` runs the inline runtime on a
:class:`VectorizedGrid`. Given a round's train messages, it trains every eligible client as
one batched computation instead of one after another, and replies exactly what
:meth:`fedsim.engine.client.ClientRuntime.train` replies (same arrays, metrics, client-state
files), so no strategy can tell the difference (``client_wall_s`` runs from a client's
loading to its reply, so it includes the whole cohort's training).

Method. Every client is loaded as in sequential training (faults drawn, the strategy's
hooks load the received arrays and the client's local state into the runtime's model) and
its parameters and buffers are stacked along a new leading client dimension k. One local
step of the cohort is

    (loss_k, logits_k) = vmap_k( CE(functional_call(model, (theta_k, buffers_k), x_k), y_k) )
    g = d(sum_k loss_k) / d theta          (loss_k depends on theta_k only, so g_k = d loss_k / d theta_k)

(plus FedProx's proximal term per client when the message asks for it), followed by the
optimizer's update written elementwise over the stacked tensors:
``torch.optim.SGD``'s single-tensor formulas (weight decay, momentum; a fresh buffer per
round, as each sequential client builds a fresh optimizer) or ``torch.optim.Adam``'s, and,
when the message config asks for it, adaptive gradient clipping per client and per unit
(:mod:`fedsim.engine.agc`). BatchNorm's running statistics are stacked buffers updated in
place under vmap, so each client keeps its own statistics, exactly as sequentially. Each
client draws its batches through :func:`fedsim.engine.client.batch_indices` with its own
seed: the same samples in the same order as sequential training. Parameters agree with
sequential training to float tolerance (batched kernels sum in another order), not bit
for bit.

Eligibility. Decided per round; each reason to train some clients one after another is
logged once per run (``VectorizedGrid.fallbacks`` keeps them):

- a per-client timeout (``faults.client_timeout_s``) needs each client timed alone;
- a model with random layers (dropout) would draw other random numbers under vmap;
- strategy hooks that change the local step (``extra_loss``, ``before_step``,
  ``after_step`` overridden, e.g. FedTiny's and MagPrune's masks). Hooks that only change
  what is loaded and replied qualify: FedAvg, FedBN, FedWon (its AGC is vectorized here),
  EF21 / EControl / plain compression, Flower's server-side strategies (FedAdam, ...) and
  FedProx (its proximal term is vectorized here);
- different data sizes (so batch sizes and step counts) are no obstacle without
  BatchNorm: batches are padded and masked (:func:`train_cohort`). BatchNorm's batch
  statistics would see the padding, so its clients are grouped by batch-size schedule.
  Clients are also grouped by their AGC settings. A client alone in its group, and a lone
  train message, train sequentially (bit-identical to the inline runtime);
- anything ``torch.func`` cannot batch (a user's model) falls back with the error logged.

Evaluation messages always run sequentially.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from flwr.app import Context, Error, Message, MessageType
from flwr.clientapp import ClientApp
from torch import nn
from torch.func import functional_call, vmap

from fedsim.config import ClientConfig, Scenario
from fedsim.engine.agc import agc_settings
from fedsim.engine.client import ClientRuntime, TrainJob, batch_indices, hooks_from_config
from fedsim.engine.grid import InlineGrid
from fedsim.engine.hooks import ClientHooks
from fedsim.engine.optim import ClientOptimizer

log = logging.getLogger(__name__)

Stats = tuple[float, int, int, int]  # loss sum, correct, samples seen, steps (ClientRuntime._fit's result)
AGC = tuple[float, float, tuple[str, ...]]  # lambda (0: off), eps, excluded name prefixes


# -- eligibility ----------------------------------------------------------------------------
def model_blocker(model: nn.Module) -> str | None:
    """Why this model cannot train vectorized (None: it can)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, nn.AlphaDropout)):
            return f"model layer '{name}' ({type(module).__name__}) draws random numbers, which vmap would draw differently"
    return None


def step_blocker(hooks: ClientHooks) -> str | None:
    """Why these strategy hooks need the sequential step (None: the vectorized step is theirs)."""
    cls = type(hooks)
    changed = [m for m in ("extra_loss", "before_step", "after_step") if getattr(cls, m) is not getattr(ClientHooks, m)]
    if changed:
        return f"strategy client hooks {cls.__qualname__} change the local step ({', '.join(changed)})"
    return None  # FedProx's proximal term (ClientHooks.extra_loss) is train_cohort's prox_mu


# -- the vectorized step ----------------------------------------------------------------------
def _stacked_unit_norm(x: torch.Tensor) -> torch.Tensor:
    """:func:`fedsim.engine.agc.unitwise_norm` of every client slice x[k], shaped to broadcast."""
    if x.ndim <= 2:  # each client's tensor is a scalar or a vector: one unit
        return x.reshape(x.shape[0], -1).norm(p=2, dim=1).view(-1, *([1] * (x.ndim - 1)))
    return x.flatten(2).norm(p=2, dim=2).view(x.shape[0], x.shape[1], *([1] * (x.ndim - 2)))


@torch.no_grad()
def stacked_agc_(params: list[torch.Tensor], grads: list[torch.Tensor], clip: float, eps: float) -> None:
    """Adaptive gradient clipping of each client's gradients, unit-wise (the formula of
    :func:`fedsim.engine.agc.adaptive_clip_` applied to every slice k), in place."""
    for p, g in zip(params, grads):
        max_norm = clip * _stacked_unit_norm(p).clamp_min(eps)
        g_norm = _stacked_unit_norm(g)
        over = g_norm > max_norm
        g.mul_(torch.where(over, max_norm / g_norm.clamp_min(1e-30), torch.ones_like(g_norm)))


class CohortOptimizer(ClientOptimizer):
    """``torch.optim.SGD`` / ``torch.optim.Adam`` (as :meth:`ClientRuntime._optimizer` builds
    them) over stacked parameters: :class:`fedsim.engine.optim.ClientOptimizer`'s
    single-tensor formulas are elementwise, so each client slice is updated as its own
    optimizer would update it; clients whose training is over are held as they are."""

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], ended: torch.Tensor | None = None) -> None:  # type: ignore[override]
        """One step of every client; ``ended`` (bool [K]): clients whose training is over,
        whose parameters and optimizer state are kept as they are."""
        if ended is None:
            self.update(list(grads))
            return
        kept = [[t.clone() for t in self.tensors(i)] for i in range(len(self.params))]
        self.update(list(grads))
        for i, before in enumerate(kept):
            # state created by this update (a first step) has nothing to restore: zip stops
            for t, old in zip(self.tensors(i), before):
                t.copy_(torch.where(ended.view(-1, *([1] * (t.ndim - 1))), old, t))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _padded_steps(
    schedules: list[list[torch.Tensor]], offsets: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Per step: indices [K, B] into the cohort's concatenated data (each client's batch,
    padded to the step's largest batch with its own first sample), the mask of real samples
    [K, B], and each client's batch size (0: its schedule has ended)."""
    steps = []
    for t in range(max(len(s) for s in schedules)):
        sizes = [len(s[t]) if t < len(s) else 0 for s in schedules]
        width = max(sizes)
        idx = torch.full((len(schedules), width), 0, dtype=torch.long)
        mask = torch.zeros(len(schedules), width)
        for k, (s, o) in enumerate(zip(schedules, offsets)):
            idx[k] = o  # padding: the client's first sample, masked out
            if sizes[k]:
                idx[k, : sizes[k]] = s[t] + o
                mask[k, : sizes[k]] = 1.0
        steps.append((idx, mask, sizes))
    return steps


def train_cohort(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    schedules: list[list[torch.Tensor]],
    client: ClientConfig,
    agc: AGC = (0.0, 0.0, ()),
    device: torch.device | str = "cpu",
    prox_mu: float = 0.0,
) -> tuple[list[dict[str, torch.Tensor]], list[Stats]]:
    """Train K clients at once (see the module docstring). ``states[k]``: client k's named
    parameters and buffers (as ``model.named_parameters()`` / ``named_buffers()`` name them);
    ``xs[k], ys[k]``: its training data; ``schedules[k]``: its index batches. Returns each
    client's trained tensors and its (loss sum, correct, seen, steps), as
    :meth:`ClientRuntime._fit` counts them. ``prox_mu`` > 0 adds FedProx's proximal term
    ``mu/2 ||theta_k - theta_k(start)||^2`` to each client's loss (as
    :meth:`ClientHooks.extra_loss`; the loss sums count the task loss only, as sequentially).

    Schedules may differ in batch sizes and step counts when the model has no BatchNorm:
    each step's batches are padded to one size and the task loss of client k is
    ``sum_i m_ki CE_ki / sum_i m_ki`` over its real samples (m: the mask), which is its own
    batch's mean, since every other layer treats samples independently; a client whose
    schedule has ended keeps its parameters and optimizer state (its steps are a prefix of
    the cohort's, so one step counter serves Adam's bias correction). BatchNorm's batch
    statistics would see the padding, so with BatchNorm every schedule must have the same
    batch sizes, step by step (ValueError otherwise)."""
    k = len(states)
    uniform = all([len(i) for i in s] == [len(i) for i in schedules[0]] for s in schedules)
    if not uniform and has_batchnorm(model):
        raise ValueError("train_cohort: with BatchNorm every client needs the same batch sizes, step by step")
    device = torch.device(device)
    model.train()
    pnames = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    bnames = [n for n, _ in model.named_buffers()]
    with torch.no_grad():
        params = {n: torch.stack([s[n] for s in states]).to(device) for n in pnames}
        buffers = {n: torch.stack([s[n] for s in states]).to(device) for n in bnames}
    for n in trainable:
        params[n].requires_grad_(True)
    leaves = [params[n] for n in trainable]
    lam, eps, exclude = agc
    clipped = [i for i, n in enumerate(trainable) if not any(n.startswith(e) for e in exclude)]
    opt = CohortOptimizer(client, leaves)

    anchor = {n: params[n].detach().clone() for n in trainable} if prox_mu > 0 else {}

    def client_loss(p, b, a, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor):
        logits = functional_call(model, (p, b), (x,))
        task = (F.cross_entropy(logits, y, reduction="none") * m).sum() / m.sum().clamp_min(1.0)
        total = task + 0.5 * prox_mu * sum(((p[n] - a[n]) ** 2).sum() for n in a) if a else task
        return total, task, logits

    batched = vmap(client_loss, randomness="error")
    loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
    correct = torch.zeros(k, dtype=torch.int64, device=device)
    # the cohort's data once on the device, each step's batches one gather [K, B, ...]
    offsets = torch.tensor([0, *[len(y) for y in ys]]).cumsum(0)[:-1].tolist()
    x_all, y_all = torch.cat(xs).to(device), torch.cat(ys).to(device)
    for idx, mask, sizes in _padded_steps(schedules, offsets):
        idx, mask = idx.to(device), mask.to(device)
        xb, yb = x_all[idx], y_all[idx]
        totals, losses, logits = batched(params, buffers, anchor, xb, yb, mask)
        grads = list(torch.autograd.grad(totals.sum(), leaves))
        if lam > 0:
            stacked_agc_([leaves[i] for i in clipped], [grads[i] for i in clipped], lam, eps)
        ended = None if all(sizes) else torch.tensor([n == 0 for n in sizes], device=device)
        opt.step(grads, ended)
        loss_sum += losses.detach().double() * torch.tensor(sizes, dtype=torch.float64, device=device)
        correct += ((logits.detach().argmax(-1) == yb) & mask.bool()).sum(1)
    out = [{n: t[i].detach() for n, t in (*params.items(), *buffers.items())} for i in range(k)]
    stats = [
        (float(loss_sum[i]), int(correct[i]), sum(len(b) for b in schedules[i]), len(schedules[i])) for i in range(k)
    ]
    return out, stats


# -- the grid ------------------------------------------------------------------------------
def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}


@torch.no_grad()
def _put(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for n, t in (*model.named_parameters(), *model.named_buffers()):
        t.copy_(tensors[n])


def _error(msg: Message, exc: Exception) -> Message:
    return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)  # as InlineGrid replies


class VectorizedGrid(InlineGrid):
    """:class:`InlineGrid` that trains a round's eligible clients as vectorized cohorts.

    ``runtime``: returns the process's :class:`ClientRuntime` (the one ``client_app`` uses,
    :func:`fedsim.engine.client.client_runtime`), whose model, data and state files the
    cohort shares with the sequential path."""

    def __init__(
        self,
        client_app: ClientApp,
        contexts: dict[int, Context],
        runtime: Callable[[], ClientRuntime],
        scenario: Scenario,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__(client_app, contexts, timeout_s)
        self.runtime = runtime
        self.scenario = scenario
        self.fallbacks: list[str] = []  # each reason some clients trained sequentially, once
        self.cohorts: list[int] = []  # the size of every cohort trained vectorized

    def _fallback(self, reason: str) -> None:
        if reason not in self.fallbacks:
            self.fallbacks.append(reason)
            log.warning("runtime.vectorize: %s; those clients train one after another", reason)

    def _run_batch(self, messages: list[Message]) -> Iterable[Message]:
        done = self._train_vectorized([m for m in messages if m.metadata.message_type == MessageType.TRAIN])
        replies = []
        for msg in messages:
            mid = msg.metadata.message_id
            reply = done.pop(mid) if mid in done else self._deliver(msg)
            if reply is not None:
                replies.append(reply)
        return replies

    def _train_vectorized(self, train: list[Message]) -> dict[str, Message]:
        """Replies (by message id) of the train messages handled here; the others go through
        the sequential path."""
        if len(train) < 2:
            return {}
        if self.timeout_s is not None:
            self._fallback("faults.client_timeout_s: a per-client timeout needs each client timed alone")
            return {}
        rt = self.runtime()
        blocker = model_blocker(rt.model)
        if blocker:
            self._fallback(blocker)
            return {}
        has_bn = has_batchnorm(rt.model)
        done: dict[str, Message] = {}
        groups: dict[tuple[Any, ...], list[tuple[TrainJob, dict[str, torch.Tensor], list[torch.Tensor]]]] = {}
        for msg in train:
            config = dict(msg.content["config"]) if "config" in msg.content else {}
            try:
                reason = step_blocker(hooks_from_config(config))
                if reason:
                    self._fallback(reason)
                    continue
                agc = agc_settings(config)
                job = rt.begin_train(msg, self.contexts[msg.metadata.dst_node_id])
                prox = job.hooks.prox_mu
            except Exception as exc:  # a failing client (injected failure) must not stop the round
                done[msg.metadata.message_id] = _error(msg, exc)
                continue
            schedule = list(batch_indices(len(job.y), self.scenario.client, job.seed, skip_singletons=has_bn))
            # BatchNorm needs equal batches step by step; other models pad (train_cohort)
            key = (tuple(len(i) for i in schedule) if has_bn else (), agc, prox)
            groups.setdefault(key, []).append((job, _named_tensors(rt.model), schedule))
        for (_, agc, prox), members in groups.items():
            results: list[tuple[dict[str, torch.Tensor], Stats]] | None = None
            if len(members) > 1:
                try:
                    states, stats = train_cohort(
                        rt.model,
                        [m[1] for m in members],
                        [m[0].x for m in members],
                        [m[0].y for m in members],
                        [m[2] for m in members],
                        self.scenario.client,
                        agc,
                        rt.device,
                        prox,
                    )
                    results = list(zip(states, stats))
                    self.cohorts.append(len(members))
                except Exception as exc:  # e.g. a user's layer without a vmap rule: stay correct
                    self._fallback(f"torch.func could not train the cohort ({type(exc).__name__}: {exc})")
            else:
                why = (
                    "a BatchNorm model's client alone in its batch-size schedule (different data size)"
                    if has_bn
                    else "a client alone with its AGC / proximal settings"
                )
                self._fallback(f"{why} has no cohort")
            for i, (job, initial, _) in enumerate(members):
                try:
                    if results is not None:
                        _put(rt.model, results[i][0])
                        stats_i = results[i][1]
                    else:  # sequentially, from the state its hooks loaded
                        _put(rt.model, initial)
                        stats_i = rt._fit(job.hooks, job.x, job.y, job.seed)
                    done[job.msg.metadata.message_id] = rt.finish_train(job, stats_i)
                except Exception as exc:
                    done[job.msg.metadata.message_id] = _error(job.msg, exc)
        return done


__all__ = [
    "CohortOptimizer",
    "VectorizedGrid",
    "has_batchnorm",
    "model_blocker",
    "stacked_agc_",
    "step_blocker",
    "train_cohort",
]
