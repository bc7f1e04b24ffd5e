"""docs/extending.md's claims, run: a new error-feedback method is one file (the EF14 example,
taken verbatim from the docs, runs end to end under its registered name) and a new
compressor is one class (the docs' example is found by name and used by a strategy)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest

from fedsim.arrays import load_arrays
from fedsim.engine.checkpoint import load_latest
from fedsim.engine.runtimes import run_inline
from fedsim.results import RunFolder
from fedsim.scenario import build_scenario, new_run
from fedsim.strategies import STRATEGIES
from fedsim.strategies.compressed.base import split_keys
from fedsim.strategies.compressed.compressors import TopK, index_dtype, make_compressor

DOC = Path(__file__).resolve().parents[2] / "docs" / "extending.md"
N_CLIENTS = 8  # toy: 4 domains x 2 clients


def doc_block(marker: str) -> str:
    """The python code block between ``<!-- MARKER:BEGIN -->`` and ``<!-- MARKER:END -->``."""
    text = DOC.read_text()
    found = re.search(rf"<!-- {marker}:BEGIN -->\s*```python\n(.*?)```\s*<!-- {marker}:END -->", text, re.S)
    assert found, f"docs/extending.md has no {marker} block"
    return found.group(1)


@pytest.fixture(scope="module")
def doc_modules(tmp_path_factory):
    """Both docs examples written to files of their own and imported (registering them)."""
    root = tmp_path_factory.mktemp("docs_examples")
    (root / "doc_ef14.py").write_text(doc_block("EF14-EXAMPLE"))
    (root / "doc_halves.py").write_text(doc_block("COMPRESSOR-EXAMPLE"))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))  # the client hooks are found by import path, as in a real run
        yield importlib.import_module("doc_ef14"), importlib.import_module("doc_halves")


def run(out: Path, strategy: str, args: dict, rounds: int = 3) -> list[dict]:
    raw = {
        "name": "ext",
        "seed": 0,
        "rounds": rounds,
        "data": {"dataset": "toy", "image_size": 16, "clients_per_domain": 2},
        "model": {"name": "cnn-small", "normalization": "bn", "args": {"width": 8}},
        "client": {"lr": 0.05, "batch_size": 16},
        "runtime": {"name": "inline", "num_threads": 1},
        "strategy": {"name": strategy, "args": args},
    }
    sc = build_scenario(raw, "test")
    folder = RunFolder.create(out, sc)
    run_inline(new_run(sc, folder))
    return folder.read_metrics()


def test_ef14_from_the_docs_runs_end_to_end(doc_modules, tmp_path):
    ef14, _ = doc_modules
    assert STRATEGIES.get("ef14") is ef14.EF14

    # identity compressor: e_i stays 0 and the step is the mean update, i.e. the baseline
    # `compressed` (all toy clients hold the same number of samples, so its num-examples
    # weights are uniform too)
    a = run(tmp_path / "ef14-id", "ef14", {"compressor": "identity"}, rounds=2)
    b = run(tmp_path / "plain-id", "compressed", {"compressor": "identity"}, rounds=2)
    xa, xb = (
        load_latest(tmp_path / "ef14-id" / "checkpoints").arrays,
        load_latest(tmp_path / "plain-id" / "checkpoints").arrays,
    )
    for k in xb:
        np.testing.assert_allclose(xa[k].astype(np.float64), xb[k].astype(np.float64), rtol=1e-5, atol=1e-6, err_msg=k)
    assert [r["accuracy"] for r in a] == pytest.approx([r["accuracy"] for r in b], abs=1e-6)

    # Top-K with partial participation: bytes are those of Top-K, and each client's kept
    # error e_i = p_i - C(p_i) is exactly zero where C kept p_i (at least k coordinates)
    out = tmp_path / "ef14-topk"
    recs = run(out, "ef14", {"compressor": "topk:0.05", "fraction_train": 0.5, "seed": 0})
    assert all(np.isfinite(r["accuracy"]) for r in recs)
    arrays = load_latest(out / "checkpoints").arrays
    comp, dense = split_keys(arrays)
    d = sum(arrays[k].size for k in comp)
    k = TopK(0.05).k(d)
    bn = sum(arrays[key].nbytes for key in dense)
    for r in recs:
        n = r["strategy_metrics"]["num_succeeded"]
        assert r["bytes_up"] == n * (k * (4 + index_dtype(d).itemsize) + bn)
    states = sorted((out / "clients").glob("*/ef.r*.safetensors"))
    assert states
    for f in states:
        e = load_arrays(f)["new.e"]
        assert e.shape == (d,) and np.count_nonzero(e == 0) >= k and np.count_nonzero(e) > 0


def test_compressor_from_the_docs(doc_modules, tmp_path):
    _, halves = doc_modules
    c = make_compressor("half")
    assert type(c) is halves.Halves and make_compressor(c.spec()) == c
    x = np.linspace(-1, 1, 11, dtype=np.float32)
    payload = c.encode(x)
    assert c.nbytes(payload) == 2 * x.size
    np.testing.assert_array_equal(c.decode(payload, x.size), x.astype(np.float16).astype(np.float32))
    recs = run(tmp_path / "halves", "ef21", {"compressor": "halves", "init": "zero"}, rounds=1)
    arrays = load_latest(tmp_path / "halves" / "checkpoints").arrays
    comp, dense = split_keys(arrays)
    d, bn = sum(arrays[k].size for k in comp), sum(arrays[k].nbytes for k in dense)
    sm = recs[0]["strategy_metrics"]
    assert sm["model_dim"] == d and sm["num_succeeded"] == N_CLIENTS
    assert recs[0]["bytes_up"] == sm["bytes_up_payload"] == N_CLIENTS * (2 * d + bn)  # float16 values + dense BN
