"""Vectorized cohorts (``runtime.vectorize``): the same training as one client after another.

The step itself against ``torch.optim`` and :func:`fedsim.engine.agc.adaptive_clip_` on a
tiny model; whole runs of the toy scenario vectorized vs inline (parameters, metrics and
client state agree to float tolerance, and the cohorts really were vectorized); and the
fallbacks (ineligible clients give exactly the inline runtime's results, the reason logged
once)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_scenario
from torch import nn

from fedsim.arrays import load_arrays
from fedsim.config import ClientConfig
from fedsim.engine.agc import adaptive_clip_
from fedsim.engine.checkpoint import load_latest
from fedsim.engine.client import batch_indices
from fedsim.engine.hooks import ClientHooks
from fedsim.engine.runtimes import run_inline
from fedsim.engine.server import initial_arrays
from fedsim.engine.vectorized import model_blocker, stacked_agc_, step_blocker, train_cohort
from fedsim.results import RunFolder
from fedsim.scenario import load_scenario, new_run
from fedsim.schema import ScenarioError

ATOL = 1e-5


# -- the step --------------------------------------------------------------------------------
def tiny(norm: str) -> nn.Module:
    layer = {"gn": nn.GroupNorm(2, 4), "bn": nn.BatchNorm2d(4), "none": nn.Identity()}[norm]
    torch.manual_seed(0)
    # no conv bias before BatchNorm: its gradient is rounding noise, which Adam would scale up
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=norm != "bn"), layer, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def sequential(
    model: nn.Module, x, y, schedule, c: ClientConfig, agc: float, prox: float
) -> tuple[nn.Module, float, int]:
    """One client, the textbook way: torch.optim, AGC on the module's gradients, FedProx's
    proximal term added to the loss."""
    m = copy.deepcopy(model)
    m.train()
    params = list(m.parameters())
    anchor = [q.detach().clone() for q in params]
    opt = (
        torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        if c.optimizer == "adam"
        else torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    )
    loss_sum, correct = 0.0, 0
    for idx in schedule:
        logits = m(x[idx])
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        (loss + 0.5 * prox * sum(((q - a) ** 2).sum() for q, a in zip(params, anchor))).backward()
        if agc:
            adaptive_clip_(params, agc, 1e-3)
        opt.step()
        loss_sum += float(loss.detach()) * len(idx)
        correct += int((logits.argmax(1) == y[idx]).sum())
    return m, loss_sum, correct


@pytest.mark.parametrize(
    "norm,optimizer,agc,prox",
    [
        ("gn", "sgd", 0.0, 0.0),
        ("bn", "sgd", 0.0, 0.0),
        ("none", "sgd", 0.05, 0.0),
        ("gn", "adam", 0.0, 0.0),
        ("bn", "adam", 0.05, 0.0),
        ("none", "sgd", 0.0, 0.5),
    ],
)
def test_cohort_step_equals_per_client_torch_optim(norm, optimizer, agc, prox):
    c = ClientConfig(optimizer=optimizer, lr=0.05, momentum=0.9, weight_decay=1e-3, batch_size=5, local_epochs=2)
    model = tiny(norm)
    g = torch.Generator().manual_seed(1)
    # BatchNorm: equal data sizes; otherwise 6, 4 and 4 steps with last batches of 2, 4 and 2
    sizes = [12, 12, 12] if norm == "bn" else [12, 9, 7]
    k = len(sizes)
    xs = [torch.randn(n, 2, 6, 6, generator=g) for n in sizes]
    ys = [torch.randint(0, 3, (n,), generator=g) for n in sizes]
    schedules = [list(batch_indices(n, c, seed, skip_singletons=norm == "bn")) for seed, n in enumerate(sizes)]
    # different starting points per client, as after FedBN's local state or a compressed downlink
    states = []
    for i in range(k):
        s = {name: t.detach().clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
        s["4.weight"] = s["4.weight"] + 0.01 * i
        states.append(s)
    out, stats = train_cohort(model, states, xs, ys, schedules, c, (agc, 1e-3, ()), prox_mu=prox)
    for i in range(k):
        start = copy.deepcopy(model)
        start.load_state_dict(states[i])
        ref, loss_sum, correct = sequential(start, xs[i], ys[i], schedules[i], c, agc, prox)
        for name, t in (*ref.named_parameters(), *ref.named_buffers()):
            torch.testing.assert_close(
                out[i][name], t.detach(), atol=ATOL, rtol=1e-5, msg=lambda m, i=i, name=name: f"client {i} {name}: {m}"
            )
        assert stats[i][0] == pytest.approx(loss_sum, abs=1e-4)
        assert stats[i][1:] == (correct, sum(len(b) for b in schedules[i]), len(schedules[i]))
    assert not torch.equal(out[0]["4.weight"], out[1]["4.weight"])  # each client its own trajectory


def test_stacked_agc_clips_each_client_as_adaptive_clip_does():
    g = torch.Generator().manual_seed(0)
    shapes = [(), (4,), (4, 5), (4, 2, 3, 3)]  # a scalar gain, a bias, a linear, a conv weight (per client)
    params = [torch.randn(3, *s, generator=g) for s in shapes]
    grads = [torch.randn(3, *s, generator=g) * 3 for s in shapes]
    stacked = [gr.clone() for gr in grads]
    stacked_agc_(params, stacked, 0.1, 1e-3)
    for k in range(3):
        ps = [p[k].clone().requires_grad_(True) for p in params]
        for p, gr in zip(ps, grads):
            p.grad = gr[k].clone()
        assert adaptive_clip_(ps, 0.1, 1e-3) > 0
        for p, st in zip(ps, stacked):
            torch.testing.assert_close(st[k], p.grad, atol=1e-6, rtol=1e-6)


def test_cohort_refuses_unequal_batch_sizes_with_batchnorm():
    c = ClientConfig(batch_size=5)
    model = tiny("bn")
    state = {name: t.detach().clone() for name, t in (*model.named_parameters(), *model.named_buffers())}
    x, y = torch.randn(12, 2, 6, 6), torch.zeros(12, dtype=torch.long)
    schedules = [list(batch_indices(12, c, 0, True)), list(batch_indices(10, c, 0, True))]
    with pytest.raises(ValueError, match="same batch sizes"):
        train_cohort(model, [state, state], [x, x[:10]], [y, y[:10]], schedules, c)


def test_which_hooks_and_models_qualify():
    from fedsim.strategies.compressed.ef21 import EF21Client
    from fedsim.strategies.fedbn import FedBNClient
    from fedsim.strategies.fedtiny.client import SparseClient
    from fedsim.strategies.fedwon import FedWonClient

    for cls in (ClientHooks, FedBNClient, FedWonClient, EF21Client):
        assert step_blocker(cls({})) is None, cls
    assert "before_step" in step_blocker(SparseClient({})) and "after_step" in step_blocker(SparseClient({}))
    assert step_blocker(ClientHooks({"proximal-mu": 0.1})) is None  # FedProx: the cohort step has the term
    assert model_blocker(tiny("gn")) is None
    assert "Dropout" in model_blocker(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))


# -- whole runs ------------------------------------------------------------------------------
def run(tmp_path: Path, name: str, *overrides: str):
    """Run the toy scenario on the inline runtime; returns (records, final global arrays,
    client-state folder, the grid the clients ran on)."""
    sc = load_scenario(str(write_scenario(tmp_path / f"{name}.yaml")), ["rounds=2", *overrides])
    folder = RunFolder.create(tmp_path / name, sc)
    experiment = new_run(sc, folder)
    run_inline(experiment)
    return folder.read_metrics(), load_latest(folder.checkpoints).arrays, folder.path / "clients", experiment.grid.inner


NUMBERS_THAT_VARY = ("wall_s", "client_wall_s")


def assert_records_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key in NUMBERS_THAT_VARY:
                continue
            if key == "strategy_metrics":
                sa = {k: v for k, v in ra[key].items() if k not in NUMBERS_THAT_VARY}
                sb = {k: v for k, v in rb[key].items() if k not in NUMBERS_THAT_VARY}
                assert sa == pytest.approx(sb, abs=1e-5), key
            elif isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], abs=1e-5), key
            else:
                assert ra[key] == rb[key], key


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.normalization=gn", "client.momentum=0.9", "client.weight_decay=0.001"),
        ("model.normalization=none", "strategy.name=fedwon", "client.momentum=0.9"),  # AGC on every step
        ("model.normalization=bn", "strategy.name=fedbn", "client.momentum=0.9"),  # per-client BN, local state
        ("model.normalization=gn", "strategy.name=ef21", "client.momentum=0.9"),  # compressed uplink, client state
        (
            "model.normalization=gn",
            "strategy.name=flwr.serverapp.strategy:FedProx",
            "strategy.args={proximal_mu: 0.1, min_train_nodes: 1, min_evaluate_nodes: 1, min_available_nodes: 1}",
        ),
        # no normalization: with cnn-small's GroupNorm of one channel per group a conv bias
        # gets a zero gradient up to rounding, which Adam scales up to steps of size lr
        ("model.normalization=none", "client.optimizer=adam", "client.lr=0.01", "client.weight_decay=0.001"),
    ],
    ids=["fedavg-gn-sgd", "fedwon-none-agc", "fedbn-bn", "ef21-gn", "fedprox-gn", "fedavg-none-adam"],
)
def test_vectorized_run_agrees_with_inline(tmp_path, overrides):
    seq_records, seq_arrays, seq_clients, seq_grid = run(tmp_path, "seq", *overrides)
    vec_records, vec_arrays, vec_clients, vec_grid = run(tmp_path, "vec", *overrides, "runtime.vectorize=true")
    assert type(seq_grid).__name__ == "InlineGrid"
    assert vec_grid.cohorts == [8, 8] and vec_grid.fallbacks == []  # all 8 clients at once, both rounds
    assert seq_arrays.keys() == vec_arrays.keys()
    # Adam divides by sqrt(v): where a gradient is ~0 its rounding (batched kernels sum in
    # another order) moves a weight by a fraction of lr, so Adam gets a looser tolerance
    atol = 1e-4 if "client.optimizer=adam" in overrides else ATOL
    for key in seq_arrays:
        np.testing.assert_allclose(vec_arrays[key], seq_arrays[key], atol=atol, rtol=0, err_msg=key)
    sc = load_scenario(str(tmp_path / "seq.yaml"), list(overrides))
    assert not np.allclose(seq_arrays["classifier.4.weight"], initial_arrays(sc)["classifier.4.weight"])  # it trained
    assert_records_close(seq_records, vec_records)
    seq_state = sorted(p.relative_to(seq_clients) for p in seq_clients.rglob("*")) if seq_clients.exists() else []
    vec_state = sorted(p.relative_to(vec_clients) for p in vec_clients.rglob("*")) if vec_clients.exists() else []
    assert seq_state == vec_state
    for rel in seq_state:
        if rel.suffix == ".safetensors":
            a, b = load_arrays(seq_clients / rel), load_arrays(vec_clients / rel)
            for key in a:
                np.testing.assert_allclose(b[key], a[key], atol=ATOL, rtol=0, err_msg=f"{rel} {key}")


@pytest.mark.parametrize(
    "overrides,cohorts",
    [
        # 80 and 48 training samples per client, batch 16: 5 and 3 steps. BatchNorm: two
        # cohorts of 4 a round; GroupNorm: one of 8, the shorter schedules padded
        (("model.normalization=bn", "data.partition=size", "data.partition_sizes=[100, 60]"), [4, 4, 4, 4]),
        (("model.normalization=gn", "data.partition=size", "data.partition_sizes=[100, 60]"), [8, 8]),
        # label skew: 51 to 109 samples, 4 to 7 steps, every last batch of another size
        (("model.normalization=none", "data.partition=dirichlet", "client.optimizer=adam", "client.lr=0.01"), [8, 8]),
        (("model.normalization=gn", "data.partition=dirichlet", "client.weight_decay=0.001"), [8, 8]),
    ],
    ids=["bn-grouped", "gn-padded", "none-dirichlet-adam", "gn-dirichlet-sgd"],
)
def test_clients_with_different_data_sizes(tmp_path, overrides, cohorts):
    ov = (*overrides, "client.momentum=0.9")
    seq_records, seq_arrays, _, _ = run(tmp_path, "seq", *ov)
    vec_records, vec_arrays, _, grid = run(tmp_path, "vec", *ov, "runtime.vectorize=true")
    assert grid.cohorts == cohorts and grid.fallbacks == []
    atol = 1e-4 if "client.optimizer=adam" in overrides else ATOL  # see test_vectorized_run_agrees_with_inline
    for key in seq_arrays:
        np.testing.assert_allclose(vec_arrays[key], seq_arrays[key], atol=atol, rtol=0, err_msg=key)
    assert_records_close(seq_records, vec_records)


def test_injected_faults_reply_as_inline(tmp_path):
    # failures and NaN replies are drawn per client when it is loaded: the same clients fail
    ov = ("model.normalization=gn", "faults.failure_prob=0.2", "faults.nan_prob=0.2", "rounds=3")
    seq_records, seq_arrays, _, _ = run(tmp_path, "seq", *ov)
    vec_records, vec_arrays, _, grid = run(tmp_path, "vec", *ov, "runtime.vectorize=true")
    assert grid.cohorts and grid.fallbacks == []
    assert any(r["failures"] for r in seq_records)
    assert [r["failures"] for r in vec_records] == [r["failures"] for r in seq_records]
    for key in seq_arrays:
        np.testing.assert_allclose(vec_arrays[key], seq_arrays[key], atol=ATOL, rtol=0, err_msg=key)


def strip_timing(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "wall_s"}
        r["strategy_metrics"] = {k: v for k, v in r["strategy_metrics"].items() if k != "client_wall_s"}
        out.append(r)
    return out


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (
            (
                "strategy.name=fedtiny",
                "strategy.args={density: 0.3, num_candidates: 2, delta_t: 1, t_end: 3}",
            ),
            "SparseClient change the local step (before_step, after_step)",
        ),
        (("faults.client_timeout_s=60",), "faults.client_timeout_s"),
        (("model.normalization=bn", "data.partition=dirichlet"), "alone in its batch-size schedule"),
    ],
    ids=["fedtiny", "timeout", "batchnorm-unequal-data"],
)
def test_ineligible_cohorts_train_as_inline(tmp_path, caplog, overrides, reason):
    ov = ("model.normalization=gn", *overrides)
    seq_records, seq_arrays, _, _ = run(tmp_path, "seq", *ov)
    with caplog.at_level(logging.WARNING, logger="fedsim.engine.vectorized"):
        vec_records, vec_arrays, _, grid = run(tmp_path, "vec", *ov, "runtime.vectorize=true")
    assert grid.cohorts == []
    assert [r for r in grid.fallbacks if reason in r] == grid.fallbacks and len(grid.fallbacks) == 1
    logged = [r.getMessage() for r in caplog.records if reason in r.getMessage()]
    assert len(logged) == 1  # once per run, not once per client or round
    assert strip_timing(vec_records) == strip_timing(seq_records)  # the sequential path itself: same bits
    for key in seq_arrays:
        np.testing.assert_array_equal(vec_arrays[key], seq_arrays[key], err_msg=key)


def test_vectorize_is_an_inline_option(tmp_path):
    with pytest.raises(ScenarioError, match=r"runtime\.vectorize"):
        load_scenario(str(write_scenario(tmp_path / "s.yaml")), ["runtime={name: ray, vectorize: true}"])
