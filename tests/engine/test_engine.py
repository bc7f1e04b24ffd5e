"""End to end on the inline runtime: FedAvg, FedBN, Flower's own strategies, resume,
determinism, failing clients. Each run trains the toy scenario for a few rounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_scenario

from fedsim.arrays import load_arrays
from fedsim.cli import main
from fedsim.engine.checkpoint import load_latest, save_checkpoint
from fedsim.models import build_model, norm_state_keys


def run(scenario: Path, out: Path, *overrides: str) -> list[dict]:
    assert main(["run", str(scenario), *overrides, "--out", str(out)]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def strip_timing(records):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "strategy_metrics")} for r in records]


def test_fedavg_learns_and_writes_the_run_folder(toy_yaml, tmp_path):
    out = tmp_path / "run"
    records = run(toy_yaml, out, "rounds=4")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    assert last["accuracy"] > 0.6 > records[0]["accuracy"]
    assert set(last["per_domain"]) == {"red", "green", "blue", "gray"}
    assert set(last["per_client"]) == {str(i) for i in range(8)}
    # every client sends the full model up and gets it down: 8 x model bytes per round
    model = build_model("cnn-small", 4, 3, 16, "bn", {"width": 8})
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert last["bytes_up"] == last["bytes_down"] == 8 * model_bytes
    for name in ("scenario.yaml", "summary.json", "accuracy.png"):
        assert (out / name).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_accuracy"] == last["accuracy"] and summary["bytes_up_total"] == 4 * 8 * model_bytes
    assert load_latest(out / "checkpoints").round == 4


def test_same_seed_same_metrics(toy_yaml, tmp_path):
    a = run(toy_yaml, tmp_path / "a")
    b = run(toy_yaml, tmp_path / "b")
    c = run(toy_yaml, tmp_path / "c", "seed=1")
    assert strip_timing(a) == strip_timing(b)
    assert strip_timing(a) != strip_timing(c)


def test_fedbn_keeps_normalization_local(toy_yaml, tmp_path):
    out = tmp_path / "fedbn"
    records = run(toy_yaml, out, "strategy.name=fedbn")
    model = build_model("cnn-small", 4, 3, 16, "bn", {"width": 8}, seed=0)
    bn_keys = norm_state_keys(model)
    initial = {k: v.numpy() for k, v in model.state_dict().items()}
    glob = load_latest(out / "checkpoints").arrays
    # the server never receives BN: its copy stays at the initial values ...
    for k in bn_keys:
        np.testing.assert_array_equal(glob[k].reshape(initial[k].shape), initial[k])
    # ... while non-BN weights moved, and each client holds its own BN statistics
    assert not np.allclose(glob["features.0.weight"], initial["features.0.weight"])
    local = {cid: load_arrays(next((out / "clients" / str(cid)).glob("local.r3.*"))) for cid in (0, 2)}
    assert set(local[0]) == bn_keys
    key = "features.1.running_mean"
    assert not np.allclose(local[0][key], local[2][key])  # red vs green domain statistics
    # uplink carries no BN tensor: fewer bytes up than down
    assert records[-1]["bytes_up"] < records[-1]["bytes_down"]


def test_fedbn_beats_fedavg_per_domain_on_toy(toy_yaml, tmp_path):
    avg = run(toy_yaml, tmp_path / "avg", "rounds=2")
    bn = run(toy_yaml, tmp_path / "bn", "rounds=2", "strategy.name=fedbn")
    assert bn[-1]["accuracy"] != avg[-1]["accuracy"]  # different algorithms, different numbers


@pytest.mark.parametrize(
    "strategy,args",
    [
        (
            "flwr.serverapp.strategy:FedProx",
            "{proximal_mu: 0.1, min_train_nodes: 1, min_evaluate_nodes: 1, min_available_nodes: 1}",
        ),
        (
            "flwr.serverapp.strategy:FedAdam",
            "{eta: 0.01, min_train_nodes: 1, min_evaluate_nodes: 1, min_available_nodes: 1}",
        ),
    ],
)
def test_flower_strategies_plug_in_unchanged(toy_yaml, tmp_path, strategy, args):
    # GroupNorm: server-side Adam on BatchNorm running statistics is unstable by design
    records = run(
        toy_yaml,
        tmp_path / "flwr",
        f"strategy.name={strategy}",
        f"strategy.args={args}",
        "rounds=2",
        "model.normalization=gn",
    )
    assert records[-1]["accuracy"] > 0.5


def test_fedadam_resume_restores_server_moments(toy_yaml, tmp_path):
    args = [
        "strategy.name=flwr.serverapp.strategy:FedAdam",
        "strategy.args={eta: 0.01, min_available_nodes: 1}",
        "model.normalization=gn",
    ]
    full = run(toy_yaml, tmp_path / "full", *args, "rounds=3")
    part = tmp_path / "part"
    run(toy_yaml, part, *args, "rounds=3")
    # simulate a kill after round 2: drop round 3's checkpoint and metrics line
    import shutil

    shutil.rmtree(part / "checkpoints" / "round_00003")
    lines = (part / "metrics.jsonl").read_text().splitlines()[:2]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["run", "--resume", str(part)]) == 0
    resumed = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert strip_timing(resumed) == strip_timing(full)


def test_partial_participation_is_seeded(toy_yaml, tmp_path):
    recs = run(toy_yaml, tmp_path / "pp", "strategy.args={fraction_train: 0.25}")
    again = run(toy_yaml, tmp_path / "pp2", "strategy.args={fraction_train: 0.25}")
    assert [r["strategy_metrics"]["num_sampled"] for r in recs] == [2, 2, 2]
    assert strip_timing(recs) == strip_timing(again)


def test_failing_and_nan_clients_are_excluded(toy_yaml, tmp_path):
    records = run(
        toy_yaml,
        tmp_path / "faults",
        "faults.failure_prob=0.2",
        "faults.nan_prob=0.2",
        "faults.min_success_fraction=0.25",
    )
    failures = [f for r in records for f in r["failures"]]
    reasons = {f["reason"].split(":")[0] for f in failures}
    assert {"error", "non-finite values (NaN/Inf) in update"} <= reasons
    assert all(np.isfinite(r["accuracy"]) for r in records)
    glob = load_latest(tmp_path / "faults" / "checkpoints").arrays
    assert all(np.isfinite(v).all() for v in glob.values())


def test_too_few_successes_stops_with_clear_error(toy_yaml, tmp_path, capsys):
    out = tmp_path / "dead"
    code = main(["run", str(toy_yaml), "faults.failure_prob=1.0", "--out", str(out)])
    assert code == 1
    err = capsys.readouterr().err
    assert "round 1: only 0 of 8 clients succeeded" in err and err.count("\n") == 1


def test_existing_run_folder_is_never_overwritten(toy_yaml, tmp_path, capsys):
    out = tmp_path / "keep"
    run(toy_yaml, out, "rounds=1")
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["run", str(toy_yaml), "--out", str(out)]) == 2
    assert "run folder exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before
    assert main(["run", str(toy_yaml), "rounds=1", "--out", str(out), "--overwrite"]) == 0


def test_bad_scenario_exit_2_one_line_no_folder(tmp_path, capsys):
    p = write_scenario(tmp_path / "bad.yaml", client={"lr": -1})
    out = tmp_path / "never"
    assert main(["run", str(p), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {p}: client.lr: must be > 0 (got -1)"
    assert not out.exists()


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "fedbn" in out and "toy" in out and "cnn-small" in out


def test_report_compares_runs(toy_yaml, tmp_path, capsys):
    run(toy_yaml, tmp_path / "r1", "rounds=1")
    run(toy_yaml, tmp_path / "r2", "rounds=1", "strategy.name=fedbn")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "rep.png")]) == 0
    table = (tmp_path / "rep.md").read_text()
    assert "| fedavg |" in table and "| fedbn |" in table and (tmp_path / "rep.png").exists()


def test_divergence_stops_naming_round_and_checkpoint(toy_yaml, tmp_path, capsys):
    out = tmp_path / "div"
    # a sane first round, then a global model that blows up: its checkpoint rewritten with
    # huge weights (through the checkpoint API, so it is intact and the scenario unchanged)
    assert main(["run", str(toy_yaml), "rounds=1", "--out", str(out)]) == 0
    ckpt = load_latest(out / "checkpoints")
    ckpt.arrays = {k: v * 1e30 if v.dtype.kind == "f" and "running" not in k else v for k, v in ckpt.arrays.items()}
    save_checkpoint(out / "checkpoints", ckpt)
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 1", "rounds: 3"))
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 1
    err = capsys.readouterr().err
    assert "round 2:" in err and "diverged" in err and "last good checkpoint: round 1" in err
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_half_written_checkpoint_is_never_loaded(toy_yaml, tmp_path):
    out = tmp_path / "ck"
    run(toy_yaml, out, "rounds=2")
    # a checkpoint folder without meta.json (killed mid-write) and a torn temp folder
    torn = out / "checkpoints" / "round_00003"
    torn.mkdir()
    (torn / "global.safetensors").write_bytes(b"\x00" * 10)
    (out / "checkpoints" / ".tmp_round_00004_1").mkdir()
    assert load_latest(out / "checkpoints").round == 2


def test_agc_applies_to_any_strategy(toy_yaml, tmp_path):
    plain = run(toy_yaml, tmp_path / "plain", "rounds=1")
    clipped = run(toy_yaml, tmp_path / "agc", "rounds=1", "client.agc_lambda=0.001")
    assert strip_timing(plain) != strip_timing(clipped)


def test_wrongly_shaped_replies_are_excluded(toy_yaml, tmp_path):
    records = run(toy_yaml, tmp_path / "shape", "faults.bad_shape_prob=0.3")
    reasons = [f["reason"] for r in records for f in r["failures"]]
    assert reasons and set(reasons) == {"arrays of unexpected names or shapes"}
    assert all(r["strategy_metrics"]["num_succeeded"] + len([f for f in r["failures"]]) == 8 for r in records)


def test_stragglers_past_the_timeout_are_dropped(toy_yaml, tmp_path):
    records = run(
        toy_yaml,
        tmp_path / "slow",
        "rounds=1",
        "faults.straggler_prob=0.5",
        "faults.straggler_delay_s=0.6",
        "faults.client_timeout_s=0.5",
    )
    late = [f for f in records[0]["failures"] if f["reason"] == "no reply (timeout)"]
    assert 1 <= len(late) <= 7
    assert records[0]["strategy_metrics"]["num_succeeded"] == 8 - len(late)


def test_round_with_too_few_successes_is_retried(toy_yaml, tmp_path):
    records = run(
        toy_yaml,
        tmp_path / "retry",
        "rounds=2",
        "faults.failure_prob=0.6",
        "faults.min_success_fraction=0.5",
        "faults.max_round_retries=8",
    )
    attempts = {f["attempt"] for r in records for f in r["failures"]}
    assert max(attempts) >= 1  # at least one round needed another attempt
    assert all(r["strategy_metrics"]["num_succeeded"] >= 4 for r in records)
