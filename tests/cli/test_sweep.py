"""fedsim sweep: grid parsing, validation before anything runs, the table's mean ± std
against a direct re-computation from the runs' metrics.jsonl, equality with a separate
``fedsim run``, resuming, and refusal of a changed grid or scenario."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_scenario
from PIL import Image

from fedsim.cli import main
from fedsim.config import ScenarioError
from fedsim.outputs import MARKER
from fedsim.sweep import (
    Axis,
    SweepSpec,
    grid,
    parse_seeds,
    parse_sweep_args,
    run_sweep,
    split_values,
)

ROOT = Path(__file__).resolve().parents[2]
GRID = ["client.lr=0.02,0.1"]
SEEDS = "0,1"


# -- parsing -------------------------------------------------------------------------------


def test_split_values_keeps_brackets_braces_and_quotes_whole():
    assert split_values("[mnist,svhn],[mnist,usps]") == ["[mnist,svhn]", "[mnist,usps]"]
    assert split_values("{a: 1, b: [2, 3]},{a: 4}") == ["{a: 1, b: [2, 3]}", "{a: 4}"]
    assert split_values('\'x,y\',"p,\\"q",z') == ["'x,y'", '"p,\\"q"', "z"]
    assert split_values("it's,fine") == ["it's", "fine"]  # a quote inside a plain word opens nothing
    assert split_values("0.1") == ["0.1"]


def test_parse_sweep_args_axes_fixed_overrides_and_yaml_scalars(tmp_path):
    spec = parse_sweep_args(
        "s.yaml",
        ["client.lr=0.01, 0.1", "data.domains=[red,green],[blue]", "rounds=2", "strategy.name=fedavg", "x.y='a,b'"],
    )
    assert spec.axes == (Axis("client.lr", ("0.01", "0.1")), Axis("data.domains", ("[red,green]", "[blue]")))
    assert spec.overrides == ("rounds=2", "strategy.name=fedavg", "x.y='a,b'")
    assert spec.seeds is None
    points = grid(spec)
    assert points[1] == {"client.lr": "0.01", "data.domains": "[blue]"}  # first axis slowest
    assert len(points) == 4
    # seed=... with several values is the seeds; --seeds takes ranges
    assert parse_sweep_args("s.yaml", ["seed=3,1"]).seeds == (3, 1)
    assert parse_seeds("0-2,7") == (0, 1, 2, 7)


@pytest.mark.parametrize(
    ("args", "seeds", "needle"),
    [
        (["client.lr=0.1,,0.2"], None, "empty value"),
        (["client.lr=0.1,0.1"], None, "repeated value"),
        (["client.lr=0.1", "client.lr=0.2,0.3"], None, "given twice"),
        (["seed=0,1"], (0,), "set by --seeds"),
        (["lr"], None, "expected key.sub=value"),
    ],
)
def test_parse_sweep_args_refuses_bad_grids(args, seeds, needle):
    with pytest.raises(ScenarioError, match=needle):
        parse_sweep_args("s.yaml", args, seeds)


@pytest.mark.parametrize("text", ["0,x", "1,1", "-1", ""])
def test_parse_seeds_refuses_bad_seeds(text):
    with pytest.raises(ScenarioError, match="--seeds"):
        parse_seeds(text)


# -- validation before anything runs --------------------------------------------------


def test_every_point_is_validated_before_anything_is_created(tmp_path, capsys):
    scenario = write_scenario(tmp_path / "toy.yaml", rounds=1)
    out = tmp_path / "out"
    calls: list[list[str]] = []
    # the bad value is the last point: the good ones must not have run
    assert main(["sweep", str(scenario), "client.lr=0.1,0.05,-1", "--seeds", SEEDS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "toy.yaml: client.lr: must be > 0" in err and "client.lr=-1" in err
    assert not out.exists()
    with pytest.raises(ScenarioError, match="strategy.name"):
        run_sweep(
            parse_sweep_args(scenario, ["strategy.name=fedavg,nosuchstrategy"]),
            runner=lambda argv: calls.append(argv) or 0,
            out=out,
        )
    assert calls == [] and not out.exists()


def test_a_folder_that_is_not_fedsims_is_never_used(tmp_path, capsys):
    scenario = write_scenario(tmp_path / "toy.yaml", rounds=1)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["sweep", str(scenario), "client.lr=0.1,0.05", "--out", str(out), *extra]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One 2 values x 2 seeds sweep of the toy scenario (2 rounds), shared by the tests below."""
    base = tmp_path_factory.mktemp("sweep")
    scenario = write_scenario(base / "toy.yaml", rounds=2, data={"samples_per_client": 24})
    out = base / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSIM_CACHE", str(base / "cache"))
        assert main(["sweep", str(scenario), *GRID, "--seeds", SEEDS, "--out", str(out)]) == 0
    return scenario, out


def _stats(values):
    return float(np.mean(values)), float(np.std(values))


