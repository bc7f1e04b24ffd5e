"""Replay: the Flower strategy objects (configure_train / aggregate_train) and their client
hooks, driven by hand on a tiny model, against a direct re-computation with the pure
reference functions of fedsim.strategies.compressed.{plain,ef21,econtrol} (partial participation, a dropped reply,
compressed downlink with catch-up increments, resume through state_dict)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedsim.arrays import numpy_to_record, record_to_numpy
from fedsim.engine.client_state import ClientState
from fedsim.engine.hooks import HOOKS_KEY
from fedsim.registry import import_object
from fedsim.strategies.compressed.base import (
    client_rng,
    flatten,
    model_step,
    server_rng,
    split_keys,
    unflatten,
)
from fedsim.strategies.compressed.compressors import Identity, make_compressor
from fedsim.strategies.compressed.econtrol import (
    EControl,
    EControlClientState,
    EControlServerState,
    econtrol_client_step,
    econtrol_init_client,
    econtrol_server_step,
)
from fedsim.strategies.compressed.ef21 import (
    EF21,
    EF21ClientState,
    EF21ServerState,
    ef21_client_scale,
    ef21_client_step,
    ef21_init_client,
    ef21_server_step,
    ef21_sgdm_client_step,
    ef21_weights,
)
from fedsim.strategies.compressed.plain import (
    Compressed,
    compressed_client_step,
    compressed_server_mean,
)

N = 6
ROUNDS = 5
DROP = {(3, 2)}  # (round, client) whose reply the server never gets


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(20, 7)
        self.bn = nn.BatchNorm1d(7)


class FakeGrid:
    def get_node_ids(self):
        return list(range(N))


def update(rnd: int, cid: int, d: int) -> np.ndarray:
    """A heterogeneous gradient-like update u_i for (round, client)."""
    rng = np.random.default_rng([rnd, cid, 99])
    return (0.1 * rng.standard_normal(d) + 0.05 * (cid - N / 2)).astype(np.float32)


def drive(strategy, tmp_path, rounds=range(1, ROUNDS + 1), arrays=None):
    """Run rounds of the strategy with hand-made clients; return (public arrays, log)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    model = Tiny()
    if arrays is None:
        arrays = numpy_to_record({k: v.numpy().copy() for k, v in model.state_dict().items()})
    log = []
    for rnd in rounds:
        random.seed(f"replay/{rnd}")
        msgs = list(
            strategy.configure_train(
                rnd, arrays, ConfigRecord({HOOKS_KEY: strategy.client_hooks, **strategy.client_config}), FakeGrid()
            )
        )
        replies, sampled = [], []
        for m in msgs:
            cid = int(m.metadata.dst_node_id)
            m.metadata.__dict__["_message_id"] = f"{rnd}-{cid}"
            config = dict(m.content["config"])
            received = record_to_numpy(m.content["arrays"])
            hooks = import_object(config[HOOKS_KEY])(config)  # as the engine resolves it
            state = ClientState(tmp_path / "run", cid, rnd)
            net = Tiny()
            hooks.load(net, received, state)
            sd = net.state_dict()
            comp, _ = split_keys({k: v.numpy() for k, v in sd.items()})
            w, layout = flatten({k: sd[k].numpy() for k in comp})
            local = unflatten((w - update(rnd, cid, w.size)).astype(np.float32), layout)
            with torch.no_grad():
                for k, v in local.items():
                    sd[k].copy_(torch.from_numpy(v))
                sd["bn.running_mean"].fill_(float(cid))
            reply = hooks.reply(net, received, state)
            state.commit()
            sampled.append(cid)
            if (rnd, cid) in DROP:
                continue
            content = RecordDict(
                {"arrays": numpy_to_record(reply), "metrics": MetricRecord({"num-examples": 10 + cid})}
            )
            replies.append(Message(content, reply_to=m))
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        log.append((rnd, sorted(sampled), dict(metrics)))
    return arrays, log


def reference(method, up, down, log, kw, W0):
    """Direct re-computation with the methods' pure functions on flat vectors."""
    d = W0.size
    x, W = W0.copy(), W0.copy()
    clients: dict[int, object] = {}
    srv = np.zeros(d, np.float32)
    weights = ef21_weights(kw["smoothness"], N) if kw.get("smoothness") else None
    for rnd, sampled, _ in log:
        init = kw.get("init", "full") == "full" and rnd == 1 and method != "none"
        msgs, ex = {}, {}
        for cid in sampled:
            u = (W - (W - update(rnd, cid, d)).astype(np.float32)).astype(np.float32)
            rng = client_rng(0, rnd, cid)
            if method == "none":
                msg, new = compressed_client_step(u, up, rng), None
            elif method == "ef21":
                scale = 1.0 if weights is None else ef21_client_scale(weights, cid)
                mom = kw.get("momentum")
                if init:
                    msg, new = ef21_init_client(u, None, rng, scale=scale, momentum=bool(mom))
                else:
                    st = clients.get(cid) or EF21ClientState.zeros(d, momentum=bool(mom))
                    msg, new = (
                        ef21_sgdm_client_step(st, u, up, mom, rng, scale=scale)
                        if mom
                        else ef21_client_step(st, u, up, rng, scale=scale)
                    )
            else:
                if init:
                    msg, new = econtrol_init_client(u)
                else:
                    st = clients.get(cid) or EControlClientState.zeros(d)
                    msg, new = econtrol_client_step(st, u, up, kw["eta"], rng)
            if (rnd, cid) in DROP:
                continue  # the server never sees it: the client's effective state is unchanged
            clients[cid] = new
            msgs[cid], ex[cid] = msg.decoded, 10.0 + cid
        if method == "none":
            direction = compressed_server_mean(msgs, ex)
        elif method == "ef21":
            srv = ef21_server_step(EF21ServerState(srv), msgs, N, weights).g
            direction = srv
        else:
            srv = econtrol_server_step(EControlServerState(srv), msgs, N).h
            direction = srv
        x = model_step(x, direction, kw.get("server_lr", 1.0))
        if isinstance(down, Identity):
            W = x.copy()
        else:
            W = W + down.decode(down.encode(x - W, server_rng(0, rnd)), d)
    return W, srv


