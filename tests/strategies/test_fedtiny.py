"""FedTiny and the magnitude-pruning baseline: ERK densities, the sparse wire format, masks
on the client and in aggregation, adaptive BN selection, prune-and-grow, resume, and
end-to-end runs on the toy dataset."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import write_scenario
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedsim.arrays import load_arrays, numpy_to_record, record_nbytes, record_to_numpy
from fedsim.cli import main
from fedsim.engine.checkpoint import load_latest
from fedsim.engine.hooks import TASK_KEY
from fedsim.models import build_model
from fedsim.scenario import new_run
from fedsim.strategies.fedtiny import GIDX, GROW_KEY, GVAL, FedTiny, SparseClient
from fedsim.strategies.fedtiny.sparsity import (
    IDX,
    VAL,
    active_counts,
    apply_masks,
    cosine_fraction,
    decode,
    encode,
    erk_densities,
    forward_flops,
    jitter_densities,
    magnitude_masks,
    prunable_shapes,
)
from fedsim.strategies.magprune import MagPrune


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a run need Flower's task identity (run_inline sets it)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1


def toy_arrays(norm: str = "bn") -> dict[str, np.ndarray]:
    model = build_model("cnn-small", 4, 3, 16, norm, {"width": 8}, seed=0)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def run(scenario: Path, out: Path, *overrides: str) -> list[dict]:
    assert main(["run", str(scenario), *overrides, "--out", str(out)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# -- densities and masks -------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.5, 0.1, 0.01])
def test_erk_densities_sum_to_the_target(density):
    shapes = prunable_shapes(toy_arrays())
    dens = erk_densities(shapes, density)
    n = {k: math.prod(s) for k, s in shapes.items()}
    overall = sum(dens[k] * n[k] for k in shapes) / sum(n.values())
    assert overall == pytest.approx(density, rel=1e-9)
    assert all(0 < d <= 1 for d in dens.values())
    # ERK: below the cap, density is proportional to sum(shape) / prod(shape)
    free = [k for k in shapes if dens[k] < 1]
    ratios = [dens[k] / (sum(shapes[k]) / n[k]) for k in free]
    assert max(ratios) == pytest.approx(min(ratios))
    counts = active_counts(shapes, dens)
    assert sum(counts.values()) == round(density * sum(n.values()))


def test_erk_caps_small_layers_at_dense():
    shapes = {"a": (4, 3, 3, 3), "b": (512, 256, 3, 3), "c": (10, 64)}
    dens = erk_densities(shapes, 0.3)
    assert dens["a"] == 1.0
    n = {k: math.prod(s) for k, s in shapes.items()}
    assert sum(dens[k] * n[k] for k in shapes) / sum(n.values()) == pytest.approx(0.3)


def test_jittered_candidates_keep_the_overall_density():
    shapes = prunable_shapes(toy_arrays())
    base = erk_densities(shapes, 0.1)
    n = {k: math.prod(s) for k, s in shapes.items()}
    d = jitter_densities(shapes, base, 0.1, 0.3, np.random.default_rng(1))
    assert d != base
    assert sum(d[k] * n[k] for k in shapes) / sum(n.values()) == pytest.approx(0.1, rel=1e-6)


def test_magnitude_masks_keep_the_largest_weights_and_the_wire_format_roundtrips():
    arrays = toy_arrays()
    shapes = prunable_shapes(arrays)
    masks = magnitude_masks(arrays, erk_densities(shapes, 0.1))
    for k, m in masks.items():
        kept, dropped = np.abs(arrays[k][m]), np.abs(arrays[k][~m])
        assert dropped.size == 0 or kept.min() >= dropped.max()
    sparse = apply_masks(arrays, masks)
    payload = encode(sparse, masks)
    assert "features.0.weight" not in payload and "features.0.weight" + VAL in payload
    assert payload["features.0.weight" + IDX].dtype == np.uint8  # 216 entries
    assert payload["features.4.weight" + IDX].dtype == np.uint16  # 1152 entries
    assert "features.1.running_mean" in payload  # dense tensors travel as they are
    dense, got = decode(payload, {k: v.shape for k, v in arrays.items()})
    for k in arrays:
        np.testing.assert_array_equal(dense[k], sparse[k])
    for k in masks:
        np.testing.assert_array_equal(got[k], masks[k])
    # bytes: values (4) + indices (1/2/4) of active weights + every dense tensor
    expected = sum(int(m.sum()) * (4 + (1 if m.size <= 256 else 2 if m.size <= 65536 else 4)) for m in masks.values())
    expected += sum(v.nbytes for k, v in arrays.items() if k not in masks)
    assert record_nbytes(numpy_to_record(payload)) == expected
    # values only (uplink_indices: false) decode with the server's masks
    vals = encode(sparse, masks, indices=False)
    dense2, _ = decode(vals, {k: v.shape for k, v in arrays.items()}, masks=masks)
    np.testing.assert_array_equal(dense2["features.4.weight"], sparse["features.4.weight"])


def test_cosine_schedule_and_flops():
    assert cosine_fraction(0, 100, 0.2) == pytest.approx(0.2)
    assert cosine_fraction(50, 100, 0.2) == pytest.approx(0.1)
    assert cosine_fraction(100, 100, 0.2) == 0.0
    shapes = {"conv.weight": (8, 3, 3, 3), "fc.weight": (10, 32)}
    pos = {"conv.weight": 16 * 16, "fc.weight": 1}
    assert forward_flops(shapes, pos) == 2 * (8 * 27 * 256 + 320)
    assert forward_flops(shapes, pos, {"conv.weight": 20, "fc.weight": 32}) == 2 * (20 * 256 + 32)


# -- client side -----------------------------------------------------------------------------


def test_client_enforces_masks_and_keeps_topk_inactive_gradients():
    model = build_model("cnn-small", 4, 3, 16, "bn", {"width": 8}, seed=0)
    arrays = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    masks = magnitude_masks(arrays, erk_densities(prunable_shapes(arrays), 0.2))
    payload = encode(apply_masks(arrays, masks), masks)
    key = "features.4.weight"
    hooks = SparseClient({GROW_KEY: json.dumps({key: 7})})
    hooks.load(model, payload, state=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    grads = []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(dict(model.named_parameters())[key].grad.detach().clone())
        hooks.before_step(model)
        opt.step()
        hooks.after_step(model)
    sd = model.state_dict()
    for k, m in masks.items():
        assert not sd[k].numpy()[~m].any()  # pruned weights stay exactly zero
    reply = hooks.reply(model, payload, state=None)
    assert set(reply) == set(payload) | {key + GVAL, key + GIDX}
    for k, m in masks.items():
        np.testing.assert_array_equal(reply[k + IDX], payload[k + IDX])
        np.testing.assert_array_equal(reply[k + VAL], sd[k].numpy()[m])
    # kept gradients: 7 inactive entries; a buffer of k entries carried between steps
    # (the step's inactive gradient plus the buffer, top-k by magnitude): O(k) memory
    idx, val = reply[key + GIDX].astype(np.int64), reply[key + GVAL]
    assert len(idx) == 7 and not masks[key].ravel()[idx].any()
    inactive = ~masks[key].ravel()
    buf_i, buf_v = np.zeros(0, np.int64), np.zeros(0)
    for g in grads:
        acc = np.where(inactive, g.numpy().ravel().astype(np.float64), 0.0)
        acc[buf_i] += buf_v
        score = np.where(inactive, np.abs(acc), -1.0)
        buf_i = np.sort(np.argsort(-score, kind="stable")[:7])
        buf_v = acc[buf_i]
    np.testing.assert_array_equal(idx, buf_i)
    np.testing.assert_allclose(val, buf_v, rtol=1e-5, atol=1e-7)


# -- adaptive BN selection -------------------------------------------------------------------


class ScriptedGrid:
    """Answers FedTiny's task messages: BN statistics, then scripted candidate losses."""

    def __init__(self, losses: list[float], nodes=(0, 1, 2)) -> None:
        self.losses = losses
        self.nodes = list(nodes)
        self.tasks: list[str] = []

    def get_node_ids(self):
        return self.nodes

    def send_and_receive(self, messages, timeout=None):
        out = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.tasks)}-{i}"
            task = msg.content["config"][TASK_KEY]
            self.tasks.append(task)
            payload = record_to_numpy(msg.content["arrays"])
            n = 10 * (i + 1)
            if task == "fedtiny.profile":
                content = RecordDict(
                    {
                        "arrays": numpy_to_record({}),
                        "metrics": MetricRecord({"num-examples": 1, "pos.features.0.weight": 256}),
                    }
                )
            elif task == "fedtiny.bnstats":
                stats = {
                    k.replace("features.0.weight" + VAL, "features.1.running_mean"): np.full(8, float(i), np.float32)
                    for k in payload
                    if k.endswith("features.0.weight" + VAL)
                }
                content = RecordDict({"arrays": numpy_to_record(stats), "metrics": MetricRecord({"num-examples": n})})
            else:
                # averaged statistics arrive with the candidates: (0*10 + 1*20 + 2*30) / 60
                for k, v in payload.items():
                    if k.startswith("c") and k.endswith("features.1.running_mean"):  # c<j>/...
                        np.testing.assert_allclose(v, np.full(8, 80 / 60), rtol=1e-6)
                m = {f"loss.{j}": self.losses[j] + 0.01 * i for j in range(len(self.losses))}
                content = RecordDict({"arrays": numpy_to_record({}), "metrics": MetricRecord({"num-examples": n, **m})})
            out.append(Message(content, reply_to=msg))
        return out