def test_table_is_mean_and_std_over_seeds_of_the_runs_metrics(swept):
    _, out = swept
    doc = json.loads((out / "sweep.json").read_text())
    assert json.loads((out / MARKER).read_text())["kind"] == "sweep"
    assert [p["labels"] for p in doc["points"]] == [{"client.lr": "0.02"}, {"client.lr": "0.1"}]
    assert [p["params"]["client.lr"] for p in doc["points"]] == [0.02, 0.1]  # YAML scalars
    table = (out / "sweep.md").read_text()
    for point in doc["points"]:
        lr = point["labels"]["client.lr"]
        finals, bests, ups = [], [], []
        for seed in (0, 1):
            folder = out / f"client.lr={lr}_seed={seed}"
            records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            finals.append(records[-1]["accuracy"])
            bests.append(max(r["accuracy"] for r in records))
            ups.append(records[-1]["bytes_up_total"] / 1e6)
            saved = (folder / "scenario.yaml").read_text()
            assert f"lr: {lr}" in saved and f"seed: {seed}" in saved
        mean, std = _stats(finals)
        assert point["final_accuracy"] == pytest.approx({"mean": mean, "std": std, "n": 2})
        assert point["best_accuracy"]["mean"] == pytest.approx(np.mean(bests))
        assert point["mb_up"]["mean"] == pytest.approx(np.mean(ups))
        assert f"| {lr} | 2/2 | {mean:.4f} ± {std:.4f} | {np.mean(bests):.4f} ± {np.std(bests):.4f} |" in table
    assert len({p["final_accuracy"]["mean"] for p in doc["points"]}) == 2  # the learning rate changed the runs
    with Image.open(out / "sweep.png") as image:
        assert image.info["Software"].startswith("fedsim ")


def test_a_point_equals_a_separate_fedsim_run(swept, tmp_path):
    scenario, out = swept
    alone = tmp_path / "alone"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "fedsim.cli", "run", str(scenario), "client.lr=0.1", "seed=1", "--out", str(alone)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    def accuracies(folder):
        return [
            (r["round"], r["accuracy"], r["per_domain"])
            for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
        ]

    assert accuracies(out / "client.lr=0.1_seed=1") == accuracies(alone)


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(swept, tmp_path):
    scenario, original = swept
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    before = json.loads((out / "sweep.json").read_text())["points"]
    # an interrupted run: killed after round 1's checkpoint (round 2's checkpoint and the summary never written)
    killed = out / "client.lr=0.02_seed=1"
    (killed / "summary.json").unlink()
    shutil.rmtree(killed / "checkpoints" / "round_00002")
    # a run never started
    shutil.rmtree(out / "client.lr=0.1_seed=0")
    calls: list[list[str]] = []

    def runner(argv):
        calls.append(argv)
        return main(argv)

    spec = parse_sweep_args(scenario, GRID, parse_seeds(SEEDS))
    folder, points = run_sweep(spec, runner=runner, out=out)
    assert folder == out
    assert calls == [
        ["run", "--resume", str(killed)],
        ["run", str(scenario), "client.lr=0.1", "seed=0", "--out", str(out / "client.lr=0.1_seed=0")],
    ]
    # a resumed or re-run point gives the numbers of the uninterrupted sweep
    assert [p["final_accuracy"] for p in points] == pytest.approx([p["final_accuracy"] for p in before])
    calls.clear()
    assert main(["sweep", "--resume", str(out)]) == 0  # everything finished: nothing runs
    _, points = run_sweep(spec, runner=runner, out=out)
    assert calls == []


def test_a_changed_grid_or_scenario_is_refused(swept, tmp_path, capsys):
    scenario, original = swept
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    saved = (out / "sweep.json").read_bytes()
    assert main(["sweep", str(scenario), "client.lr=0.02,0.3", "--seeds", SEEDS, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "grid differs" in err and "client.lr=0.02,0.1" in err
    assert main(["sweep", str(scenario), *GRID, "--seeds", "0,1,2", "--out", str(out)]) == 2
    assert "seeds differ" in capsys.readouterr().err
    changed = write_scenario(tmp_path / "toy.yaml", rounds=3, data={"samples_per_client": 24})
    assert main(["sweep", str(changed), *GRID, "--seeds", SEEDS, "--out", str(out)]) == 2
    assert "scenario of run client.lr=0.02 seed=0 differs" in capsys.readouterr().err
    assert (out / "sweep.json").read_bytes() == saved
    assert not (out / "client.lr=0.3_seed=0").exists()


def test_overwrite_replaces_a_fedsim_sweep(swept, tmp_path):
    scenario, original = swept
    out = tmp_path / "copy"
    shutil.copytree(original, out)
    calls: list[list[str]] = []
    spec = SweepSpec(str(scenario), ("rounds=1",), (Axis("client.lr", ("0.05",)),), None)
    _, points = run_sweep(spec, runner=lambda argv: calls.append(argv) or main(argv), out=out, overwrite=True)
    assert len(calls) == 1 and points[0]["seeds_done"] == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["client.lr=0.05"]


def test_adaptation_columns_are_each_adapters_online_error_over_seeds(tmp_path):
    adaptation = {
        "adapters": ["source", "tbn"],
        "stream": {"corruptions": ["gaussian_noise"], "severities": [3], "batch_size": 16, "samples_per_shift": 24},
        "edges": [0],
    }
    scenario = write_scenario(tmp_path / "toy.yaml", rounds=1, data={"samples_per_client": 24}, adaptation=adaptation)
    out = tmp_path / "out"
    assert main(["sweep", str(scenario), "adaptation.stream.batch_size=8,16", "--seeds", SEEDS, "--out", str(out)]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    table = (out / "sweep.md").read_text()
    assert (
        "| adaptation.stream.batch_size | seeds | final acc | best acc | MB up | MB down | online err source | online err tbn |"
        in table
    )
    for point in doc["points"]:
        size = point["labels"]["adaptation.stream.batch_size"]
        cells = []
        for adapter in ("source", "tbn"):
            errors = [
                json.loads(
                    (out / f"adaptation.stream.batch_size={size}_seed={s}" / "adaptation_summary.json").read_text()
                )["results"][adapter]["error"]
                for s in (0, 1)
            ]
            mean, std = _stats(errors)
            assert point["online_error"][adapter] == pytest.approx({"mean": mean, "std": std, "n": 2})
            cells.append(f"{mean:.4f} ± {std:.4f}")
        row = next(line for line in table.splitlines() if line.startswith(f"| {size} |"))
        assert row.endswith(" | ".join(cells) + " |")
