"""docs/extending.md's worked examples, run as a reader would: the strategy, adapter and
dataset blocks are written to files of their own next to the scenario block, and the
documented command (``PYTHONPATH=. fedsim run my-scenario.yaml``) runs them through the
``fedsim`` command; then the same files as an installed package declaring the documented
entry points, named by their short names. Also: the rules the docs state (an adapter that
overrides ``predict_and_adapt`` is refused; an entry point that fails to import is bad input)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedsim.adapters.base import Adapter
from fedsim.arrays import numpy_to_record, record_to_numpy
from fedsim.data.config import DataConfig
from fedsim.registry import Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "extending.md"
FILES = {
    "STRATEGY-EXAMPLE": "my_median.py",
    "ADAPTER-EXAMPLE": "my_tta.py",
    "DATASET-EXAMPLE": "my_data.py",
    "SCENARIO-EXAMPLE": "my-scenario.yaml",
}
TIMEOUT_S = 600


def doc_block(marker: str) -> str:
    text = DOC.read_text()
    found = re.search(rf"<!-- {marker}:BEGIN -->\s*```\w+\n(.*?)```\s*<!-- {marker}:END -->", text, re.S)
    assert found, f"docs/extending.md has no {marker} block"
    return found.group(1)


def documented_command() -> list[str]:
    found = re.search(r"```bash\n(PYTHONPATH=\. fedsim run my-scenario\.yaml)", DOC.read_text())
    assert found, "docs/extending.md no longer shows how to run the worked examples"
    return shlex.split(found.group(1), comments=True)


def write_examples(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for marker, name in FILES.items():
        (folder / name).write_text(doc_block(marker))
    return folder


def fedsim(argv: list[str], cwd: Path, pythonpath: list[str]) -> subprocess.CompletedProcess:
    """``argv`` through the installed ``fedsim`` console script (which, unlike ``python -m``,
    does not put the working directory on sys.path), with this checkout importable."""
    exe = shutil.which("fedsim")
    if exe is None:
        pytest.skip("the fedsim console script is not on PATH (pip install -e .)")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([exe, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def check_run(run: Path, adapters: list[str]) -> None:
    """The run used all three examples: stripes' domains, the median's metric, every adapter
    labelled and counted."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert set(records[-1]["per_domain"]) == {"horizontal", "vertical"}
    assert all(r["strategy_metrics"]["num_models"] == 4 for r in records)  # 2 domains x 2 clients
    summary = json.loads((run / "adaptation_summary.json").read_text())
    assert list(summary["adapters"]) == adapters
    assert summary["adapters"][adapters[2]]["settings"] == {"momentum": 0.5}
    lines = [json.loads(line) for line in (run / "adaptation.jsonl").read_text().splitlines()]
    for label in adapters:
        mine = [r for r in lines if r["adapter"] == label]
        assert mine, label
        # the base class counted every batch (an override of predict_and_adapt would leave 0)
        assert max(r["metrics"]["batches"] for r in mine) > 0 and max(r["metrics"]["samples"] for r in mine) >= 16


@pytest.mark.slow  # two fedsim processes, about half a minute each under load
def test_worked_examples_by_import_path(tmp_path: Path) -> None:
    folder = write_examples(tmp_path / "mine")
    env_words = documented_command()
    assert env_words[0] == "PYTHONPATH=." and env_words[1] == "fedsim"
    # without PYTHONPATH=. the fedsim command cannot import the user's modules (as documented)
    bad = fedsim(env_words[2:], folder, [])
    assert bad.returncode == 2 and "my_data" in bad.stderr and not (folder / "runs").exists()
    done = fedsim(env_words[2:], folder, [str(folder)])  # PYTHONPATH=. (cwd is the folder)
    assert done.returncode == 0, done.stderr[-3000:]
    check_run(folder / "runs" / "my-extensions", ["source", "EMABN", "ema_bn_0.5"])


