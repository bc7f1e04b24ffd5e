"""Scenario schema: every error is one line naming the file and the dotted key."""

from __future__ import annotations

import pytest
from conftest import write_scenario

from fedsim.config import ScenarioError
from fedsim.data.loading import num_clients
from fedsim.scenario import load_scenario
from fedsim.scenario_file import apply_overrides


def error_of(path, overrides=None) -> str:
    with pytest.raises(ScenarioError) as exc:
        load_scenario(path, overrides or [])
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_valid_toy_scenario_loads(toy_yaml):
    sc = load_scenario(toy_yaml)
    assert num_clients(sc.data) == 8 and sc.strategy.name == "fedavg"


def test_unknown_key_names_dotted_path(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", client={"lr": 0.1, "lrate": 0.2})
    assert error_of(p) == f"{p}: client.lrate: unknown key"


def test_wrong_type(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", rounds="many")
    msg = error_of(p)
    assert msg.startswith(f"{p}: rounds: ") and "integer" in msg


def test_out_of_range(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", data={"clients_per_domain": 0})
    assert error_of(p) == f"{p}: data.clients_per_domain: must be >= 1 (got 0)"


def test_strategy_fraction_outside_unit_interval(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", strategy={"name": "fedavg", "args": {"fraction_train": 1.5}})
    assert error_of(p) == f"{p}: strategy.args.fraction_train: must be in (0, 1] (got 1.5)"


def test_unknown_strategy_argument(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", strategy={"name": "fedavg", "args": {"fraction_trian": 0.5}})
    assert "strategy.args.fraction_trian: unknown argument" in error_of(p)


def test_unknown_names(tmp_path):
    for section, value, key in [
        ("strategy", {"name": "fedfoo"}, "strategy.name"),
        ("model", {"name": "vgg99"}, "model.name"),
        ("data", {"dataset": "imagenet-77"}, "data.dataset"),
    ]:
        p = write_scenario(tmp_path / "x.yaml", **{section: value})
        assert f": {key}: unknown" in error_of(p)


def test_import_path_that_is_not_a_strategy(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", strategy={"name": "collections:OrderedDict"})
    assert "strategy.name: 'collections:OrderedDict' is not a subclass" in error_of(p)
    p = write_scenario(tmp_path / "x.yaml", strategy={"name": "no_such_pkg.mod:Cls"})
    assert "strategy.name: cannot import module 'no_such_pkg.mod'" in error_of(p)


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nrounds: [1, 2\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}: line ") and "YAML syntax error" in msg


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: file not found"


def test_overrides_are_validated_like_the_file(toy_yaml):
    assert load_scenario(toy_yaml, ["strategy.name=fedbn", "rounds=7", "runtime=ray"]).rounds == 7
    assert "client.batch_size: must be >= 1" in error_of(toy_yaml, ["client.batch_size=0"])
    assert "runtime.name: must be one of" in error_of(toy_yaml, ["runtime=spark"])
    with pytest.raises(ScenarioError, match="expected key.sub=value"):
        load_scenario(toy_yaml, ["rounds"])


def test_override_values_are_yaml_scalars():
    out = apply_overrides({"a": {"b": 1}}, ["a.b=0.5", "a.c=true", "d.e=[1, 2]"])
    assert out == {"a": {"b": 0.5, "c": True}, "d": {"e": [1, 2]}}


def test_batch_size_larger_than_client_data(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", client={"batch_size": 500})
    assert "client.batch_size: 500 is larger than client" in error_of(p)


def test_more_clients_than_samples(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", data={"clients_per_domain": 150})
    assert ": data.clients_per_domain: 150 clients need at least 300 samples" in error_of(p)


def test_batch_size_one_with_batchnorm_conflicts(tmp_path):
    p = write_scenario(tmp_path / "x.yaml", client={"batch_size": 1})
    assert "client.batch_size: 1 cannot train BatchNorm" in error_of(p)