def test_selection_picks_the_lowest_loss_candidate():
    arrays = toy_arrays()
    strategy = FedTiny(density=0.1, num_candidates=4, seed=3)
    grid = ScriptedGrid([0.9, 0.7, 0.3, 0.8])
    shapes = prunable_shapes(arrays)
    cands = [magnitude_masks(arrays, d) for d in strategy.candidate_densities(shapes)]
    assert len({tuple(int(m.sum()) for m in c.values()) for c in cands}) == 4  # 4 different candidates
    best, bn = strategy.select_candidate(grid, [0, 1, 2], arrays, cands, ConfigRecord({}), 1)
    assert best == 2 and strategy.candidate_losses == pytest.approx(
        [0.9 + 0.8 / 60, 0.7 + 0.8 / 60, 0.3 + 0.8 / 60, 0.8 + 0.8 / 60]
    )
    np.testing.assert_allclose(bn["features.1.running_mean"], np.full(8, 80 / 60), rtol=1e-6)
    assert grid.tasks == ["fedtiny.bnstats"] * 3 + ["fedtiny.loss"] * 3
    # through configure_train of round 1: the winner's masks become the model's masks
    s2 = FedTiny(density=0.1, num_candidates=4, seed=3)
    grid2 = ScriptedGrid([0.5, 0.6, 0.2, 0.1])
    msgs = s2.configure_train(1, numpy_to_record(arrays), ConfigRecord({}), grid2)
    assert s2.selected == 3
    for k in cands[3]:
        np.testing.assert_array_equal(s2.masks[k], cands[3][k])
    sent = record_to_numpy(list(msgs)[0].content["arrays"])
    np.testing.assert_allclose(sent["features.1.running_mean"], np.full(8, 80 / 60), rtol=1e-6)


