"""The Python API (``fedsim.run``, ``fedsim.adapt``, ``fedsim.api.sweep``): the README's
example runs as written, the same numbers as the command line, bad input raises the
command's one line, nothing is printed unless asked."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TOY, write_scenario

import fedsim
import fedsim.api
from fedsim.cli import main
from fedsim.engine.checkpoint import load_latest, save_checkpoint
from fedsim.engine.server import RunFailure
from fedsim.results import RunFolder
from fedsim.schema import ScenarioError

ROOT = Path(__file__).resolve().parents[1]
ADAPT = {
    "adapters": ["source", "tbn"],
    "stream": {"corruptions": ["gaussian_noise"], "severities": [3], "batch_size": 16, "samples_per_shift": 32},
    "edges": [0, 1],
}


def untimed(value):
    """A record without its wall-clock times (the only numbers that differ between runs)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "wall" not in k}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def metrics(folder: Path) -> list[dict]:
    return [untimed(json.loads(line)) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The toy scenario (3 rounds) run by ``fedsim run``: (scenario file, run folder)."""
    root = tmp_path_factory.mktemp("cli")
    scenario = write_scenario(root / "toy.yaml")
    assert main(["run", str(scenario), "--out", str(root / "run")]) == 0
    return scenario, root / "run"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README: no python block under 'From Python'"
    return match.group(1)


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    code = readme_example()
    assert "fedsim.run(" in code and len(code.strip().splitlines()) <= 10
    (tmp_path / "scenarios").mkdir()
    shutil.copy(ROOT / "scenarios" / "multidomain.yaml", tmp_path / "scenarios")
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    for _ in range(2):  # a notebook cell run twice: overwrite=True replaces its own run folder
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    printed = re.fullmatch(r"final accuracy (\d\.\d{3}), best (\d\.\d{3}), in runs/notebook\n", done.stdout)
    assert printed, done.stdout
    summary = json.loads((tmp_path / "runs" / "notebook" / "summary.json").read_text())
    assert (
        printed.group(1) == f"{summary['final_accuracy']:.3f}"
        and summary["rounds"] == 2
        and summary["final_round"] == 2
    )
    assert "INFO" not in done.stderr  # Flower's logs held back


def test_run_gives_the_numbers_of_the_command_and_prints_nothing(
    cli_run: tuple[Path, Path], tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    scenario, cli_folder = cli_run
    logging.getLogger("flwr").setLevel(logging.DEBUG)  # a notebook's own setting
    capfd.readouterr()
    result = fedsim.run(scenario, out=tmp_path / "api")
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""
    assert logging.getLogger("flwr").level == logging.DEBUG  # restored after the call
    assert metrics(tmp_path / "api") == metrics(cli_folder)
    assert untimed(result.records) == metrics(cli_folder) and result.path == tmp_path / "api"
    cli_summary = json.loads((cli_folder / "summary.json").read_text())
    assert result.final_accuracy == cli_summary["final_accuracy"] == result.records[-1]["accuracy"]
    assert result.best_accuracy == cli_summary["best_accuracy"] == max(r["accuracy"] for r in result.records)
    assert result.summary == json.loads((tmp_path / "api" / "summary.json").read_text())
    assert result.adaptation is None and (tmp_path / "api" / "accuracy.png").is_file()
    # a mapping with a mapping of overrides is the same scenario
    data = {**TOY, "rounds": 1}
    again = fedsim.run(data, {"rounds": 3}, tmp_path / "from-dict")
    assert untimed(again.records) == metrics(cli_folder)


def test_resume_continues_to_the_numbers_of_an_uninterrupted_run(
    cli_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scenario, cli_folder = cli_run
    out = tmp_path / "run"
    fedsim.run(scenario, ["rounds=2"], out)
    saved = yaml.safe_load((out / "scenario.yaml").read_text())
    (out / "scenario.yaml").write_text(yaml.safe_dump({**saved, "rounds": 3}, sort_keys=False))  # raised to continue
    capsys.readouterr()
    result = fedsim.run(out, resume=True, verbose=True)
    printed = capsys.readouterr().out
    assert "round   3/3  acc=" in printed and "round   1/3" not in printed  # verbose: progress lines of the rounds run
    assert untimed(result.records) == metrics(cli_folder)
    with pytest.raises(ScenarioError, match="resume takes only the run folder"):
        fedsim.run(out, ["rounds=4"], resume=True)


def test_bad_input_raises_the_one_line_of_the_command(
    cli_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    scenario, _ = cli_run
    capsys.readouterr()
    assert main(["run", str(scenario), "client.lr=-1", "--out", str(tmp_path / "cli")]) == 2
    line = capsys.readouterr().err.strip()
    with pytest.raises(ScenarioError) as caught:
        fedsim.run(scenario, ["client.lr=-1"], tmp_path / "api")
    assert f"error: {caught.value}" == line and "\n" not in line and "client.lr" in line
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()
    with pytest.raises(ScenarioError, match=r"^<dict>: client\.lr: "):
        fedsim.run({**TOY, "client": {**TOY["client"], "lr": -1}}, out=tmp_path / "api")
    with pytest.raises(ScenarioError, match=r"^<dict>: rounds: "):
        fedsim.run(TOY, {"rounds": "many"}, tmp_path / "api")
    with pytest.raises(ScenarioError, match="file not found"):
        fedsim.run(tmp_path / "missing.yaml")
    with pytest.raises(ScenarioError, match="overrides: expected a list"):
        fedsim.run(scenario, "rounds=2")
    # an existing run folder is never replaced without overwrite (and then only fedsim's)
    fedsim.run(scenario, ["rounds=1"], tmp_path / "taken")
    with pytest.raises(ScenarioError, match="run folder exists; pass --overwrite"):
        fedsim.run(scenario, ["rounds=1"], tmp_path / "taken")
    assert not list(tmp_path.glob("api*"))


def test_a_failure_while_running_raises_run_failure(tmp_path: Path) -> None:
    out = tmp_path / "div"
    # a sane first round, then a global model that blows up (as tests/test_engine.py does)
    fedsim.run(write_scenario(tmp_path / "toy.yaml"), ["rounds=1"], out)
    ckpt = load_latest(out / "checkpoints")
    ckpt.arrays = {k: v * 1e30 if v.dtype.kind == "f" and "running" not in k else v for k, v in ckpt.arrays.items()}
    save_checkpoint(out / "checkpoints", ckpt)
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 1", "rounds: 3"))
    with pytest.raises(RunFailure, match=r"^round 2: .*diverged.*last good checkpoint: round 1"):
        fedsim.run(out, resume=True)
    assert [r["round"] for r in RunFolder(out).read_metrics()] == [1]
    folder = RunFolder(out)
    folder.lock()  # the failed call released the folder (ScenarioError if still held)
    folder.unlock()


def test_adapt_a_trained_run_as_the_command_does(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    trained = {
        **TOY,
        "name": "toyadapt",
        "rounds": 1,
        "strategy": {"name": "fedbn"},
        "data": {**TOY["data"], "clients_per_domain": 1},
    }
    capfd.readouterr()
    run = fedsim.run({**trained, "adaptation": ADAPT}, out=tmp_path / "run")
    assert capfd.readouterr() == ("", "")
    # the run's own adaptation phase
    assert run.adaptation is not None and set(run.adaptation["results"]) == {"source", "tbn"}
    assert (tmp_path / "run" / "adaptation_summary.json").is_file()
    # fedsim.adapt on the trained run = fedsim adapt on it
    result = fedsim.adapt(
        {"name": "again", "adaptation": ADAPT}, tmp_path / "run", {"adaptation.edges": [1]}, tmp_path / "api"
    )
    assert capfd.readouterr() == ("", "")
    scen = tmp_path / "adapt.yaml"
    scen.write_text(yaml.safe_dump({"name": "again", "adaptation": ADAPT}))
    assert (
        main(
            [
                "adapt",
                str(scen),
                "adaptation.edges=[1]",
                "--model",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    capfd.readouterr()
    cli_rows = [json.loads(line) for line in (tmp_path / "cli" / "adaptation.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in result.records] == [r["correct"] for r in cli_rows] and {
        r["edge"] for r in result.records
    } == {1}
    cli_summary = json.loads((tmp_path / "cli" / "adaptation_summary.json").read_text())
    assert result.online_error == {k: v["error"] for k, v in cli_summary["results"].items()}
    assert result.path == tmp_path / "api"
    # bad input: the command's one line, nothing created
    with pytest.raises(ScenarioError, match="adaptation: required key is missing"):
        fedsim.adapt({"name": "x"}, tmp_path / "run", out=tmp_path / "none")
    with pytest.raises(ScenarioError, match="not a fedsim run folder"):
        fedsim.adapt({"name": "x", "adaptation": ADAPT}, tmp_path, out=tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_sweep_runs_each_point_as_run_does(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    scenario = write_scenario(tmp_path / "toy.yaml", rounds=1)
    capfd.readouterr()
    result = fedsim.api.sweep(scenario, ["client.lr=0.05,0.1"], seeds=[0], out=tmp_path / "sweep")
    assert capfd.readouterr() == ("", "")
    assert result.path == tmp_path / "sweep" and result.failures == {} and len(result.points) == 2
    assert all(r["status"] == "done" for p in result.points for r in p["runs"])
    single = fedsim.run(scenario, ["client.lr=0.1", "seed=0"], tmp_path / "single")
    assert metrics(tmp_path / "sweep" / "client.lr=0.1_seed=0") == untimed(single.records)
    again = fedsim.api.sweep(resume=tmp_path / "sweep")  # everything finished: nothing runs again
    assert again.points == result.points
    with pytest.raises(ScenarioError, match="resume takes only the sweep folder"):
        fedsim.api.sweep(scenario, resume=tmp_path / "sweep")


def test_the_package_exposes_the_api_without_importing_it() -> None:
    assert fedsim.run is fedsim.api.run and fedsim.adapt is fedsim.api.adapt
    assert {"run", "adapt"} <= set(dir(fedsim)) and {"run", "adapt"} <= set(fedsim.__all__)
    with pytest.raises(AttributeError):
        fedsim.nothing  # noqa: B018
    code = "import sys, fedsim; assert callable(fedsim.__getattr__); print(sorted(m for m in ('fedsim.api', 'torch', 'flwr') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr  # `fedsim --version` stays light


def test_flower_info_logs_are_held_back_for_the_call_only() -> None:
    flwr = logging.getLogger("flwr")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)  # where a notebook would see Flower's lines
    flwr.addHandler(handler)
    before = (flwr.level, [h.level for h in flwr.handlers])
    try:
        flwr.setLevel(logging.INFO)
        with fedsim.api._library_logs(verbose=False):
            flwr.info("an INFO line of Flower")
            flwr.warning("a WARNING of Flower")
        assert "an INFO line" not in seen.getvalue() and "a WARNING of Flower" in seen.getvalue()
        assert flwr.level == logging.INFO and handler.level == logging.NOTSET  # restored
        with fedsim.api._library_logs(verbose=True):
            flwr.info("a second INFO line")
        assert "a second INFO line" in seen.getvalue()
    finally:
        flwr.removeHandler(handler)
        flwr.setLevel(before[0])
