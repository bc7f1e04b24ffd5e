"""A minimal hand-written Flower app, the baseline of ``benchmarks.perf`` target 2.

ServerApp: Flower's own ``FedAvg`` driven by ``strategy.start(...)``. ClientApp: trains the
same model on the same partition as fedsim's ClientApp (same data, same seeds, same batches:
the local loop of :mod:`benchmarks._perf_bare`) and evaluates like it (own test split plus
the global test set of each domain held). No checkpoints, no client state, no screening.
Run with ``flwr.simulation.run_simulation`` on Ray, with the same backend config as fedsim's
``ray`` runtime.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from benchmarks._perf_bare import client_seed, local_train, score
from fedsim.config import Scenario
from fedsim.data.loading import ClientDataCache, num_clients
from fedsim.engine.ray_start import ray_init_args
from fedsim.models import build_model

_CACHE: dict[str, tuple[ClientDataCache, torch.nn.Module, torch.device]] = {}


def _setup(scenario_json: str) -> tuple[Scenario, ClientDataCache, torch.nn.Module, torch.device]:
    sc = Scenario.model_validate_json(scenario_json)
    if scenario_json not in _CACHE:
        torch.set_num_threads(sc.runtime.num_threads)
        device = torch.device("cuda" if sc.device == "cuda" else "cpu")
        cache = ClientDataCache(sc.data, sc.seed)
        ds = cache.dataset
        m = sc.model
        model = build_model(
            m.name, ds.num_classes, ds.channels, ds.image_size, m.normalization, m.args, seed=sc.seed
        ).to(device)
        _CACHE.clear()
        _CACHE[scenario_json] = (cache, model, device)
    cache, model, device = _CACHE[scenario_json]
    return sc, cache, model, device


def make_apps(sc: Scenario) -> tuple[ServerApp, ClientApp]:
    scenario_json = sc.model_dump_json()
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        sc, cache, model, device = _setup(scenario_json)
        cid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = cache.client(cid)
        c = sc.client
        opt = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
        )
        steps, _ = local_train(model, opt, data.x_train, data.y_train, sc, client_seed(sc.seed, rnd, cid), device)
        metrics = MetricRecord({"num-examples": int(len(data.y_train)), "train_steps": steps})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        sc, cache, model, device = _setup(scenario_json)
        cid = int(context.node_config["partition-id"])
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = cache.client(cid)
        correct, n = score(model, data.x_test, data.y_test, device)
        metrics: dict[str, Any] = {"num-examples": n, "accuracy": correct / max(n, 1)}
        held = set(cache.partition(cid).domains)
        for d in cache.dataset.domains:
            dc = dn = 0
            if d in held:
                dc, dn = score(model, *cache.domain_test(d), device)
            metrics[f"domain_correct.{d}"] = dc
            metrics[f"domain_total.{d}"] = dn
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _, cache, model, _ = _setup(scenario_json)
        n = num_clients(sc.data)
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=sc.rounds,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
        )

    return server_app, client_app


def run_flower(sc: Scenario) -> None:
    """The same backend config as ``fedsim.engine.runtimes.run_ray``."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    rt = sc.runtime
    init_args = ray_init_args(rt.address, rt.cpus_per_client)
    server_app, client_app = make_apps(sc)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients(sc.data),
        backend_config={
            "client_resources": {"num_cpus": rt.cpus_per_client, "num_gpus": rt.gpus_per_client},
            "init_args": init_args,
        },
    )
