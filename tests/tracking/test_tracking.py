"""Experiment tracking: what TensorBoard / MLflow / W&B hold equals metrics.jsonl and
adaptation.jsonl, read back with each library's own reader; a resume keeps one value per step."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_scenario

# tensorboard is in the test extra (this must run in CI); the MLflow / W&B tests skip without theirs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedsim.cli import main

ADAPT = {
    "adapters": ["source", "tbn"],
    "stream": {"corruptions": ["gaussian_noise"], "severities": [3], "batch_size": 16, "samples_per_shift": 32},
    "edges": [0, 1],
}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard shows for ``log_dir``: tag -> [(step, value)]."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run(tmp_path: Path, name: str, **sections) -> Path:
    out = tmp_path / name
    assert main(["run", str(write_scenario(tmp_path / f"{name}.yaml", name=name, **sections)), "--out", str(out)]) == 0
    return out


def expected_rounds(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The series each record must give (written out here, not taken from fedsim.tracking)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        pairs = {
            "eval/accuracy": r["accuracy"],
            "eval/loss": r["loss"],
            "train/loss": r["train_loss"],
            "bytes/up": r["bytes_up"],
            "bytes/down_total": r["bytes_down_total"],
        }
        pairs.update({f"eval/domain/{d}": a for d, a in r["per_domain"].items()})
        for tag, value in pairs.items():
            out.setdefault(tag, []).append((r["round"], value))
    return out


def assert_series(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]]) -> None:
    for tag, series in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in series], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in series], rel=1e-6), tag  # float32 in events


def test_tensorboard_holds_each_round_of_metrics_jsonl(tmp_path: Path) -> None:
    out = run(tmp_path, "tb", tracking={"tensorboard": True, "per_client": True})
    records = jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    got = scalars(out / "tensorboard")
    assert_series(got, expected_rounds(records))
    assert len(records[0]["per_domain"]) == 4 and len(records[0]["per_client"]) == 8  # toy: 4 domains x 2 clients
    assert_series(
        got, {f"eval/client/{c}": [(r["round"], r["per_client"][c]) for r in records] for c in records[0]["per_client"]}
    )
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    hparams = acc.PluginTagToContent("hparams")  # the scenario in TensorBoard's HPARAMS tab
    assert set(hparams) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["seed"].number_value == 0 and start.hparams["strategy.name"].string_value == "fedavg"
    assert start.hparams["data.clients_per_domain"].number_value == 2


def test_tracking_off_writes_nothing(tmp_path: Path) -> None:
    out = run(tmp_path, "off", rounds=1)
    assert not (out / "tensorboard").exists() and not (out / "tracking.json").exists()


def test_resume_keeps_one_value_per_step(tmp_path: Path) -> None:
    """A run killed after logging rounds 2 and 3 but before checkpointing them (here: their
    checkpoints removed) logs them again on resume; TensorBoard shows each once, the new one."""
    out = run(tmp_path, "res", rounds=3, tracking={"tensorboard": True})
    first = scalars(out / "tensorboard")
    for rnd in (2, 3):
        shutil.rmtree(out / "checkpoints" / f"round_{rnd:05d}")
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 3", "rounds: 4"))
    assert main(["run", "--resume", str(out)]) == 0
    records = jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per session
    got = scalars(out / "tensorboard")
    assert_series(got, expected_rounds(records))  # steps 1..4 once each
    assert got["eval/accuracy"][:3] == pytest.approx(first["eval/accuracy"])  # same seed: same numbers


def test_tensorboard_holds_each_adaptation_batch(tmp_path: Path) -> None:
    out = run(
        tmp_path,
        "ad",
        rounds=1,
        data={"clients_per_domain": 1},
        strategy={"name": "fedbn"},
        adaptation=ADAPT,
        tracking={"tensorboard": True},
    )
    rows = jsonl(out / "adaptation.jsonl")
    got = scalars(out / "tensorboard" / "adaptation")
    want: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        prefix = f"adaptation/{r['adapter']}/edge{r['edge']}/seed{r['seed']}"
        want.setdefault(f"{prefix}/accuracy", []).append((r["batch"], r["accuracy"]))
        want.setdefault(f"{prefix}/cumulative_accuracy", []).append((r["batch"], r["cumulative_accuracy"]))
    assert len(want) == 2 * 2 * 2 and all(len(s) == 2 for s in want.values())  # 2 adapters x 2 edges, 32 samples / 16
    assert_series(got, want)
    assert not any(t.startswith("adaptation/") for t in scalars(out / "tensorboard"))  # its own TensorBoard run


def test_fedsim_adapt_tracks_into_its_folder(tmp_path: Path) -> None:
    model = run(tmp_path, "m", rounds=1, data={"clients_per_domain": 1}, strategy={"name": "fedbn"})
    adapt = tmp_path / "adapt.yaml"
    adapt.write_text(yaml.safe_dump({"name": "a", "adaptation": ADAPT, "tracking": {"tensorboard": True}}))
    out = tmp_path / "a"
    assert main(["adapt", str(adapt), "--model", str(model), "--out", str(out)]) == 0
    rows = jsonl(out / "adaptation.jsonl")
    got = scalars(out / "tensorboard" / "adaptation")
    r = rows[-1]
    assert got[f"adaptation/{r['adapter']}/edge{r['edge']}/seed{r['seed']}/accuracy"][-1] == (
        r["batch"],
        pytest.approx(r["accuracy"]),
    )


@pytest.mark.parametrize(
    ("tracking", "message"),
    [
        ({"tensorboard": 3}, "tracking.tensorboard: Input should be a valid boolean (got 3)"),
        ({"mlflow": 3}, "tracking.mlflow: expected true, false or a mapping of options (got 3)"),
        ({"wandb": {"mode": "cloud"}}, "tracking.wandb.mode: must be one of 'offline' or 'online'"),
        ({"tensorbord": True}, "tracking.tensorbord: unknown key (did you mean 'tensorboard'?)"),
    ],
)
def test_bad_tracking_is_one_line_and_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, tracking: dict, message: str
) -> None:
    out = tmp_path / "bad"
    assert main(["run", str(write_scenario(tmp_path / "bad.yaml", tracking=tracking)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists()


def test_missing_backend_names_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "nomlflow"
    path = write_scenario(tmp_path / "s.yaml", tracking={"mlflow": True})
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: tracking.mlflow: the mlflow package is not installed (pip install 'fedsim[mlflow]')"
    assert not out.exists()


# -- MLflow (extra fedsim[mlflow]) -------------------------------------------------------


def test_mlflow_file_store_holds_rounds_and_resume_adds_none_twice(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = run(tmp_path, "ml", rounds=3, tracking={"mlflow": True})
    run_id = json.loads((out / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())

    def history() -> dict[str, list[tuple[int, float]]]:
        return {
            k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in client.get_run(run_id).data.metrics
        }

    assert_series(history(), expected_rounds(jsonl(out / "metrics.jsonl")))
    info = client.get_run(run_id)
    assert (
        info.info.status == "FINISHED"
        and info.data.params["strategy.name"] == "fedavg"
        and info.data.params["rounds"] == "3"
    )
    assert client.get_experiment(info.info.experiment_id).name == "ml"
    shutil.rmtree(out / "checkpoints" / "round_00003")
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 3", "rounds: 4"))
    assert main(["run", "--resume", str(out)]) == 0
    assert json.loads((out / "tracking.json").read_text())["mlflow_run_id"] == run_id  # the same MLflow run, continued
    assert_series(history(), expected_rounds(jsonl(out / "metrics.jsonl")))  # rounds 1..4, each once


# -- W&B offline (extra fedsim[wandb]) ---------------------------------------------------


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline ``.wandb`` file, parsed by W&B's own protobuf Record.
    The file is a LevelDB-style log (a 7-byte W&B header, 32 KiB blocks, records of a 7-byte
    header: CRC, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:3] == b":W&"
    pos, block, rows, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_run_holds_rounds(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    out = run(tmp_path, "wb", rounds=2, tracking={"wandb": {"project": "fedsim-test"}})
    run_id = json.loads((out / "tracking.json").read_text())["wandb_run_id"]
    files = list((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1
    rows = wandb_history(files[0])
    records = jsonl(out / "metrics.jsonl")
    assert [row["round"] for row in rows] == [1, 2]
    for row, r in zip(rows, records, strict=True):
        assert row["eval/accuracy"] == pytest.approx(r["accuracy"]) and row["bytes/up"] == r["bytes_up"]
        assert {k: row[f"eval/domain/{k}"] for k in r["per_domain"]} == pytest.approx(r["per_domain"])
    # killed after logging round 2, before checkpointing it: the resume logs round 3 only
    shutil.rmtree(out / "checkpoints" / "round_00002")
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 2", "rounds: 3"))
    time.sleep(1.1)  # W&B names an offline session's folder by the second: keep the two apart
    assert main(["run", "--resume", str(out)]) == 0
    sessions = sorted((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(sessions) == 2  # one per session; `wandb sync` uploads both into run run_id
    assert [row["round"] for f in sessions for row in wandb_history(f)] == [1, 2, 3]
