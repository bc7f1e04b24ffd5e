"""Population scale, functionally: with 1,000 clients and 10 sampled per round, only the
sampled clients get tensors built and state files written; 100,000 clients run end to end
(benchmarks.perf, population target)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_scenario

from fedsim.data.loading import ClientDataCache, num_clients, partitions
from fedsim.engine.client import HELLO, ClientRuntime
from fedsim.engine.runtimes import run_inline
from fedsim.results import RunFolder
from fedsim.scenario import load_scenario, new_run

# toy: 4 domains x 250 clients = 1,000 clients, 5 images each (4 train, 1 test)
POPULATION = {
    "rounds": 2,
    "data": {
        "dataset": "toy",
        "image_size": 16,
        "clients_per_domain": 250,
        "options": {"train_per_domain": 1250, "test_per_domain": 20},
    },
    "client": {"lr": 0.05, "batch_size": 4},
    "evaluation": {"every": 2, "per_client": True, "per_domain": True},
}


def run_population(
    tmp_path: Path, monkeypatch, strategy: dict, population: dict = POPULATION, expected: int = 1000
) -> tuple[Path, set[int], set[int], list[int]]:
    path = write_scenario(tmp_path / "pop.yaml", **population, strategy=strategy)
    sc = load_scenario(str(path), [])
    assert num_clients(sc.data) == expected
    trained: set[int] = set()
    evaluated: set[int] = set()
    built: list[int] = []
    orig_train, orig_eval, orig_client = ClientRuntime.train, ClientRuntime.evaluate, ClientDataCache.client

    def train(self, msg, context):
        trained.add(self.client_id(context))
        return orig_train(self, msg, context)

    def evaluate(self, msg, context):
        evaluated.add(self.client_id(context))
        return orig_eval(self, msg, context)

    def client(self, cid):
        if cid not in self._items:
            built.append(cid)
        return orig_client(self, cid)

    monkeypatch.setattr(ClientRuntime, "train", train)
    monkeypatch.setattr(ClientRuntime, "evaluate", evaluate)
    monkeypatch.setattr(ClientDataCache, "client", client)
    run = RunFolder.create(tmp_path / "run", sc, overwrite=True)
    run_inline(new_run(sc, run))
    assert [r["round"] for r in run.read_metrics()] == [2]
    return run.path, trained, evaluated, built


@pytest.mark.parametrize(
    "strategy, item",
    [
        ({"name": "fedbn", "args": {"fraction_train": 0.01, "fraction_evaluate": 0.01}}, "local"),
        ({"name": "ef21", "args": {"fraction_train": 0.01, "fraction_evaluate": 0.01, "init": "zero"}}, "ef"),
    ],
)
def test_only_sampled_clients_get_data_and_state(tmp_path, monkeypatch, strategy, item):
    run_dir, trained, evaluated, built = run_population(tmp_path, monkeypatch, strategy)
    # 10 clients per round (2 training rounds), 10 evaluated after the last
    assert 10 <= len(trained) <= 20 and len(evaluated) == 10
    # tensors are built only for clients that were sent a message, each once
    assert set(built) == trained | evaluated
    assert len(built) == len(set(built))
    # state files exist only for clients that trained, one folder each
    folders = {int(p.name) for p in (run_dir / "clients").iterdir()}
    assert folders == trained
    for cid in folders:
        files = [p.name for p in (run_dir / "clients" / str(cid)).iterdir()]
        assert files and all(f.startswith(f"{item}.r") and f.endswith(".safetensors") for f in files)


# 4 domains x 25,000 clients = 100,000 clients, 3 tiny images each (2 train, 1 test)
HUNDRED_THOUSAND = {
    "rounds": 2,
    "data": {
        "dataset": "toy",
        "image_size": 8,
        "clients_per_domain": 25_000,
        "options": {"train_per_domain": 75_000, "test_per_domain": 8},
    },
    "client": {"lr": 0.05, "batch_size": 2},
    "evaluation": {"every": 2, "per_client": True, "per_domain": True},
}


@pytest.mark.slow
def test_hundred_thousand_clients_smoke(tmp_path, monkeypatch):
    """100,000 clients, 10 sampled per round, inline: the run completes; only the sampled
    clients are built, trained or written; the partitions are flat arrays, not objects per
    client; discovery sends no query to 100,000 in-process nodes."""
    hellos: list[int] = []
    orig_hello = ClientRuntime.hello

    def hello(self, msg, context):
        hellos.append(self.client_id(context))
        return orig_hello(self, msg, context)

    monkeypatch.setattr(ClientRuntime, "hello", hello)
    strategy = {"name": "fedbn", "args": {"fraction_train": 0.0001, "fraction_evaluate": 0.0001}}
    run_dir, trained, evaluated, built = run_population(
        tmp_path, monkeypatch, strategy, HUNDRED_THOUSAND, expected=100_000
    )
    assert hellos == [] and HELLO == "query"
    assert 10 <= len(trained) <= 20 and len(evaluated) == 10
    assert set(built) == trained | evaluated and len(built) == len(set(built))
    assert {int(p.name) for p in (run_dir / "clients").iterdir()} == trained
    record = RunFolder(run_dir).read_metrics()[-1]
    assert sorted(int(c) for c in record["per_client"]) == sorted(evaluated)
    assert np.isfinite(record["loss"]) and record["strategy_metrics"]["num_sampled"] == 10
    sc = load_scenario(str(tmp_path / "pop.yaml"), [])
    parts = partitions(sc.data, sc.seed)
    held = sum(v.nbytes for v in vars(parts).values() if isinstance(v, np.ndarray))
    assert len(parts) == 100_000 and held < 20 * 2**20  # 300,000 indices + a few int64 per client
