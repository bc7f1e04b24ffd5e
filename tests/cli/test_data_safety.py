"""fedsim deletes or replaces only what it created (issue 14 §1, §6; issue 16 items 2, 6).

Real CLI calls on temporary folders holding a user's files: ``--overwrite``, ``--out``,
scenario names, ``fedsim adapt``, ``fedsim report``, ``fedsim data show``, ``fedsim edge
certs`` and the cleanup after a failed start never remove or write anything that is not
fedsim's own; advice to ``--resume`` is printed only when there is a checkpoint; bad replies
and a full disk end with exit 1, one line, and the finished rounds intact.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import TOY
from flwr.serverapp.strategy import FedAvg

import fedsim.results
from fedsim.cli import main
from fedsim.config import ScenarioError
from fedsim.edge.apps import _open_run
from fedsim.outputs import MARKER
from fedsim.results import RunFolder
from fedsim.scenario import load_scenario

FOREIGN = {"thesis.tex": "\\documentclass{article}", "sub/data.csv": "a,b\n1,2\n"}
ADAPT = {
    "adapters": ["source"],
    "stream": {"corruptions": ["contrast"], "severities": [3], "batch_size": 16, "samples_per_shift": 16},
    "edges": [0],
}


def scenario(path: Path, **updates: object) -> Path:
    data = json.loads(json.dumps(TOY))
    data.update(rounds=1, data={"dataset": "toy", "image_size": 16, "clients_per_domain": 1})
    data.update(updates)
    path.write_text(yaml.safe_dump(data))
    return path


def plant(folder: Path, files: dict[str, str] = FOREIGN) -> dict[str, str]:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return snapshot(folder)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content (what must survive unchanged)."""
    return {str(p.relative_to(folder)): p.read_bytes().hex() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert "Traceback" not in captured.err + captured.out
    assert err.startswith("error: "), err
    return err


# -- --overwrite and --out ------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_fedsim_run(tmp_path, capsys):
    user = tmp_path / "mine"
    before = plant(user)
    assert main(["run", str(scenario(tmp_path / "s.yaml")), "--out", str(user), "--overwrite"]) == 2
    assert "not replaced" in one_line_error(capsys)
    assert snapshot(user) == before


@pytest.mark.parametrize("out", [".", "..", "{cwd}"])
def test_out_cwd_or_a_parent_is_refused(tmp_path, monkeypatch, capsys, out):
    cwd = tmp_path / "work" / "here"
    cwd.mkdir(parents=True)
    before = plant(tmp_path)
    monkeypatch.chdir(cwd)
    path = scenario(tmp_path / "s.yaml")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["run", str(path), "--out", out.format(cwd=cwd), *extra]) == 2
        assert "working directory or one of its parents" in one_line_error(capsys)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["", "../x", "a/b", "..", ".", "a\\b", "x" * 101])
def test_scenario_name_is_one_path_component(tmp_path, monkeypatch, capsys, name):
    """An unsafe name is a one-line bad-input error before anything is written: earlier
    runs in runs/ and the files of the working directory stay."""
    monkeypatch.chdir(tmp_path)
    path = scenario(tmp_path / "s.yaml", name="earlier")
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    plant(tmp_path)
    before = snapshot(tmp_path)
    bad = scenario(tmp_path / "bad.yaml", name=name)
    before["bad.yaml"] = snapshot(tmp_path)["bad.yaml"]
    assert main(["run", str(bad), "--overwrite"]) == 2
    assert one_line_error(capsys).startswith(f"error: {bad}: name: ")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["earlier"]


def test_overwrite_replaces_a_fedsim_run_but_not_one_with_foreign_files(tmp_path, capsys):
    path, out = scenario(tmp_path / "s.yaml"), tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "run"
    (out / "metrics.jsonl").write_text("")  # replaced: the rerun writes it anew
    assert main(["run", str(path), "--out", str(out), "--overwrite"]) == 0
    assert len(RunFolder(out).read_metrics()) == 1
    capsys.readouterr()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(["run", str(path), "--out", str(out), "--overwrite"]) == 2
    assert "notes.txt" in one_line_error(capsys)
    assert snapshot(out) == before


