"""End to end on the inline runtime (toy data, cnn-small width 8): the compressed
strategies ``compressed``, ``ef21`` and ``econtrol`` against FedAvg, their byte counts,
client state, partial participation, dropped replies and exact resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedsim.arrays import load_arrays
from fedsim.config import ScenarioError
from fedsim.data.loading import partitions
from fedsim.engine.checkpoint import load_latest
from fedsim.engine.runtimes import run_inline
from fedsim.results import RunFolder
from fedsim.scenario import build_scenario, new_run
from fedsim.strategies.compressed.base import split_keys
from fedsim.strategies.compressed.compressors import TopK, index_dtype


def scenario(strategy: str, args: dict | None = None, rounds: int = 2, **extra):
    raw = {
        "name": "c",
        "seed": 0,
        "rounds": rounds,
        "data": {"dataset": "toy", "image_size": 16, "clients_per_domain": 2},
        "model": {"name": "cnn-small", "normalization": "bn", "args": {"width": 8}},
        "client": {"lr": 0.05, "batch_size": 16},
        "runtime": {"name": "inline", "num_threads": 1},  # a shared 2-core machine: 1 thread is fastest
        "strategy": {"name": strategy, "args": dict(args or {})},
        **extra,
    }
    return build_scenario(raw, "test")


def run(
    out: Path, strategy: str, args: dict | None = None, rounds: int = 2, resume: bool = False, **extra
) -> list[dict]:
    sc = scenario(strategy, args, rounds, **extra)
    folder = RunFolder(out) if resume else RunFolder.create(out, sc)
    experiment = new_run(sc, folder, resume=resume)
    run_inline(experiment)
    return folder.read_metrics()


def final_arrays(out: Path) -> dict[str, np.ndarray]:
    return load_latest(out / "checkpoints").arrays


def no_timing(records):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


def client_states(out: Path, n: int) -> dict[int, dict[str, np.ndarray]]:
    """Each client's newest ``ef`` state file (absent clients are left out)."""
    out_states = {}
    for cid in range(n):
        files = sorted(
            (out / "clients" / str(cid)).glob("ef.r*.safetensors"),
            key=lambda p: int(p.name.split(".r")[1].split(".")[0]),
        )
        if files:
            out_states[cid] = load_arrays(files[-1])
    return out_states


def server_believed(
    states: dict[int, dict[str, np.ndarray]], accepted: np.ndarray, name: str, d: int
) -> dict[int, np.ndarray]:
    """The buffer of each client that the server's aggregate contains (acc vs new by ack)."""
    out = {}
    for cid in range(accepted.size):
        st = states.get(cid, {})
        tag = "new" if "round" in st and int(st["round"][0]) == int(accepted[cid]) else "acc"
        out[cid] = st.get(f"{tag}.{name}", np.zeros(d, np.float32))
    return out


# ---------------------------------------------------------------------------------------
def test_identity_compression_equals_fedavg(tmp_path):
    """Identity uplink/downlink, full participation, server_lr=1: EF21 (g_i = u_i after the
    uncompressed first round; g = (1/n) sum g_i; x+ = x - g) and the compressed baseline
    (x+ = x - sum_i p_i u_i) both equal FedAvg's weighted model mean, because all 8 toy
    clients hold the same number of samples (checked) so uniform = num-examples weights."""
    sc = scenario("fedavg")
    sizes = {p.num_train for p in partitions(sc.data, sc.seed)}
    assert len(sizes) == 1
    ref = run(tmp_path / "fedavg", "fedavg")
    ref_arrays = final_arrays(tmp_path / "fedavg")
    for name in ("ef21", "compressed"):
        recs = run(tmp_path / name, name, {"compressor": "identity"})
        arrays = final_arrays(tmp_path / name)
        assert set(arrays) == set(ref_arrays)
        for k, v in ref_arrays.items():
            np.testing.assert_allclose(
                arrays[k].astype(np.float64), v.astype(np.float64), rtol=1e-4, atol=2e-5, err_msg=f"{name}: {k}"
            )
        for a, b in zip(recs, ref):
            assert abs(a["accuracy"] - b["accuracy"]) < 0.02
        # the uplink payload is the dense model: same bytes as FedAvg
        assert recs[-1]["bytes_up"] == ref[-1]["bytes_up"]
        sm = recs[-1]["strategy_metrics"]
        assert sm["bytes_up_payload"] == recs[-1]["bytes_up"] == sm["bytes_up_dense"]


def test_topk_bytes_are_values_plus_indices(tmp_path):
    out = tmp_path / "topk"
    recs = run(out, "ef21", {"compressor": "topk:0.01"})
    arrays = final_arrays(out)
    comp, dense = split_keys(arrays)
    d = sum(arrays[k].size for k in comp)
    bn_bytes = sum(arrays[k].nbytes for k in dense)
    k = TopK(0.01).k(d)
    per_client = k * (4 + index_dtype(d).itemsize) + bn_bytes
    n = 8
    # round 1 is EF21's uncompressed start (g_i = u_i), round 2 is compressed
    assert recs[0]["bytes_up"] == n * (4 * d + bn_bytes)
    assert recs[1]["bytes_up"] == n * per_client
    sm = recs[1]["strategy_metrics"]
    assert sm["bytes_up_payload"] == recs[1]["bytes_up"]
    assert sm["bytes_up_dense"] == n * (4 * d + bn_bytes)  # what FedAvg sends
    # values + uint16 indices of 1% of the coordinates: 1.5% of the dense update
    payload_ratio = k * (4 + index_dtype(d).itemsize) / (4 * d)
    assert 0.014 < payload_ratio < 0.02
    assert sm["uplink_keep_fraction"] == pytest.approx(k / d)
    # downlink is the dense model (identity)
    assert recs[1]["bytes_down"] == recs[0]["bytes_down"]


