"""Bad input that a scenario file alone cannot carry: the file itself (FIFO, device,
folder, binary, unreadable, odd names), ``--out``, and overrides. Each ends in bounded
time with exit code 2, one line naming the file or option and the key, nothing created.
Those that used to hang run in a subprocess under a timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_scenario

from fedsim.cli import main
from fedsim.schema import MAX_MESSAGE

ROOT = Path(__file__).resolve().parents[2]
BOMB = (
    "["
    + ", ".join(
        ["&a [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
        + [f"&{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    )
    + "]"
)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "fedsim.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def one_line(err: str) -> str:
    err = err.strip()
    assert err.count("\n") == 0, err
    assert "Traceback" not in err
    assert len(err) <= MAX_MESSAGE + 20, len(err)
    return err


def bad(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out
    return one_line(captured.err)


# -- the scenario file ----------------------------------------------------------------


def test_fifo_scenario_is_refused_not_read(tmp_path):
    fifo = tmp_path / "scenario.yaml"
    os.mkfifo(fifo)
    out = tmp_path / "run"
    result = run_cli("run", str(fifo), "--out", str(out), timeout=60)  # it used to block forever
    assert result.returncode == 2
    assert (
        one_line(result.stderr)
        == f"error: {fifo}: not a regular file (a FIFO, socket or device); expected a scenario YAML file"
    )
    assert not out.exists()


def test_fifo_adapt_scenario_is_refused(tmp_path):
    fifo = tmp_path / "adapt.yaml"
    os.mkfifo(fifo)
    result = run_cli("adapt", str(fifo), "--model", str(tmp_path / "nowhere"), timeout=60)
    assert result.returncode == 2
    assert f"{fifo}: not a regular file" in one_line(result.stderr)


def test_device_file_as_scenario(tmp_path, capsys):
    err = bad(["run", "/dev/null", "--out", str(tmp_path / "run")], capsys)
    assert err.startswith("error: /dev/null: not a regular file")
    assert not (tmp_path / "run").exists()


def test_folder_as_scenario(tmp_path, capsys):
    assert "is a folder, expected a scenario YAML file" in bad(
        ["run", str(tmp_path), "--out", str(tmp_path / "run")], capsys
    )


def test_binary_scenario(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage\x80")
    assert bad(["run", str(path), "--out", str(tmp_path / "run")], capsys) == f"error: {path}: not a UTF-8 text file"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_scenario(tmp_path, toy_yaml, capsys):
    toy_yaml.chmod(0)
    assert (
        bad(["run", str(toy_yaml), "--out", str(tmp_path / "run")], capsys)
        == f"error: {toy_yaml}: cannot read: Permission denied"
    )


def test_nul_in_file_name(tmp_path, capsys):
    err = bad(["run", str(tmp_path / "a\0b.yaml"), "--out", str(tmp_path / "run")], capsys)
    assert err.endswith("a file name must not contain a NUL byte")
    assert "\0" not in err


def test_file_name_too_long(tmp_path, capsys):
    err = bad(["run", str(tmp_path / ("x" * 5000 + ".yaml")), "--out", str(tmp_path / "run")], capsys)
    assert "..." in err and err.endswith("cannot read: File name too long")
    assert not (tmp_path / "run").exists()


def test_oversized_scenario(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("# " + "x" * 1_100_000 + "\nrounds: 2\n")
    assert (
        bad(["run", str(path), "--out", str(tmp_path / "run")], capsys)
        == f"error: {path}: larger than 1 MB; a scenario is a small text file"
    )


# -- --out --------------------------------------------------------------------------------


def test_out_is_a_file(tmp_path, toy_yaml, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    assert (
        bad(["run", str(toy_yaml), "--out", str(target)], capsys) == f"error: --out {target}: is a file, not a folder"
    )
    assert target.read_text() == "keep me"


def test_out_dev_null(toy_yaml, capsys):
    assert (
        bad(["run", str(toy_yaml), "--out", "/dev/null"], capsys) == "error: --out /dev/null: is a file, not a folder"
    )


def test_out_under_a_file(tmp_path, toy_yaml, capsys):
    (tmp_path / "f").write_text("x")
    err = bad(["run", str(toy_yaml), "--out", str(tmp_path / "f" / "sub" / "run")], capsys)
    assert (
        err
        == f"error: --out {tmp_path / 'f' / 'sub' / 'run'}: {tmp_path / 'f'} is a file, so no folder can be made under it"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_read_only(tmp_path, toy_yaml, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    assert (
        bad(["run", str(toy_yaml), "--out", str(ro / "run")], capsys)
        == f"error: --out {ro / 'run'}: {ro} is not writable"
    )
    assert not (ro / "run").exists()


def test_edge_demo_out_is_a_file(tmp_path, toy_yaml, capsys):
    target = tmp_path / "f"
    target.write_text("x")
    assert (
        bad(["edge", "demo", str(toy_yaml), "--out", str(target)], capsys)
        == f"error: --out {target}: is a file, not a folder"
    )


# -- overrides ----------------------------------------------------------------------------


def test_alias_bomb_override_ends_quickly_with_a_short_message(tmp_path, toy_yaml):
    out = tmp_path / "run"
    result = run_cli("run", str(toy_yaml), f"model.args.extra={BOMB}", "--out", str(out), timeout=60)
    assert result.returncode == 2
    err = one_line(result.stderr)
    assert (
        err.startswith("error: override 'model.args.extra=[&a")
        and "the document expands to more than 100000 values" in err
    )
    assert not out.exists()


def test_huge_override_value_gives_a_short_message(tmp_path, toy_yaml, capsys):
    big = "[" + ", ".join(str(i) for i in range(1000)) + "]"
    err = bad(["run", str(toy_yaml), f"client.lr={big}", "--out", str(tmp_path / "run")], capsys)
    assert err.startswith(f"error: {toy_yaml}: client.lr: Input should be a valid number (got [0, 1, 2, 3, 4, 5, ...])")


def test_override_duplicate_key(tmp_path, toy_yaml, capsys):
    err = bad(["run", str(toy_yaml), "model.args={width: 8, width: 16}", "--out", str(tmp_path / "run")], capsys)
    assert (
        err
        == "error: override 'model.args={width: 8, width: 16}': line 1: duplicate key 'width' (first given on line 1)"
    )


def test_override_did_you_mean(tmp_path, toy_yaml, capsys):
    err = bad(["run", str(toy_yaml), "round=3", "--out", str(tmp_path / "run")], capsys)
    assert err == f"error: {toy_yaml}: round: unknown key (did you mean 'rounds'?)"


def test_override_bool_for_int(tmp_path, toy_yaml, capsys):
    err = bad(["run", str(toy_yaml), "client.local_epochs=true", "--out", str(tmp_path / "run")], capsys)
    assert err == f"error: {toy_yaml}: client.local_epochs: a boolean is not allowed here (got True)"


# -- devices ------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("section", ["device", "adaptation"])
def test_cuda_without_cuda(tmp_path, section, capsys):
    if section == "device":
        path, key = write_scenario(tmp_path / "s.yaml", device="cuda"), "device"
    else:
        adaptation = {"adapter": "tent", "device": "cuda", "stream": {"corruptions": ["gaussian_noise"]}}
        path, key = write_scenario(tmp_path / "s.yaml", adaptation=adaptation), "adaptation.device"
    err = bad(["run", str(path), "--out", str(tmp_path / "run")], capsys)
    assert err == f"error: {path}: {key}: cuda, but CUDA is not available on this machine (use cpu or auto)"
    assert not (tmp_path / "run").exists()


def test_valid_scenario_still_loads(toy_yaml):
    """The checks reject bad input only: the toy scenario (with an alias and a merge key,
    which stay allowed) loads."""
    from fedsim.scenario import load_scenario

    text = toy_yaml.read_text() + "evaluation: &ev {every: 1}\n"
    toy_yaml.write_text(text)
    scenario = load_scenario(toy_yaml, ["client.lr=1e-3", "seed=18446744073709551615"])
    assert scenario.client.lr == 1e-3 and scenario.seed == 2**64 - 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_adapt_cuda_without_cuda(tmp_path, capsys):
    adaptation = {"adapter": "tent", "device": "cuda", "stream": {"corruptions": ["gaussian_noise"]}}
    path = write_scenario(tmp_path / "a.yaml", adaptation=adaptation)
    err = bad(["adapt", str(path), "--model", str(tmp_path / "nowhere")], capsys)
    assert err == f"error: {path}: adaptation.device: cuda, but CUDA is not available on this machine (use cpu or auto)"