def test_legacy_run_folder_without_marker(tmp_path, capsys):
    """A run folder from before the marker is recognised by its files alone; a folder that
    only holds a scenario.yaml (a user's own) is not."""
    path, out = scenario(tmp_path / "s.yaml"), tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 0
    (out / MARKER).unlink()
    assert main(["run", str(path), "--out", str(out), "--overwrite"]) == 0
    assert (out / MARKER).is_file()
    capsys.readouterr()
    user = tmp_path / "mine"
    before = plant(user, {"scenario.yaml": "name: mine\n"})
    assert main(["run", str(path), "--out", str(user), "--overwrite"]) == 2
    assert "no .fedsim marker" in one_line_error(capsys)
    assert snapshot(user) == before


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep")
    assert main(["run", str(scenario(tmp_path / "s.yaml")), "--out", str(target), "--overwrite"]) == 2
    assert "not a folder" in one_line_error(capsys)
    assert target.read_text() == "keep"


# -- fedsim adapt -----------------------------------------------------------------------------


def test_adapt_overwrite_refuses_a_foreign_folder_and_replaces_its_own(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["run", str(scenario(tmp_path / "s.yaml", strategy={"name": "fedbn"})), "--out", str(model)]) == 0
    adapt = scenario(tmp_path / "a.yaml", name="ad", adaptation=ADAPT)
    user = tmp_path / "mine"
    before = plant(user)
    capsys.readouterr()
    assert main(["adapt", str(adapt), "--model", str(model), "--out", str(user), "--overwrite"]) == 2
    assert "not replaced" in one_line_error(capsys)
    assert snapshot(user) == before
    # the model run itself is not an adaptation folder
    run_before = snapshot(model)
    assert main(["adapt", str(adapt), "--model", str(model), "--out", str(model), "--overwrite"]) == 2
    assert "fedsim run folder, not an adaptation folder" in one_line_error(capsys)
    assert snapshot(model) == run_before
    # its own output folder is replaced
    assert main(["adapt", str(adapt), "--model", str(model)]) == 0
    assert main(["adapt", str(adapt), "--model", str(model), "--overwrite"]) == 0
    assert json.loads((model / "adapt-ad" / MARKER).read_text())["kind"] == "adaptation"
    # and a run folder holding it can still be replaced as a whole
    assert main(["run", str(tmp_path / "s.yaml"), "--out", str(model), "--overwrite"]) == 0
    assert not (model / "adapt-ad").exists()


# -- fedsim report / data show ------------------------------------------------------------------