# -- server side: aggregation and prune-and-grow ---------------------------------------------


def test_aggregation_keeps_pruned_weights_zero_and_prune_grow_keeps_density():
    arrays = toy_arrays()
    s = FedTiny(density=0.2, bn_selection=False, delta_t=2, t_end=10, alpha=0.4)
    grid = ScriptedGrid([0.0])
    msgs = list(s.configure_train(1, numpy_to_record(arrays), ConfigRecord({}), grid))
    masks0 = {k: m.copy() for k, m in s.masks.items()}
    payload = record_to_numpy(msgs[0].content["arrays"])
    rng = np.random.default_rng(0)

    def replies(grow: dict[str, int]):
        out = []
        for i, n in enumerate((5, 15)):
            p = dict(payload)
            for k in list(p):
                if k.endswith(VAL):
                    p[k] = (p[k] + rng.normal(0, 0.1, p[k].shape)).astype(np.float32)
                    key = k[: -len(VAL)]
                    if key in grow:  # gradient entries of inactive weights
                        inactive = np.flatnonzero(~s.masks[key].ravel())
                        p[key + GIDX] = inactive[: grow[key]].astype(np.uint32)
                        p[key + GVAL] = rng.normal(0, 1, grow[key]).astype(np.float32)
                # (dense keys unchanged)
            msg = Message(
                RecordDict(
                    {"arrays": numpy_to_record(p), "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})}
                ),
                dst_node_id=i,
                message_type="train",
            )
            msg.metadata.__dict__["_message_id"] = f"x{i}"
            out.append(Message(msg.content, reply_to=msg))
        return out

    new, metrics = s.aggregate_train(1, replies({}))
    new = record_to_numpy(new)
    for k, m in s.masks.items():
        assert not new[k][~m].any()
        np.testing.assert_array_equal(m, masks0[k])  # no grow step in round 1
    assert metrics["density"] == pytest.approx(0.2, abs=1e-3) and metrics["mask_changed"] == 0
    assert metrics["flops_sparse"] < metrics["flops_dense"] and metrics["mem_sparse_bytes"] < metrics["mem_dense_bytes"]
    # round 2 is a prune-and-grow step
    list(s.configure_train(2, numpy_to_record(new), ConfigRecord({}), grid))
    grow = s._grow
    assert grow and all(
        k == math.floor(cosine_fraction(2, 10, 0.4) * int(masks0[key].sum())) for key, k in grow.items()
    )
    counts = {k: int(m.sum()) for k, m in s.masks.items()}
    new2, metrics2 = s.aggregate_train(2, replies(grow))
    new2 = record_to_numpy(new2)
    assert {k: int(m.sum()) for k, m in s.masks.items()} == counts  # density constant
    assert metrics2["mask_changed"] == sum(grow.values())
    for k, m in s.masks.items():
        assert not new2[k][~m].any()
        if k in grow:
            assert (m != masks0[k]).sum() == 2 * grow[k]
            grown = m & ~masks0[k]
            assert not new2[k][grown].any()  # grown weights start at zero


def test_prune_and_grow_drops_smallest_and_grows_largest_gradient():
    s = FedTiny(density=0.5, bn_selection=False)
    s.masks = {"w": np.array([[True, True, True, False], [False, True, False, False]])}
    w = np.array([[0.5, -0.1, 2.0, 0.0], [0.0, 0.3, 0.0, 0.0]], np.float32)
    s.grad_acc = {"w": np.array([[9.0, 9.0, 9.0, 0.2], [-3.0, 9.0, 0.0, 1.0]], np.float32)}
    out, changed = s.prune_and_grow({"w": w, "b": np.ones(2, np.float32)}, {"w": 2})
    assert changed == 2
    # dropped: -0.1 and 0.3 (smallest |w| among active); grown: |g| 3.0 and 1.0 (inactive only)
    np.testing.assert_array_equal(s.masks["w"], [[True, False, True, False], [True, False, False, True]])
    np.testing.assert_array_equal(out["w"], [[0.5, 0, 2.0, 0], [0, 0, 0, 0]])
    assert s.masks["w"].sum() == 4


# -- end to end on toy ----------------------------------------------------------------------


def masks_from_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    return {
        k[5:]: v.astype(bool) for k, v in load_arrays(folder / "strategy.safetensors").items() if k.startswith("mask/")
    }


def test_fedtiny_end_to_end_masks_selection_bytes(tmp_path):
    sc = write_scenario(
        tmp_path / "tiny.yaml",
        rounds=4,
        strategy={"name": "fedtiny", "args": {"density": 0.2, "num_candidates": 3, "delta_t": 2, "t_end": 4}},
    )
    out = tmp_path / "tiny"
    # record each round's masks from the checkpoints (fedsim keeps the last two)
    seen: dict[int, dict[str, np.ndarray]] = {}
    from fedsim.engine.runtimes import run_inline
    from fedsim.results import RunFolder
    from fedsim.scenario import load_scenario

    scenario = load_scenario(sc)
    runf = RunFolder.create(out, scenario)

    def on_round(rec):
        ck = load_latest(runf.checkpoints)
        if ck is not None:
            seen[ck.round] = {k[5:]: v.astype(bool) for k, v in ck.strategy_arrays.items() if k.startswith("mask/")}

    run_inline(new_run(scenario, runf, on_round=on_round))
    final = load_latest(runf.checkpoints)
    seen[final.round] = masks_from_checkpoint(runf.checkpoints / "round_00004")
    records = runf.read_metrics()
    sm = [r["strategy_metrics"] for r in records]
    # selection: the lowest aggregated candidate loss wins
    losses = [sm[0][f"candidate_loss.{j}"] for j in range(3)]
    assert sm[0]["selected_candidate"] == int(np.argmin(losses))
    # masks: fixed in round 3 (no step), changed by the step after round 2, constant density
    assert sm[1]["mask_changed"] > 0 and sm[2]["mask_changed"] == 0 and sm[3]["mask_changed"] == 0
    assert all(np.array_equal(seen[3][k], seen[2][k]) for k in seen[3])
    assert any(not np.array_equal(seen[2][k], seen[1][k]) for k in seen[2])
    assert all(int(seen[1][k].sum()) == int(seen[4][k].sum()) for k in seen[1])
    for k, m in final_masks(final).items():
        assert not final.arrays[k].reshape(m.shape)[~m].any()
    assert all(s["density"] == pytest.approx(0.2, abs=1e-3) for s in sm)
    # bytes: a round without selection or gradients carries exactly the sparse payload
    arrays = {k: v.reshape(v.shape) for k, v in final.arrays.items()}
    per_client = record_nbytes(numpy_to_record(encode(arrays, seen[2])))
    assert records[2]["bytes_down"] == records[2]["bytes_up"] == 8 * per_client
    assert records[2]["bytes_up"] < 0.5 * sm[2]["bytes_up_dense_equiv"]
    assert records[1]["bytes_up"] > records[2]["bytes_up"]  # round 2 also carried gradients
    assert records[0]["bytes_down"] > records[2]["bytes_down"] + sm[0]["selection_bytes_down"] - 1
    assert records[-1]["accuracy"] > 0.4


def final_masks(ck) -> dict[str, np.ndarray]:
    return {k[5:]: v.astype(bool) for k, v in ck.strategy_arrays.items() if k.startswith("mask/")}


def test_fedtiny_resume_restores_masks_and_selection(tmp_path):
    sc = write_scenario(
        tmp_path / "tiny.yaml",
        rounds=4,
        strategy={"name": "fedtiny", "args": {"density": 0.2, "num_candidates": 2, "delta_t": 2, "t_end": 6}},
    )
    full = run(sc, tmp_path / "full")
    part = tmp_path / "part"
    run(sc, part)
    shutil.rmtree(part / "checkpoints" / "round_00004")  # a kill after round 3
    lines = (part / "metrics.jsonl").read_text().splitlines()[:3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["run", "--resume", str(part)]) == 0
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]

    def strip(records):
        return [
            {k: v for k, v in r.items() if k != "wall_s"}
            | {"strategy_metrics": {k: v for k, v in r["strategy_metrics"].items() if k != "client_wall_s"}}
            for r in records
        ]

    assert strip(resumed) == strip(full)
    assert resumed[3]["strategy_metrics"]["mask_changed"] > 0  # round 4 grew with restored masks
    a, b = load_latest(tmp_path / "full" / "checkpoints"), load_latest(part / "checkpoints")
    assert a.meta["strategy"] == b.meta["strategy"]
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    for k in a.strategy_arrays:
        np.testing.assert_array_equal(a.strategy_arrays[k], b.strategy_arrays[k])


def test_magprune_baseline_fixed_mask_same_density(tmp_path):
    sc = write_scenario(tmp_path / "mag.yaml", rounds=2, strategy={"name": "magprune", "args": {"density": 0.2}})
    records = run(sc, tmp_path / "mag")
    sm = [r["strategy_metrics"] for r in records]
    assert all(s["mask_changed"] == 0 for s in sm) and "selected_candidate" not in sm[0]
    assert all(s["density"] == pytest.approx(0.2, abs=1e-3) for s in sm)
    assert records[0]["bytes_up"] == records[1]["bytes_up"] < sm[0]["bytes_up_dense_equiv"]
    # the initial model pruned by magnitude with the same ERK densities as FedTiny's start
    arrays = toy_arrays()
    expect = magnitude_masks(arrays, erk_densities(prunable_shapes(arrays), 0.2))
    got = final_masks(load_latest(tmp_path / "mag" / "checkpoints"))
    assert all(np.array_equal(expect[k], got[k]) for k in expect)
    with pytest.raises(TypeError):
        MagPrune(density=0.1, progressive=True)