@pytest.mark.slow  # two fedsim processes, about half a minute each under load
def test_worked_examples_by_entry_points(tmp_path: Path) -> None:
    """The documented pyproject entry points, as pip installs them (a dist-info folder with
    entry_points.txt next to the modules, on sys.path), named by their short names from a
    folder that holds none of the modules."""
    site = write_examples(tmp_path / "site")
    (site / "my-scenario.yaml").unlink()
    dist = site / "my_fedsim_plugins-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-fedsim-plugins\nVersion: 0.1\n")
    toml = doc_block("ENTRY-POINTS-EXAMPLE")
    # pyproject's [project.entry-points."group"] tables become entry_points.txt's [group]
    # sections, its quoted strings plain values (what pip writes)
    txt = re.sub(r'^\[project\.entry-points\."([^"]+)"\]', r"[\1]", toml, flags=re.M)
    (dist / "entry_points.txt").write_text(re.sub(r'^(\S+) = "([^"]+)"$', r"\1 = \2", txt, flags=re.M))
    work = tmp_path / "work"
    work.mkdir()
    raw = yaml.safe_load(doc_block("SCENARIO-EXAMPLE"))
    raw["data"]["dataset"] = "stripes"
    raw["strategy"]["name"] = "median"
    raw["adaptation"]["adapters"] = [
        "source",
        "ema_bn",
        {"name": "ema_bn", "label": "ema_bn_0.5", "args": {"momentum": 0.5}},
    ]
    (work / "s.yaml").write_text(yaml.safe_dump(raw))
    listed = fedsim(["list"], work, [str(site)])
    assert listed.returncode == 0 and all(n in listed.stdout for n in ("median", "ema_bn", "stripes")), listed.stdout
    done = fedsim(["run", "s.yaml"], work, [str(site)])
    assert done.returncode == 0, done.stderr[-3000:]
    check_run(work / "runs" / "my-extensions", ["source", "ema_bn", "ema_bn_0.5"])


def test_the_median_strategy_is_the_coordinatewise_median(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_examples(tmp_path / "m")))
    median_mod = __import__("my_median")
    # messages built outside a run need Flower's task identity (a run sets it)
    for attr, value in (("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    rng = np.random.default_rng(0)
    models = [
        {"w": rng.standard_normal((3, 2)).astype(np.float32), "n": np.array([i], dtype=np.int64)} for i in range(5)
    ]
    replies = [
        Message(
            RecordDict({"arrays": numpy_to_record(m), "metrics": MetricRecord({"num-examples": 1})}),
            dst_node_id=0,
            message_type="train",
        )
        for m in models
    ]
    arrays, metrics = median_mod.Median().aggregate_train(1, replies)
    got = record_to_numpy(arrays)
    np.testing.assert_array_equal(got["w"], np.median(np.stack([m["w"] for m in models]), axis=0))
    assert got["n"].dtype == np.int64 and got["n"].tolist() == [2] and metrics["num_models"] == 5
    assert median_mod.Median().aggregate_train(1, []) == (None, None)
    with pytest.raises(TypeError):  # why the docs point to numpy_to_record
        ArrayRecord(models[0])


def test_dataset_example_rejects_an_unknown_domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(write_examples(tmp_path / "d")))
    loader = __import__("my_data").load_stripes
    ds = loader(DataConfig(dataset="my_data:load_stripes", image_size=12))
    assert list(ds.domains) == ["horizontal", "vertical"] and ds.domains["vertical"].x_train.shape == (200, 12, 12, 3)
    h = ds.domains["horizontal"].x_train.astype(float).mean(axis=(3,))
    assert np.allclose(h.std(axis=2), 0, atol=40) and not np.allclose(h.std(axis=1), 0, atol=40)  # rows are constant
    with pytest.raises(Exception, match="data.domains: unknown domain 'diagonal'"):
        loader(DataConfig(dataset="my_data:load_stripes", domains=["diagonal"]))


def test_overriding_predict_and_adapt_is_refused() -> None:
    with pytest.raises(TypeError, match="_predict_and_adapt"):

        class Wrong(Adapter):  # what docs/extending.md used to describe
            def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
                return self.model(x)


def test_a_broken_entry_point_is_one_line_of_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[fedsim.test-registry]\nok = json:dumps\nbroken = no_such_module_xyz:Thing\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry = Registry("thing", entry_points="fedsim.test-registry")
    reg.register("own")(len)
    assert reg.names() == ["broken", "ok", "own"] and "ok" in reg
    assert reg.get("ok") is json.dumps and reg.get("own") is len
    with pytest.raises(
        RegistryError,
        match=r"thing 'broken': entry point 'no_such_module_xyz:Thing' \(group fedsim.test-registry\) failed to load",
    ):
        reg.get("broken")
    with pytest.raises(RegistryError, match="unknown thing 'nope'"):
        reg.get("nope")