def test_report_never_overwrites_files_it_did_not_write(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["run", str(scenario(tmp_path / "s.yaml")), "--out", str(runs / "a")]) == 0
    before = plant(runs, {"report.png": "my picture", "report.md": "# my notes\n"})
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(["report", str(runs / "a"), *extra]) == 2
        one_line_error(capsys)
        assert (
            snapshot(runs)["report.png"] == before["report.png"] and snapshot(runs)["report.md"] == before["report.md"]
        )
    assert main(["report", str(runs / "a"), "--out", str(runs / "a" / "summary.json")]) == 2
    assert ".png" in one_line_error(capsys)
    out = tmp_path / "cmp" / "r.png"
    out.parent.mkdir()
    assert main(["report", str(runs / "a"), "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".md").is_file()
    capsys.readouterr()
    assert main(["report", str(runs / "a"), "--out", str(out)]) == 2  # exists: needs --overwrite
    assert "--overwrite" in one_line_error(capsys)
    assert main(["report", str(runs / "a"), "--out", str(out), "--overwrite"]) == 0  # its own report


def test_data_show_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    target = tmp_path / "grid.png"
    target.write_text("not a fedsim grid")
    for extra in ([], ["--overwrite"]):
        assert main(["data", "show", str(scenario(tmp_path / "s.yaml")), "--out", str(target), *extra]) == 2
        one_line_error(capsys)
        assert target.read_text() == "not a fedsim grid"
    target.unlink()
    assert main(["data", "show", str(tmp_path / "s.yaml"), "--out", str(target)]) == 0
    assert main(["data", "show", str(tmp_path / "s.yaml"), "--out", str(target), "--overwrite"]) == 0


# -- fedsim edge certs ------------------------------------------------------------------------------


def test_edge_certs_overwrite_replaces_only_its_own_certificates(tmp_path, capsys):
    pytest.importorskip("cryptography")
    user = tmp_path / "mine"
    before = plant(user, {**FOREIGN, "ca.crt": "my CA"})
    for extra in ([], ["--overwrite"]):
        assert main(["edge", "certs", str(user), *extra]) == 2
        one_line_error(capsys)
        assert snapshot(user) == before
    certs = tmp_path / "certs"
    assert main(["edge", "certs", str(certs)]) == 0
    first = (certs / "ca.crt").read_bytes()
    assert main(["edge", "certs", str(certs), "--overwrite"]) == 0
    assert (certs / "ca.crt").read_bytes() != first
    (certs / MARKER).unlink()  # from before the marker: recognised by fedsim's CA name
    assert main(["edge", "certs", str(certs), "--overwrite"]) == 0
    capsys.readouterr()
    (certs / "notes.txt").write_text("mine")
    assert main(["edge", "certs", str(certs), "--overwrite"]) == 2
    assert "notes.txt" in one_line_error(capsys)


# -- failures: true advice, no crash on bad replies or a full disk ------------------------------------


class FailsInRound(FedAvg):
    """FedAvg that raises in ``fail_round``'s aggregation (a buggy strategy)."""

    def __init__(self, fail_round: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.fail_round = fail_round

    def aggregate_train(self, server_round, replies):
        if server_round == self.fail_round:
            raise RuntimeError("boom")
        return super().aggregate_train(server_round, replies)


def test_failure_before_a_checkpoint_removes_the_folder_and_advises_no_resume(tmp_path, capsys):
    out = tmp_path / "run"
    path = scenario(tmp_path / "s.yaml", strategy={"name": "test_data_safety:FailsInRound"})
    assert main(["run", str(path), "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert "RuntimeError: boom" in err and "--resume" not in err and "removed" in err
    assert not out.exists()
    # an empty folder the user made is kept
    out.mkdir()
    assert main(["run", str(path), "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert "--resume" not in err and out.is_dir()


def test_failure_after_a_checkpoint_keeps_the_folder_and_advises_resume(tmp_path, capsys):
    out = tmp_path / "run"
    path = scenario(
        tmp_path / "s.yaml", rounds=2, strategy={"name": "test_data_safety:FailsInRound", "args": {"fail_round": 2}}
    )
    assert main(["run", str(path), "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert err.endswith(f"continue with: fedsim run --resume {out})")
    assert RunFolder(out).resumable() and len(RunFolder(out).read_metrics()) == 1


def test_every_reply_dropped_ends_with_one_line_and_rounds_kept(tmp_path, capsys):
    """Every reply badly shaped: round 1 records no accuracy (printed as '-'), round 2 stops."""
    out = tmp_path / "run"
    path = scenario(tmp_path / "s.yaml", rounds=2, faults={"bad_shape_prob": 1.0, "min_success_fraction": 0.01})
    assert main(["run", str(path), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "acc=-" in captured.out and "Traceback" not in captured.out + captured.err
    assert captured.err.strip().count("\n") == 0 and "round 2: only 0 of" in captured.err
    records = RunFolder(out).read_metrics()
    assert [r["round"] for r in records] == [1] and records[0]["accuracy"] is None


def test_full_disk_while_writing_the_summary(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    path = scenario(tmp_path / "s.yaml", rounds=2)
    real = fedsim.results.atomic_write_bytes

    def disk_full_for_summary(target: Path, data: bytes) -> None:
        if Path(target).name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        real(target, data)

    monkeypatch.setattr(fedsim.results, "atomic_write_bytes", disk_full_for_summary)
    assert main(["run", str(path), "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert "No space left on device" in err and f"--resume {out}" in err
    assert [r["round"] for r in RunFolder(out).read_metrics()] == [1, 2]
    assert RunFolder(out).resumable() and not (out / "summary.json").exists()


# -- edge: a re-submitted run never silently reuses its folder -----------------------------------------


def test_edge_resubmission_is_refused_unless_resumed_with_the_same_scenario(tmp_path):
    path = scenario(tmp_path / "s.yaml", name="edge1")
    out = (tmp_path / "run").resolve()
    run, _, resume = _open_run({"scenario": str(path), "run-dir": str(out)})
    assert run.path == out and not resume
    with pytest.raises(ScenarioError, match="resume=true"):
        _open_run({"scenario": str(path), "run-dir": str(out)})
    other = scenario(tmp_path / "o.yaml", name="edge1", seed=7)
    with pytest.raises(ScenarioError, match="different scenario"):
        _open_run({"scenario": str(other), "run-dir": str(out), "resume": True})
    run, sc, resume = _open_run({"scenario": str(path), "run-dir": str(out), "resume": True})
    assert sc == load_scenario(path) and not resume  # nothing trained yet: starts from round 1
