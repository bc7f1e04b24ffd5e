"""The adaptation phase: config validation, deployment, ``fedsim adapt`` and ``fedsim run``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TOY
from fixtures_datasets import write_cifar10, write_cifar10c

from fedsim.arrays import load_arrays
from fedsim.cli import main
from fedsim.config import Scenario, ScenarioError
from fedsim.engine.checkpoint import load_latest
from fedsim.models import norm_state_keys
from fedsim.scenario import load_scenario, open_model_run
from fedsim.tta.config import AdaptationConfig
from fedsim.tta.deploy import ModelRunError, deploy_model
from fedsim.tta.streams import edge_stream

STREAM = {"corruptions": ["gaussian_noise", "contrast"], "severities": [3], "batch_size": 16, "samples_per_shift": 24}
ADAPT = {"adapters": ["source", "tbn", {"name": "alpha_bn", "args": {"a": 0.3}}], "stream": STREAM, "edges": [0, 2]}


def toy(name: str, strategy: str = "fedbn", rounds: int = 2, **extra: object) -> dict:
    data = json.loads(json.dumps(TOY))
    data.update(name=name, rounds=rounds, strategy={"name": strategy})
    data["data"] = {"dataset": "toy", "image_size": 16, "clients_per_domain": 1}
    data.update(extra)
    return data


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def fedbn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedbn")
    out = root / "run"
    assert main(["run", str(write(root / "toy.yaml", toy("toyfedbn"))), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fedavg")
    out = root / "run"
    assert main(["run", str(write(root / "toy.yaml", toy("toyfedavg", "fedavg"))), "--out", str(out)]) == 0
    return out


# -- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adaptation", "expected"),
    [
        ({**ADAPT, "stream": {**STREAM, "batch_size": 0}}, "adaptation.stream.batch_size: must be >= 1 (got 0)"),
        ({**ADAPT, "stream": {**STREAM, "dirichlet_delta": -0.1}}, "adaptation.stream.dirichlet_delta: must be >= 0"),
        (
            {**ADAPT, "stream": {**STREAM, "severities": [7]}},
            "adaptation.stream.severities: severities must be in 1..5",
        ),
        ({**ADAPT, "stream": {**STREAM, "protocol": "shuffled"}}, "adaptation.stream.protocol: must be one of"),
        (
            {**ADAPT, "stream": {**STREAM, "corruptions": ["rain"]}},
            "adaptation.stream.corruptions: unknown corruption 'rain'",
        ),
        ({**ADAPT, "stream": {"shifts": ["fog"]}}, "adaptation.stream.shifts: 'fog' needs a severity"),
        ({**ADAPT, "stream": {"batch_size": 4}}, "adaptation.stream.corruptions: give stream.corruptions"),
        (
            {**ADAPT, "stream": {**STREAM, "shifts": ["fog@2"]}},
            "adaptation.stream.corruptions: give stream.corruptions or stream.shifts, not both",
        ),
        ({**ADAPT, "stream": {**STREAM, "colour": 1}}, "adaptation.stream.colour: unknown key"),
        ({**ADAPT, "edges": "some"}, "adaptation.edges: must be all or a list of client ids"),
        ({**ADAPT, "edges": [1, 1]}, "adaptation.edges: client ids must be distinct"),
        ({**ADAPT, "model": "mine"}, "adaptation.model: must be one of"),
        ({**ADAPT, "adapters": ["tbn", "nope"]}, "adaptation.adapters.1.name: unknown adapter 'nope'"),
        (
            {**ADAPT, "adapters": [{"name": "alpha_bn", "args": {"alpha": 1}}]},
            "adaptation.adapters.0.args: unknown setting 'alpha' of adapter 'alpha_bn'",
        ),
        ({**ADAPT, "adapters": ["tbn", "tbn"]}, "adaptation.adapters: labels must be distinct"),
        ({**ADAPT, "adapter": "tbn"}, "adaptation.adapters: give adapter or adapters, not both"),
        ({"stream": STREAM}, "adaptation.adapters: give adapter (one) or adapters (a list)"),
        (
            {"adapter": {"name": "cema", "args": {"foundation": "x"}}, "stream": STREAM},
            "adaptation.adapter.args: 'foundation' is set by fedsim",
        ),
        ({**ADAPT, "foundation": {"epochs": 0}}, "adaptation.foundation.epochs: must be >= 1"),
        ({**ADAPT, "stream": {**STREAM, "seeds": []}}, "adaptation.stream.seeds: give at least one seed"),
    ],
)
def test_config_errors_name_file_and_dotted_key(tmp_path: Path, adaptation: dict, expected: str) -> None:
    path = write(tmp_path / "s.yaml", toy("bad", adaptation=adaptation))
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {expected}"), message
    assert "\n" not in message


def test_config_defaults_and_shorthands() -> None:
    cfg = AdaptationConfig.model_validate(
        {"adapter": "tbn", "stream": {"corruptions": ["fog", "contrast"], "severities": [1, 5]}}
    )
    assert [s.name for s in cfg.adapter_specs()] == ["tbn"]
    assert cfg.stream.shift_names() == ["fog@1", "fog@5", "contrast@1", "contrast@5"]
    assert cfg.edges == "all" and cfg.model == "auto" and cfg.reset == "auto"
    gradual = AdaptationConfig.model_validate(
        {"adapter": "tbn", "stream": {"protocol": "gradual", "corruptions": ["fog"]}}
    )
    assert gradual.stream.shift_names() == ["fog"]
    custom = AdaptationConfig.model_validate(
        {"adapter": {"name": "fedsim.adapters.tbn:TBN"}, "stream": {"shifts": ["clean", "fog@2"]}}
    )
    assert custom.adapter_specs()[0].display == "TBN"  # an import path is labelled by its class name
    labelled = AdaptationConfig.model_validate(
        {
            "adapters": [
                "tbn",
                {"name": "fedsim.adapters.tbn.TBN", "label": "mine"},
                {"name": "fedsim.adapters.tent:Tent"},
            ],
            "stream": {"shifts": ["clean"]},
        }
    )
    assert [s.display for s in labelled.adapter_specs()] == ["tbn", "mine", "Tent"]
    assert Scenario.model_validate({}).adaptation is None


# -- deployment -------------------------------------------------------------------------


def test_personalized_deployment_uses_the_clients_local_bn(fedbn_run: Path) -> None:
    mr = open_model_run(fedbn_run)
    ckpt = load_latest(fedbn_run / "checkpoints")
    for cid in (0, 2):
        files = sorted(
            (fedbn_run / "clients" / str(cid)).glob("local.r*.safetensors"),
            key=lambda p: int(p.name.split(".r")[1].split(".")[0]),
        )
        local = load_arrays(files[-1])
        model, info = deploy_model(mr, cid, "personalized")
        sd = model.state_dict()
        keys = norm_state_keys(model)
        assert info["deployed"] == "personalized" and info["local_round"] == 2 and set(local) == keys
        for k in keys:
            assert torch.equal(sd[k], torch.from_numpy(local[k]).reshape(sd[k].shape).to(sd[k].dtype)), k
        for k in set(sd) - keys:  # everything else is the global model
            assert torch.equal(sd[k], torch.from_numpy(ckpt.arrays[k]).reshape(sd[k].shape).to(sd[k].dtype)), k
        # the local BN differs from the global model's (FedBN never averages it) and between clients
        assert any(
            not np.allclose(local[k], ckpt.arrays[k].reshape(local[k].shape)) for k in keys if "running_mean" in k
        )
    m0, _ = deploy_model(mr, 0, "personalized")
    m2, _ = deploy_model(mr, 2, "personalized")
    k = next(k for k in norm_state_keys(m0) if k.endswith("running_mean"))
    assert not torch.equal(m0.state_dict()[k], m2.state_dict()[k])
    glob, info = deploy_model(mr, 0, "global")
    assert info["deployed"] == "global"
    assert torch.equal(glob.state_dict()[k], torch.from_numpy(ckpt.arrays[k]))
    auto, info = deploy_model(mr, 0, "auto")
    assert info["deployed"] == "personalized" and torch.equal(auto.state_dict()[k], m0.state_dict()[k])


def test_personalized_needs_local_state(fedavg_run: Path) -> None:
    mr = open_model_run(fedavg_run)
    with pytest.raises(ModelRunError, match="has no local state"):
        deploy_model(mr, 0, "personalized")
    _, info = deploy_model(mr, 0, "auto")
    assert info["deployed"] == "global"


# -- fedsim adapt / fedsim run ----------------------------------------------------------


def test_fedsim_adapt_end_to_end(fedbn_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scen = write(
        tmp_path / "adapt.yaml",
        {"name": "tiny", "adaptation": {**ADAPT, "model": "personalized", "stream": {**STREAM, "seeds": [0, 1]}}},
    )
    out = tmp_path / "out"
    assert main(["adapt", str(scen), "--model", str(fedbn_run), "--out", str(out)]) == 0
    for name in ("adaptation.jsonl", "adaptation_summary.json", "adaptation.png", "adaptation.yaml"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "adaptation.jsonl").read_text().splitlines()]
    # 3 adapters x 2 edges x 2 seeds x (2 shifts x 24 samples / 16 per batch -> 2 + 2 batches)
    assert len(rows) == 3 * 2 * 2 * 4
    assert {r["adapter"] for r in rows} == {"source", "tbn", "alpha_bn"} and {r["edge"] for r in rows} == {0, 2}
    assert all({"batch", "shift", "accuracy", "seconds", "metrics", "seed", "stream_seed"} <= set(r) for r in rows)
    summary = json.loads((out / "adaptation_summary.json").read_text())
    assert summary["deployed"]["0"]["deployed"] == "personalized" and summary["seeds"] == [0, 1]
    assert summary["title"] == "tiny: online accuracy, model of toyfedbn (fedbn, 2 rounds, seed 0)"  # the plot's title
    res = summary["results"]["tbn"]
    assert set(res["per_edge"]) == {"0", "2"} and [s["shift"] for s in res["per_shift"]] == [
        "gaussian_noise@3",
        "contrast@3",
    ]
    assert 0.0 <= res["error"] <= 1.0 and res["seconds_per_batch"] > 0
    rec = summary["streams"]["edge0/seed0"]
    assert rec["samples"] == 48 and rec["reset_on_new_shift"] is False and rec["protocol"] == "continual"
    assert rec["seed"] != summary["streams"]["edge2/seed0"]["seed"]  # seeded per edge
    assert "online error" in capsys.readouterr().out
    # same streams, same results: repeatable
    again = tmp_path / "again"
    assert main(["adapt", str(scen), "--model", str(fedbn_run), "--out", str(again)]) == 0
    a = [json.loads(x)["correct"] for x in (out / "adaptation.jsonl").read_text().splitlines()]
    b = [json.loads(x)["correct"] for x in (again / "adaptation.jsonl").read_text().splitlines()]
    assert a == b
    # never overwrite without --overwrite
    capsys.readouterr()
    assert main(["adapt", str(scen), "--model", str(fedbn_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out}: output folder exists") and "\n" not in err
    assert main(["adapt", str(scen), "--model", str(fedbn_run), "--out", str(out), "--overwrite"]) == 0


def test_fedsim_adapt_bad_input(fedbn_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    scen = write(tmp_path / "adapt.yaml", {"name": "tiny", "adaptation": ADAPT})
    capsys.readouterr()
    assert main(["adapt", str(scen), "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: not a fedsim run folder (no scenario.yaml)"
    assert main(["adapt", str(scen), "--model", str(tmp_path / "missing")]) == 2
    assert "not a fedsim run folder" in capsys.readouterr().err
    bad = write(tmp_path / "bad.yaml", {"name": "tiny", "adaptation": {**ADAPT, "stream": {**STREAM, "batch_size": 0}}})
    assert main(["adapt", str(bad), "--model", str(fedbn_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}: adaptation.stream.batch_size: must be >= 1 (got 0)"
    assert main(["adapt", str(scen), "adaptation.stream.batch_size=-2", "--model", str(fedbn_run)]) == 2
    assert "adaptation.stream.batch_size: must be >= 1" in capsys.readouterr().err
    none = write(tmp_path / "none.yaml", {"name": "tiny"})
    assert main(["adapt", str(none), "--model", str(fedbn_run)]) == 2
    assert "adaptation: required key is missing" in capsys.readouterr().err
    far = write(tmp_path / "far.yaml", {"name": "far", "adaptation": {**ADAPT, "edges": [0, 9]}})
    assert main(["adapt", str(far), "--model", str(fedbn_run), "--out", str(tmp_path / "far")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {far}: adaptation.edges: client 9 does not exist (the run has clients 0..3)"
    assert not (tmp_path / "far").exists()
    dom = write(
        tmp_path / "dom.yaml", {"name": "dom", "adaptation": {**ADAPT, "stream": {"shifts": ["clean", "purple"]}}}
    )
    assert main(["adapt", str(dom), "--model", str(fedbn_run), "--out", str(tmp_path / "dom")]) == 2
    assert "adaptation.stream.shifts: 'purple' is neither" in capsys.readouterr().err


def test_fedsim_run_with_adaptation_runs_both_phases(tmp_path: Path) -> None:
    adaptation = {
        "adapters": [
            "tbn",
            {"name": "cema", "args": {"warmup_samples": 16, "cloud_batch": 8}},
            {"name": "cema", "label": "cema-all", "args": {"upload_all": True, "cloud_batch": 8}},
        ],
        "stream": {
            "shifts": ["clean", "fog@3", "green"],
            "batch_size": 8,
            "samples_per_shift": 24,
            "protocol": "reset-each-shift",
        },
        "edges": [1],
        "foundation": {"epochs": 1, "args": {"width": 8}},
    }
    scen = write(tmp_path / "both.yaml", toy("both", "fedavg", adaptation=adaptation))
    out = tmp_path / "run"
    assert main(["run", str(scen), "--out", str(out)]) == 0
    assert (out / "metrics.jsonl").is_file() and (out / "summary.json").is_file()
    for name in ("adaptation.jsonl", "adaptation_summary.json", "adaptation.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "adaptation_summary.json").read_text())
    assert summary["deployed"]["1"]["deployed"] == "global"
    assert summary["title"] == "both (fedavg, 2 rounds, seed 0): online accuracy after training"
    assert [s["shift"] for s in summary["results"]["tbn"]["per_shift"]] == ["clean", "fog@3", "green"]
    assert summary["streams"]["edge1/seed0"]["reset_on_new_shift"] is True
    comm = summary["results"]["cema-all"]["communication"]
    model, _ = deploy_model(open_model_run(out), 1)
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    stats_bytes = (
        3 * 2 * bn_channels * 4
    )  # TBR: the first batch's float32 mean and var, uploaded once per shift (3 resets)
    assert (
        comm["upload_fraction"] == 1.0
        and comm["bytes_up_total"] == 72 * 3 * 16 * 16 + stats_bytes
        and comm["bytes_down_total"] > 0
    )
    assert 0.0 <= summary["results"]["cema"]["communication"]["upload_fraction"] <= 1.0
    assert "communication" not in summary["results"]["tbn"]
    foundation = summary["foundation"]
    assert foundation["cached"] is False and Path(foundation["file"]).is_file()
    # a second adapt call reuses the cached foundation model
    adapt = write(tmp_path / "adapt.yaml", {"name": "again", "adaptation": {**adaptation, "adapters": ["cema"]}})
    assert main(["adapt", str(adapt), "--model", str(out)]) == 0
    again = json.loads((out / "adapt-again" / "adaptation_summary.json").read_text())
    assert again["foundation"]["cached"] is True and again["foundation"]["key"] == foundation["key"]


# -- CIFAR-10-C streams read from the files ------------------------------------------------


def test_cifar10c_streams_read_the_files(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=20, n_test=30)
    write_cifar10c(tmp_path, corruptions=("gaussian_noise", "fog"), n=20)
    scenario = Scenario.model_validate(
        {
            "data": {
                "dataset": "cifar10c",
                "root": str(tmp_path),
                "image_size": 32,
                "partition": "iid",
                "options": {"corruptions": ["gaussian_noise", "fog"], "severity": 5},
            },
            "adaptation": {
                "adapter": "tbn",
                "stream": {"shifts": ["fog@2", "gaussian_noise@4", "fog@5"], "batch_size": 8},
            },
        }
    )
    stream = edge_stream(scenario, scenario.adaptation, 0, "gaussian_noise", seed=3)
    assert stream.record()["source"] == "corrupted_source"
    seen: dict[str, set[int]] = {}
    for batch in stream:
        marks = torch.round(batch.x[:, 0, 0, 0] * 255).to(torch.int64).tolist()
        seen.setdefault(batch.shift, set()).update(marks)
    # pixel [0, 0, 0] of the fixture files is 100 * (corruption number) + severity
    assert seen == {"fog@2": {102}, "gaussian_noise@4": {4}, "fog@5": {105}}
    assert stream.num_samples == 60
