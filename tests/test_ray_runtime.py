"""The ray runtime (Flower's simulation engine on Ray) agrees with the inline runtime."""

from __future__ import annotations

import json

import pytest

from fedsim.cli import main

pytestmark = pytest.mark.ray


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("strategy", [
    ["strategy.name=fedbn", "strategy.args={fraction_train: 0.5}"],
    ["strategy.name=ef21", "strategy.args={fraction_train: 0.5, compressor: 'randk:0.1', init: zero}"],
    # FedWon: no normalization layers, AGC in the clients' steps
    ["strategy.name=fedwon", "model.normalization=none", "strategy.args={agc_lambda: 1.0, fraction_train: 0.5}"],
    # FedTiny: candidate selection through forward-only evaluate tasks, masks, pruning/growing
    ["strategy.name=fedtiny", "strategy.args={density: 0.3, num_candidates: 2, delta_t: 1, t_end: 3, fraction_train: 0.5}"],
], ids=["fedbn", "ef21-randk", "fedwon", "fedtiny"])
def test_ray_and_inline_agree(toy_yaml, tmp_path, strategy):
    common = [*strategy, "runtime.num_threads=1"]
    assert main(["run", str(toy_yaml), *common, "--out", str(tmp_path / "inline")]) == 0
    assert main(["run", str(toy_yaml), *common, "runtime=ray", "--out", str(tmp_path / "ray")]) == 0
    a, b = metrics(tmp_path / "inline"), metrics(tmp_path / "ray")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra["bytes_up"] == rb["bytes_up"] and ra["bytes_down"] == rb["bytes_down"]
        assert ra["per_client"].keys() == rb["per_client"].keys()
        assert ra["accuracy"] == pytest.approx(rb["accuracy"], abs=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4)
        for d in ra["per_domain"]:
            assert ra["per_domain"][d] == pytest.approx(rb["per_domain"][d], abs=1e-6)
        # the strategy's own decisions too (FedTiny's candidate losses and mask changes,
        # densities, EF21 counters); wall times differ by nature
        sa, sb = ra["strategy_metrics"], rb["strategy_metrics"]
        assert sa.keys() == sb.keys()
        for k in sa:
            if not k.endswith("_s"):
                assert sa[k] == pytest.approx(sb[k], rel=1e-4, abs=1e-6), k
