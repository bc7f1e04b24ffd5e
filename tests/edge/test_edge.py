"""The edge demo: the message protocol against the simulation (in-process), device-profile
arithmetic, the live view's reader, and (marked ``edge``) the demo end to end on real
SuperLink / SuperNode processes: results equal a simulation's, and nothing it started
survives it, whether it finishes, fails or is interrupted."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from flwr.app import Context, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsim.cli import main
from fedsim.data.loading import num_clients
from fedsim.edge.config import DeviceProfile
from fedsim.edge.dashboard import ProgressReader
from fedsim.edge.processes import TOKEN_ENV, processes_with_token
from fedsim.edge.profiles import estimate, model_memory_bytes
from fedsim.scenario import load_scenario

SCENARIO = {
    "name": "edge-tiny",
    "seed": 0,
    "rounds": 2,
    "data": {
        "dataset": "digits5",
        "domains": ["mnist", "usps"],
        "image_size": 28,
        "partition": "by-domain",
        "clients_per_domain": 1,
        "samples_per_client": 160,
        "domain_test_samples": 64,
    },
    "model": {"name": "cnn-small", "normalization": "bn", "args": {"width": 8}},
    "client": {"lr": 0.05, "momentum": 0.9, "batch_size": 32},
    "strategy": {"name": "fedavg", "args": {"fraction_train": 1.0}},
    "evaluation": {"every": 2},
    "adaptation": {
        "adapters": [
            "source",
            "tbn",
            {
                "name": "cema",
                "args": {
                    "cloud_batch": 8,
                    "warmup_samples": 32,
                    "e0_ratio": 0.95,
                    "redundancy_margin": 0.6,
                    "replay_start": 8,
                    "replay_size": 4,
                },
            },
        ],
        "stream": {
            "corruptions": ["gaussian_noise", "contrast"],
            "severities": [2],
            "batch_size": 16,
            "samples_per_shift": 48,
        },
        "edge_streams": {1: {"corruptions": ["defocus_blur"], "dirichlet_delta": 0.1}},
        "model": "global",
        "reset": "never",
        "foundation": {"epochs": 1, "args": {"width": 16}},
    },
    "edge": {"profiles": {"slow": {"compute": 0.25, "uplink_mbps": 1.0}}, "devices": {1: "slow"}},
}


def write(path: Path, **updates: object) -> Path:
    data = json.loads(json.dumps(SCENARIO))
    data.update(updates)
    path.write_text(yaml.safe_dump(data))
    return path


def simulate(scenario: Path, out: Path) -> None:
    assert main(["run", str(scenario), "--out", str(out)]) == 0


def per_edge_errors(run: Path) -> dict[str, dict[str, float]]:
    summary = json.loads((run / "adaptation_summary.json").read_text())
    return {label: {e: r["error"] for e, r in res["per_edge"].items()} for label, res in summary["results"].items()}


def batch_scores(run: Path) -> dict[tuple, tuple]:
    """(adapter, edge, batch) -> (correct, cumulative metrics without timings)."""
    rows = [json.loads(line) for line in (run / "adaptation.jsonl").read_text().splitlines()]
    return {
        (r["adapter"], r["edge"], r["batch"]): (
            r["correct"],
            {k: v for k, v in r.get("metrics", {}).items() if "seconds" not in k},
        )
        for r in rows
    }


def accuracies(run: Path) -> list[dict[str, float]]:
    return [json.loads(line)["per_client"] for line in (run / "metrics.jsonl").read_text().splitlines()]


TOKEN = f"test-{uuid.uuid4().hex}"  # every process the demos here start carries it


def leftover_processes() -> list[int]:
    """Live processes started by this module's demos (other sessions' demos are ignored)."""
    return processes_with_token(TOKEN)


# -- in process: the protocol equals the simulation ----------------------------------------
@pytest.mark.parametrize("reset", ["never", "each-shift"])
def test_protocol_in_process_equals_simulation(tmp_path: Path, reset: str) -> None:
    """The cloud and edge apps over an in-process grid (persistent node Contexts, as on
    SuperNodes) score every batch as the simulation does, also when CEMA resets at shifts."""
    from fedsim.edge.apps import client_app, run_cloud
    from fedsim.engine.grid import InlineGrid
    from fedsim.results import RunFolder

    path = write(tmp_path / "s.yaml", adaptation={**SCENARIO["adaptation"], "reset": reset})
    simulate(path, tmp_path / "sim")
    scenario = load_scenario(path)
    out = (tmp_path / "edge").resolve()
    RunFolder.create(out, scenario)
    n = num_clients(scenario.data)
    contexts = {
        500 + i: Context(
            run_id=1,
            node_id=500 + i,
            node_config={"partition-id": i, "num-partitions": n, "state-dir": str(out)},
            state=RecordDict(),
            run_config={},
        )
        for i in range(n)
    }
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    run_cloud(
        InlineGrid(client_app, contexts), {"scenario": "", "run-dir": str(out), "resume": True}
    )  # as the demo submits
    assert accuracies(out) == accuracies(tmp_path / "sim")
    assert per_edge_errors(out) == per_edge_errors(tmp_path / "sim")
    assert batch_scores(out) == batch_scores(tmp_path / "sim")  # every batch, CEMA's uploads and cloud rounds too
    sim = json.loads((tmp_path / "sim" / "adaptation_summary.json").read_text())
    assert sim["results"]["cema"]["communication"]["upload_fraction"] > 0  # the uploads path was exercised
    assert sim["results"]["cema"]["metrics_mean_per_stream"]["cloud_steps"] > 0
    progress = [json.loads(line) for line in (out / "edge" / "progress.jsonl").read_text().splitlines()]
    assert progress[0]["event"] == "start" and progress[-1]["event"] == "done"
    assert (out / "edge" / "devices.json").is_file()


# -- device profiles and the live view -----------------------------------------------------
def test_estimate_by_hand() -> None:
    p = DeviceProfile(
        name="p",
        compute=0.5,
        uplink_mbps=2.0,
        downlink_mbps=8.0,
        rtt_ms=10.0,
        memory_mb=1.0,
        compute_w=2.0,
        radio_nj_per_bit=50.0,
    )
    est = estimate(
        p, seconds=1.0, batches=4, bytes_up=250_000, bytes_down=1_000_000, exchanges=3, memory_bytes=2**20 + 1
    )
    compute = 1.0 / 0.5
    transfer = 250_000 * 8 / 2e6 + 1_000_000 * 8 / 8e6 + 3 * 0.010
    assert math.isclose(est["compute_s"], compute) and math.isclose(est["transfer_s"], transfer)
    assert math.isclose(est["latency_ms_per_batch"], 1e3 * (compute + transfer) / 4)
    assert math.isclose(est["energy_j"], 2.0 * compute + 50e-9 * 8 * 1_250_000)
    assert est["fits_memory"] is False


def test_model_memory_counts_parameters_and_layer_outputs() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    params = (4 * 3 + 3 + 3 * 2 + 2) * 4
    acts = (5 * 3 + 5 * 3 + 5 * 2) * 4
    assert model_memory_bytes(model, torch.zeros(5, 4)) == params + acts


def test_progress_reader_waits_for_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "progress.jsonl"
    reader = ProgressReader(path)
    assert reader.poll() == []
    path.write_text(json.dumps({"event": "start", "rounds": 3, "time": 0}) + "\n" + '{"event": "round", "rec')
    assert [e["event"] for e in reader.poll()] == ["start"]
    with open(path, "a") as fh:
        fh.write('ord": {"round": 1, "accuracy": 0.5}, "time": 1}\n')
    assert [e["event"] for e in reader.poll()] == ["round"]
    assert reader.state["round"] == 1 and reader.state["accuracy"] == 0.5 and not reader.finished


def test_app_declared_for_flwr_run() -> None:
    """`flwr run .` reads these: the components must import and be Flower apps."""
    import tomllib

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from fedsim.registry import import_object

    conf = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert isinstance(import_object(conf["components"]["serverapp"]), ServerApp)
    assert isinstance(import_object(conf["components"]["clientapp"]), ClientApp)
    assert set(conf["config"]) == {"scenario", "run-dir", "resume"}
    assert conf["config"]["resume"] is False  # a re-submission never silently reuses a run folder


# -- end to end on Flower's deployment runtime ----------------------------------------------
def demo(*args: str, **popen: object) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "160", TOKEN_ENV: TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "fedsim.cli", "edge", "demo", *args, "--no-live"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


@pytest.mark.edge
def test_demo_end_to_end_matches_simulation(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml")
    proc = demo(str(path), "--out", str(tmp_path / "demo"))
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    assert leftover_processes() == []
    run = tmp_path / "demo"
    for name in (
        "scenario.yaml",
        "metrics.jsonl",
        "summary.json",
        "accuracy.png",
        "adaptation.jsonl",
        "adaptation_summary.json",
        "adaptation.png",
        "edge/devices.json",
        "edge/logs/superlink.log",
        "edge/logs/supernode-1.log",
    ):
        assert (run / name).is_file(), name
    assert any((run / "checkpoints").iterdir())
    assert "online error" in out
    simulate(path, tmp_path / "sim")
    assert accuracies(run) == accuracies(tmp_path / "sim")
    assert per_edge_errors(run) == per_edge_errors(tmp_path / "sim")
    assert batch_scores(run) == batch_scores(tmp_path / "sim")
    devices = json.loads((run / "edge" / "devices.json").read_text())
    assert {r["profile"] for r in devices["rows"] if r["edge"] == 1} == {"slow"}


@pytest.mark.edge
def test_demo_interrupted_stops_everything_and_resumes(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", rounds=3, evaluation={"every": 1}, adaptation=None)
    run = tmp_path / "demo"
    proc = demo(str(path), "--out", str(run))
    progress = run / "edge" / "progress.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and '"event": "round"' in progress.read_text():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    # SIGTERM, what job managers send (SIGINT is ignored by background jobs of a non-interactive shell)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in err, err[-2000:]
    assert leftover_processes() == []
    done = len(accuracies(run))
    assert 1 <= done < 3
    again = demo("--resume", str(run))
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err[-2000:]
    assert leftover_processes() == []
    simulate(path, tmp_path / "sim")
    assert accuracies(run) == accuracies(tmp_path / "sim")


@pytest.mark.edge
def test_demo_failure_and_tls(tmp_path: Path) -> None:
    """Every client failing stops the cloud with a clear error; TLS with fedsim's own
    self-signed certificates; and nothing is left running."""
    assert main(["edge", "certs", str(tmp_path / "certs")]) == 0
    tls = {"tls": {"ca": "certs/ca.crt", "cert": "certs/server.pem", "key": "certs/server.key"}}
    path = write(
        tmp_path / "s.yaml", rounds=1, adaptation=None, edge=tls, faults={"failure_prob": 1.0, "max_round_retries": 0}
    )
    proc = demo(str(path), "--out", str(tmp_path / "demo"))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-2000:]
    assert "the cloud (ServerApp) failed" in err and "clients succeeded" in err, err[-2000:]
    assert "TLS" in out
    assert "https://" in (tmp_path / "demo" / "edge" / "logs" / "superlink.log").read_text()
    assert leftover_processes() == []


def test_live_view_renders_every_device(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from fedsim.edge.config import EdgeConfig
    from fedsim.edge.dashboard import render

    path = tmp_path / "progress.jsonl"
    events = [
        {"event": "start", "rounds": 2},
        {"event": "round", "record": {"round": 2, "accuracy": 0.75, "bytes_up_total": 2e6, "bytes_down_total": 2e6}},
        {
            "event": "edge",
            "edge": 0,
            "adapter": "tbn",
            "seed": 0,
            "batches": 4,
            "samples": 64,
            "correct": 48,
            "done": True,
            "on_device": True,
            "seconds": 0.1,
        },
        {
            "event": "edge",
            "edge": 1,
            "adapter": "cema",
            "seed": 0,
            "batches": 2,
            "samples": 32,
            "correct": 8,
            "uploaded": 5,
            "bytes_up": 3920.0,
            "bytes_down": 512.0,
            "cloud_steps": 1,
            "done": False,
            "on_device": False,
            "seconds": 0.05,
        },
    ]
    path.write_text("".join(json.dumps({**e, "time": 0}) + "\n" for e in events))
    reader = ProgressReader(path)
    reader.poll()
    edge = EdgeConfig(profiles={"cam": DeviceProfile(compute=0.1)}, devices={1: "cam"})
    buf = io.StringIO()
    Console(file=buf, width=200).print(render(reader.state, edge, "demo"))
    text = buf.getvalue()
    assert "round 2/2" in text and "0.7500" in text
    assert "cam" in text and "cema ..." in text and "0.2500" in text  # running, 8/32 correct
    assert "tbn" in text and "0.7500" in text


def test_flwr_failure_message_is_flowers_reason() -> None:
    from fedsim.edge.processes import flwr_error, json_reply

    # what `flwr run --format json` printed when the SuperLink could not import the app
    stdout = 'Loading project configuration...\n{\n    "success": false,\n    "error-message": "\\nNo module named \'fedsim\'"\n}\n'
    reply = json_reply(stdout)
    assert reply["success"] is False
    assert flwr_error(reply, stdout, "") == "No module named 'fedsim'"
    assert json_reply("no json here") == {}
    assert flwr_error({}, "", "line 1\nTraceback: boom\n") == "Traceback: boom"
    assert flwr_error({}, "", "") == "no output"


def test_certs_advice_works_with_the_shipped_scenario(tmp_path: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The lines `fedsim edge certs` prints load with scenarios/edge-demo.yaml as written
    (they once named paths relative to the working directory, which the scenario's folder is not)."""
    import shlex

    from fedsim.scenario import load_scenario

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    assert main(["edge", "certs", "certs"]) == 0
    out = capsys.readouterr().out
    command = out.strip().splitlines()[-1]
    args = shlex.split(command)
    assert args[:4] == ["fedsim", "edge", "demo", "scenarios/edge-demo.yaml"]
    scenario = load_scenario(repo / args[3], [*args[4:], "data.dataset=toy", "data.domains=null", "rounds=1"])
    assert Path(scenario.edge.tls.ca) == (tmp_path / "certs" / "ca.crt").resolve()
    yaml_lines = out.split("use them in a scenario:\n")[1].split("\nor on the command line")[0]
    assert "tls: {ca: /" in yaml_lines  # absolute: valid from a scenario in any folder