def test_local_bn_sends_only_the_sparse_payload(tmp_path):
    out = tmp_path / "local"
    recs = run(out, "ef21", {"compressor": "topk:0.01", "bn": "local", "init": "zero"}, rounds=1)
    arrays = final_arrays(out)
    comp, _ = split_keys(arrays)
    d = sum(arrays[k].size for k in comp)
    k = TopK(0.01).k(d)
    assert recs[0]["bytes_up"] == 8 * k * (4 + index_dtype(d).itemsize)
    assert recs[0]["strategy_metrics"]["uplink_ratio"] < 0.02
    sampled = [c for c in range(8) if any((out / "clients" / str(c)).glob("ef.r1.*"))]
    assert len(sampled) == 8 and all(any((out / "clients" / str(c)).glob("local.r1.*")) for c in sampled)


def test_partial_participation_keeps_unsampled_buffers(tmp_path):
    """EF21-PP: clients not sampled keep g_i (their state files are not touched); the server's
    g is (1/n) sum over ALL n clients of g_i."""
    out = tmp_path / "pp"
    args = {"compressor": "topk:0.05", "fraction_train": 0.5, "init": "zero"}
    run(out, "ef21", args, rounds=1)
    n = 8
    before = {p: p.read_bytes() for p in (out / "clients").rglob("ef.r*.safetensors")}
    first = {int(p.parent.name) for p in before}
    assert len(first) == 4
    run(out, "ef21", args, rounds=2, resume=True)
    second = {int(p.parent.name) for p in (out / "clients").rglob("ef.r2.safetensors")}
    assert len(second) == 4
    for path, data in before.items():
        if int(path.parent.name) not in second:
            assert path.exists() and path.read_bytes() == data  # untouched
    # a client state file per sampled client, holding g and the accepted/new versions
    ckpt = load_latest(out / "checkpoints")
    g = ckpt.strategy_arrays["srv/g"]
    accepted = ckpt.strategy_arrays["accepted"]
    assert {c for c in range(n) if accepted[c] == 2} == second
    states = client_states(out, n)
    assert set(states) == first | second
    g_i = server_believed(states, accepted, "g", g.size)
    np.testing.assert_allclose(g, sum(g_i.values()) / n, rtol=1e-5, atol=1e-7)


def test_dropped_replies_do_not_desynchronise_buffers(tmp_path):
    """Clients whose reply the server drops (NaN) have already written their buffers; the
    ack in the next message makes them fall back to the version the server holds."""
    out = tmp_path / "faults"
    faults = {"nan_prob": 0.3, "min_success_fraction": 0.1, "max_round_retries": 0}
    recs = run(out, "econtrol", {"compressor": "topk:0.05", "eta": 0.1}, rounds=3, faults=faults)
    assert sum(len(r["failures"]) for r in recs) > 0
    ckpt = load_latest(out / "checkpoints")
    h = ckpt.strategy_arrays["srv/h"]
    accepted = ckpt.strategy_arrays["accepted"]
    h_i = server_believed(client_states(out, 8), accepted, "h", h.size)
    np.testing.assert_allclose(h, sum(h_i.values()) / 8, rtol=1e-5, atol=1e-7)


def test_econtrol_eta0_equals_ef21(tmp_path):
    args = {"compressor": "topk:0.02", "fraction_train": 0.5}
    a = run(tmp_path / "ef21", "ef21", args, rounds=3)
    b = run(tmp_path / "ec", "econtrol", {**args, "eta": 0.0}, rounds=3)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "strategy_metrics")} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)
    fa, fb = final_arrays(tmp_path / "ef21"), final_arrays(tmp_path / "ec")
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])
    sa, sb = load_latest(tmp_path / "ef21" / "checkpoints"), load_latest(tmp_path / "ec" / "checkpoints")
    np.testing.assert_array_equal(sa.strategy_arrays["srv/g"], sb.strategy_arrays["srv/h"])


def test_resume_matches_uninterrupted_run(tmp_path):
    """Rand-K uplink (seeded per round and client), Top-K downlink with catch-up increments,
    partial participation: a run stopped after round 1 and resumed equals one run."""
    args = {"compressor": "randk:0.1", "downlink": "topk:0.2", "fraction_train": 0.5, "momentum": 0.5, "seed": 0}
    full = run(tmp_path / "full", "ef21", args, rounds=3)
    run(tmp_path / "split", "ef21", args, rounds=1)
    split = run(tmp_path / "split", "ef21", args, rounds=3, resume=True)
    assert no_timing(full) == no_timing(split)
    a, b = load_latest(tmp_path / "full" / "checkpoints"), load_latest(tmp_path / "split" / "checkpoints")
    for k in a.arrays:
        np.testing.assert_array_equal(a.arrays[k], b.arrays[k])
    assert set(a.strategy_arrays) == set(b.strategy_arrays)
    for k in a.strategy_arrays:
        np.testing.assert_array_equal(a.strategy_arrays[k], b.strategy_arrays[k])
    # the compressed downlink really was compressed
    assert full[-1]["bytes_down"] < full[-1]["strategy_metrics"]["bytes_down_dense"]


def test_bad_arguments_are_scenario_errors():
    with pytest.raises(ScenarioError, match="strategy.args"):
        scenario("ef21", {"compressor": "topk:1.5"})
    with pytest.raises(ScenarioError, match="strategy.args"):
        scenario("econtrol", {"eta": -1})
    with pytest.raises(ScenarioError, match="strategy.args"):
        scenario("compressed", {"bn": "global"})
