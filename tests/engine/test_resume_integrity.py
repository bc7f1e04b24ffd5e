"""Resume integrity and safety, through the real CLI on the toy dataset.

A checkpoint is data: a module it names is never imported. A run folder has one writer at a
time (an OS lock). A resume refuses a scenario.yaml that differs from the checkpoint's, skips
a damaged checkpoint for the previous intact one (or names the damaged file), and reports a
metrics.jsonl line that is not a record; what it does resume equals the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import checkout_env, fedsim_process, write_scenario

from fedsim.arrays import load_arrays, save_arrays
from fedsim.cli import main
from fedsim.engine.checkpoint import MANIFEST, load_strategy_state
from fedsim.strategies.fedbn import FedBN


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def strip_timing(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("wall_s", "strategy_metrics")} for r in recs]


def rounds(out: Path) -> list[int]:
    return [r["round"] for r in records(out)]


def train(tmp_path: Path, name: str, *overrides: str, **sections) -> Path:
    scenario = write_scenario(tmp_path / f"{name}.yaml", **sections)
    out = tmp_path / name
    assert main(["run", str(scenario), *overrides, "--out", str(out)]) == 0
    return out


def reseal(folder: Path) -> None:
    """Recompute a checkpoint's manifest after editing its files, as an attacker could:
    checksums detect damage, not tampering, so the loader itself must treat contents as data."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
        if name.endswith(".safetensors"):
            entry["arrays"] = {
                k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                for k, v in sorted(load_arrays(folder / name).items())
            }
    (folder / MANIFEST).write_text(json.dumps(manifest))


def edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    edit(meta)
    (folder / "meta.json").write_text(json.dumps(meta))


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


# -- security: checkpoint contents are data --------------------------------------------------------


def test_module_named_by_a_checkpoint_is_never_imported(tmp_path, monkeypatch, capsys):
    # a real module on sys.path that leaves a marker file when imported
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    marker = tmp_path / "IMPORTED"
    (plugins / "evil_hooks.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\nfrom fedsim.engine.hooks import ClientHooks as Hooks\n"
    )
    monkeypatch.syspath_prepend(str(plugins))

    out = train(tmp_path, "sec", "rounds=3", "strategy.name=fedbn")
    reference = strip_timing(records(out))
    # the newest checkpoint names the module as the strategy's client hooks, resealed
    newest = out / "checkpoints" / "round_00003"
    edit_meta(newest, lambda m: m["strategy"].update({"client_hooks": "evil_hooks:Hooks"}))
    reseal(newest)
    capsys.readouterr()

    assert main(["run", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped damaged checkpoint" in err and "client_hooks" in err and "round_00003" in err
    assert not marker.exists()
    assert strip_timing(records(out)) == reference  # resumed from round 2, re-ran round 3

    # with no other checkpoint left, the resume is refused in one line and nothing changes
    edit_meta(out / "checkpoints" / "round_00003", lambda m: m["strategy"].update({"client_hooks": "evil_hooks:Hooks"}))
    reseal(out / "checkpoints" / "round_00003")
    shutil.rmtree(out / "checkpoints" / "round_00002")
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(out)]) == 2
    line = one_line_error(capsys)
    assert "no intact checkpoint" in line and "client_hooks" in line
    assert not marker.exists() and (out / "metrics.jsonl").read_bytes() == before


def test_generic_strategy_state_restores_only_instance_attributes():
    strategy = FedBN()
    for scalars in (
        {"client_hooks": "evil_hooks:Hooks"},
        {"__kind__.configure_train": "dict"},
        {"__kind__.__class__": "dict"},
        {"__kind__.m_t": "pickle"},
    ):
        with pytest.raises(ValueError, match="strategy state"):
            load_strategy_state(strategy, {}, scalars)
    assert FedBN.client_hooks == strategy.client_hooks == "fedsim.strategies.fedbn:FedBNClient"
    load_strategy_state(strategy, {}, {"fraction_train": 0.5, "never_an_attribute": 3})
    assert strategy.fraction_train == 0.5 and not hasattr(strategy, "never_an_attribute")


# -- scenario edited after the run started -----------------------------------------------------------


@pytest.mark.parametrize(
    "old,new,named",
    [
        ("clients_per_domain: 2", "clients_per_domain: 4", "data.clients_per_domain: 2 -> 4"),
        ("width: 8", "width: 16", "model.args.width: 8 -> 16"),
        ("name: fedavg", "name: fedbn", 'strategy.name: "fedavg" -> "fedbn"'),
    ],
)
def test_resume_refuses_an_edited_scenario(tmp_path, capsys, old, new, named):
    out = train(tmp_path, "edit", "rounds=2")
    scenario = out / "scenario.yaml"
    assert old in scenario.read_text()
    scenario.write_text(scenario.read_text().replace(old, new).replace("rounds: 2", "rounds: 3"))
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    line = one_line_error(capsys)
    assert "scenario.yaml" in line and named in line and "resume refused" in line
    assert (out / "metrics.jsonl").read_bytes() == before


