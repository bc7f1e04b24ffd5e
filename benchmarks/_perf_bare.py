"""The bare-PyTorch baseline of ``benchmarks.perf`` (targets 1 and 6): FedAvg written as a
plain loop in one process, no Flower, no messages, no checkpoints.

It does exactly the optimizer work of fedsim's inline runtime for a FedAvg scenario with
``fraction_train: 1.0``: every round, every client starts from the global model, builds a
fresh optimizer (same settings), and takes the same number of steps over the same batches
(same seed per (scenario seed, round, client), same ``randperm`` order, same batch size);
the server averages the full state dict weighted by the number of training samples. After
the last round it evaluates the global model like fedsim's ClientApp does: for every client,
its own test split and the global test set of each domain it holds (batches of 512).

Data and model definitions come from fedsim (``ClientDataCache``, ``build_model``): the
point is to compare the *engine*, not the data pipeline. Flower is never imported here.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.config import Scenario
from fedsim.data.loading import ClientDataCache, num_clients
from fedsim.models import build_model


def client_seed(seed: int, server_round: int, client_id: int, salt: int = 0) -> int:
    """Same formula as ``fedsim.engine.client.client_seed`` (kept here so that this module
    does not import Flower)."""
    return int(np.random.SeedSequence([seed, server_round, client_id, salt]).generate_state(1)[0])


def check_supported(sc: Scenario) -> None:
    args = sc.strategy.args
    if sc.strategy.name != "fedavg" or float(args.get("fraction_train", 1.0)) != 1.0:
        raise ValueError("the bare loop reproduces FedAvg with fraction_train 1.0 only")
    if (
        sc.faults.failure_prob
        or sc.faults.nan_prob
        or sc.faults.straggler_prob
        or getattr(sc.faults, "bad_shape_prob", 0)
    ):
        raise ValueError("the bare loop has no fault injection")


def local_train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    sc: Scenario,
    seed: int,
    device: torch.device,
) -> tuple[int, int]:
    """One client's local training; returns (optimizer steps, samples seen).

    Written out again on purpose rather than calling fedsim's ClientRuntime._fit: this is
    the plain-PyTorch baseline fedsim is measured against, and the benchmark's step count
    check (tests/benchmarks/test_perf_benchmark.py) compares two independent implementations."""
    c = sc.client
    model.train()
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    bs = min(c.batch_size, n)
    per_epoch = n // bs if c.drop_last else math.ceil(n / bs)
    total = c.local_steps if c.local_steps is not None else c.local_epochs * per_epoch
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    perm, pos, steps, seen = torch.randperm(n, generator=gen), 0, 0, 0
    while steps < total:
        if pos >= (per_epoch * bs if c.drop_last else n):
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos : pos + bs]
        pos += bs
        if has_bn and len(idx) < 2:
            continue
        xb, yb = x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        seen += len(idx)
    return steps, seen


@torch.no_grad()
def score(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 512
) -> tuple[int, int]:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(x[i : i + batch].to(device))
        correct += int((logits.argmax(1) == y[i : i + batch].to(device)).sum())
    return correct, len(y)


def average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    out = {}
    for k, ref in states[0].items():
        acc = sum(w / total * s[k].double() for s, w in zip(states, weights))
        out[k] = acc.to(ref.dtype) if ref.is_floating_point() else torch.round(acc).to(ref.dtype)
    return out


def bare_run(sc: Scenario) -> dict[str, Any]:
    """Run the scenario as a bare loop; returns steps, samples, accuracy, seconds."""
    check_supported(sc)
    t0 = time.perf_counter()
    torch.set_num_threads(sc.runtime.num_threads)
    device = torch.device(
        "cuda" if sc.device == "cuda" or (sc.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    cache = ClientDataCache(sc.data, sc.seed)
    ds = cache.dataset
    n_clients = num_clients(sc.data)
    m = sc.model
    model = build_model(m.name, ds.num_classes, ds.channels, ds.image_size, m.normalization, m.args, seed=sc.seed).to(
        device
    )
    global_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    c = sc.client
    steps = samples = 0
    train_s = 0.0
    for rnd in range(1, sc.rounds + 1):
        states, weights = [], []
        for cid in range(n_clients):
            model.load_state_dict(global_sd)
            data = cache.client(cid)
            params = [p for p in model.parameters() if p.requires_grad]
            if c.optimizer == "adam":
                opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
            else:
                opt = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
            ts = time.perf_counter()
            s, seen = local_train(model, opt, data.x_train, data.y_train, sc, client_seed(sc.seed, rnd, cid), device)
            train_s += time.perf_counter() - ts
            steps += s
            samples += seen
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(float(len(data.y_train)))
        global_sd = average(states, weights)
    # final evaluation, as fedsim's ClientApp does it for every client
    model.load_state_dict(global_sd)
    per_domain: dict[str, list[float]] = {}
    for cid in range(n_clients):
        data = cache.client(cid)
        score(model, data.x_test, data.y_test, device)
        if sc.evaluation.per_domain:
            for d in cache.partition(cid).domains:
                xd, yd = cache.domain_test(d)
                correct, total = score(model, xd, yd, device)
                per_domain.setdefault(d, []).append(correct / max(total, 1))
    if device.type == "cuda":
        torch.cuda.synchronize()
    accuracy = float(np.mean([np.mean(v) for v in per_domain.values()])) if per_domain else None
    return {
        "steps": steps,
        "samples": samples,
        "accuracy": accuracy,
        "wall_s": time.perf_counter() - t0,
        "train_s": train_s,
    }
