"""Two runs with the same seed give identical metrics.jsonl (timings aside), for every
registered strategy."""

from __future__ import annotations

import json

import pytest

from fedsim.cli import main
from fedsim.strategies import STRATEGIES

# Settings a strategy needs on the toy scenario (everything else: its defaults).
NEEDS = {
    "fedwon": ["model.normalization=none"],
    "fedtiny": ["strategy.args={density: 0.3}"],
    "magprune": ["strategy.args={density: 0.3}"],
}


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "wall" not in k}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_same_seed_identical_metrics(name, toy_yaml, tmp_path):
    args = ["rounds=2", f"strategy.name={name}", "strategy.args={fraction_train: 0.5}", *NEEDS.get(name, [])]
    runs = []
    for tag in ("a", "b"):
        assert main(["run", str(toy_yaml), *args, "--out", str(tmp_path / tag)]) == 0
        runs.append([untimed(json.loads(x)) for x in (tmp_path / tag / "metrics.jsonl").read_text().splitlines()])
    assert runs[0] == runs[1]
    assert len(runs[0]) == 2