def test_resume_may_extend_rounds(tmp_path):
    full = train(tmp_path, "full", "rounds=3")
    out = train(tmp_path, "ext", "rounds=2")
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 2", "rounds: 3"))
    assert main(["run", "--resume", str(out)]) == 0
    # round 2 was the last round (always evaluated) the first time; every round is here
    assert strip_timing(records(out)) == strip_timing(records(full))


# -- damaged checkpoints and metrics -------------------------------------------------------------------


def drop_tensor(folder: Path) -> str:
    arrays = load_arrays(folder / "global.safetensors")
    name = sorted(arrays)[0]
    del arrays[name]
    save_arrays(folder / "global.safetensors", arrays)
    return name


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    out = train(tmp_path, "dmg", "rounds=3")
    reference = strip_timing(records(out))
    drop_tensor(out / "checkpoints" / "round_00003")
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "round_00003/global.safetensors" in err and "skipped damaged checkpoint" in err
    assert strip_timing(records(out)) == reference


def test_no_intact_checkpoint_names_the_damaged_file(tmp_path, capsys):
    out = train(tmp_path, "dmg2", "rounds=3")
    drop_tensor(out / "checkpoints" / "round_00003")
    reseal(out / "checkpoints" / "round_00003")  # consistent manifest: the model check catches it
    edit_meta(out / "checkpoints" / "round_00002", lambda m: m.pop("totals"))
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    line = one_line_error(capsys)
    assert "round_00003/global.safetensors" in line and "resume refused" in line
    assert (out / "metrics.jsonl").read_bytes() == before

    shutil.rmtree(out / "checkpoints" / "round_00003")
    assert main(["run", "--resume", str(out)]) == 2
    line = one_line_error(capsys)
    assert "no intact checkpoint" in line and "round_00002/meta.json" in line

    reseal(out / "checkpoints" / "round_00002")  # meta without totals, manifest agreeing
    assert main(["run", "--resume", str(out)]) == 2
    line = one_line_error(capsys)
    assert "round_00002/meta.json" in line and "'totals'" in line


@pytest.mark.parametrize("bad", ['{"foo": 1}', "42", '{"round": "2"}', "not json"])
def test_metrics_line_that_is_not_a_record_is_reported(tmp_path, capsys, bad):
    out = train(tmp_path, "met", "rounds=2")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], bad, lines[1]]) + "\n")
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    line = one_line_error(capsys)
    assert "metrics.jsonl: line 2:" in line


# -- one writer per run folder ---------------------------------------------------------------------------


def fedsim(*args: str) -> subprocess.Popen:
    return fedsim_process(*args, env={"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another real process holding the folder's lock through fedsim's own helper."""
    code = f"import sys, time; from pathlib import Path; from fedsim.runlock import lock_folder; lock_folder(Path({str(folder)!r})); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=checkout_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_folder_being_written_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    scenario = write_scenario(tmp_path / "lk.yaml", rounds=1)
    out = tmp_path / "lk"
    assert main(["run", str(scenario), "--out", str(out)]) == 0
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 1", "rounds: 2"))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    holder = hold_lock(out)
    try:
        for args in (["run", "--resume", str(out)], ["run", str(scenario), "--out", str(out), "--overwrite"]):
            proc = fedsim(*args)
            assert proc.wait(timeout=120) == 2
            err = proc.stderr.read().strip().splitlines()
            assert len(err) == 1 and f"being written by another fedsim process (pid {holder.pid})" in err[0]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == files
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the kernel drops the lock
        holder.wait()
    assert main(["run", "--resume", str(out)]) == 0
    assert rounds(out) == [1, 2]


def test_two_concurrent_resumes_never_duplicate_rounds(tmp_path):
    # slow rounds (every client straggles) so the two resumes overlap
    scenario = write_scenario(
        tmp_path / "cc.yaml",
        rounds=1,
        data={"clients_per_domain": 1},
        faults={"straggler_prob": 1.0, "straggler_delay_s": 0.5},
    )
    out = tmp_path / "cc"
    assert main(["run", str(scenario), "--out", str(out)]) == 0
    (out / "scenario.yaml").write_text((out / "scenario.yaml").read_text().replace("rounds: 1", "rounds: 4"))
    first, second = fedsim("run", "--resume", str(out)), fedsim("run", "--resume", str(out))
    codes = sorted([first.wait(timeout=600), second.wait(timeout=600)])
    # one writes, the other is refused (or, if it started after the first had finished, finds
    # nothing left to do); either way every round is in metrics.jsonl exactly once
    assert codes in ([0, 2], [0, 0])
    assert rounds(out) == [1, 2, 3, 4]
    if codes == [0, 2]:
        refused = first if first.returncode == 2 else second
        assert "being written by another fedsim process" in refused.stderr.read()