CASES = [
    ("ef21", EF21, {"compressor": "topk:0.1", "fraction_train": 0.5}),
    (
        "ef21",
        EF21,
        {
            "compressor": "randk:0.2",
            "fraction_train": 0.5,
            "momentum": 0.3,
            "smoothness": [1, 2, 3, 1, 2, 3],
            "server_lr": 0.7,
        },
    ),
    ("ef21", EF21, {"compressor": "sign", "downlink": "topk:0.3", "fraction_train": 0.5, "init": "zero"}),
    ("econtrol", EControl, {"compressor": "topk:0.1", "fraction_train": 0.5, "eta": 0.2}),
    ("econtrol", EControl, {"compressor": "topk:0.1", "downlink": "qsgd:8", "fraction_train": 0.67, "eta": 0.05}),
    ("none", Compressed, {"compressor": "qsgd:4", "fraction_train": 0.5}),
]


@pytest.mark.parametrize("method,cls,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_strategy_replays_reference(tmp_path, method, cls, kw):
    strategy = cls(**kw)
    W0, _ = flatten(
        {
            k: v.numpy()
            for k, v in sorted(Tiny().state_dict().items())
            if k in split_keys({a: b.numpy() for a, b in Tiny().state_dict().items()})[0]
        }
    )
    arrays, log = drive(strategy, tmp_path)
    assert all(
        len(s) == max(int(N * kw["fraction_train"]), 1)
        for r, s, _ in log
        if not (r == 1 and method != "none" and kw.get("init", "full") == "full")
    )
    assert any((3, 2) == (r, c) for r, s, _ in log for c in s), "the dropped client must have been sampled"
    named = record_to_numpy(arrays)
    comp, dense = split_keys(named)
    W, _ = flatten({k: named[k] for k in comp})
    W_ref, srv_ref = reference(
        method, make_compressor(kw["compressor"]), make_compressor(kw.get("downlink", "identity")), log, kw, W0
    )
    np.testing.assert_allclose(W, W_ref, rtol=1e-6, atol=1e-7)
    if method != "none":
        np.testing.assert_allclose(strategy._srv["g" if method == "ef21" else "h"], srv_ref, rtol=1e-6, atol=1e-7)
    # BN running statistics: the num-examples-weighted mean of the last round's replies
    last_rnd, last_sampled, _ = log[-1]
    got = [c for c in last_sampled if (last_rnd, c) not in DROP]
    w = np.array([10.0 + c for c in got])
    np.testing.assert_allclose(named["bn.running_mean"], np.full(7, (w * np.array(got)).sum() / w.sum()), rtol=1e-6)


def test_state_dict_round_trip_continues_identically(tmp_path):
    kw = {"compressor": "topk:0.1", "downlink": "topk:0.3", "fraction_train": 0.5, "momentum": 0.5}
    a = EF21(**kw)
    arrays_a, _ = drive(a, tmp_path / "a")
    b = EF21(**kw)
    arrays_b, _ = drive(b, tmp_path / "b", rounds=range(1, 3))
    arrs, scalars = b.state_dict()
    c = EF21(**kw)
    c.load_state_dict({k: v.copy() for k, v in arrs.items()}, dict(scalars))
    # shuffled key order, as a checkpoint reload gives
    shuffled = numpy_to_record(dict(sorted(record_to_numpy(arrays_b).items(), reverse=True)))
    arrays_c, _ = drive(c, tmp_path / "b", rounds=range(3, ROUNDS + 1), arrays=shuffled)
    na, nc = record_to_numpy(arrays_a), record_to_numpy(arrays_c)
    for k in na:
        np.testing.assert_array_equal(na[k], nc[k])


def test_downlink_sends_catch_up_increments_or_dense(tmp_path):
    strategy = EF21(compressor="topk:0.1", downlink="topk:0.05", fraction_train=0.5, downlink_history=1)
    _, log = drive(strategy, tmp_path)
    # with one increment of history, clients absent for a round get the dense model
    assert sum(m["num_resync"] for _, _, m in log[1:]) > 0
    assert all(m["bytes_down_payload"] <= m["bytes_down_dense"] for _, _, m in log)
