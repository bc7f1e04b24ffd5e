"""fedsim.safe_yaml: the bounds on scenario YAML, and what stays allowed."""

from __future__ import annotations

from typing import Any

import pytest

from fedsim import safe_yaml
from fedsim.schema import misplaced_bool


def test_merge_keys_and_small_aliases_stay_allowed():
    doc = "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\nd: [*b, *b]\n"
    assert safe_yaml.load(doc) == {"base": {"x": 1, "y": 2}, "c": {"x": 5, "y": 2}, "d": [{"x": 1, "y": 2}] * 2}


def test_duplicate_key_in_a_nested_mapping_names_key_and_lines():
    with pytest.raises(safe_yaml.YAMLInputError, match=r"^line 4: duplicate key 'lr' \(first given on line 2\)$"):
        safe_yaml.load("client:\n  lr: 0.1\n  batch_size: 4\n  lr: 0.2\n")


def test_expansion_is_counted_through_shared_anchors():
    # 10 levels of 2 aliases each: tiny text, 2^10 leaves; 17 levels: > MAX_VALUES values
    def doc(levels: int) -> str:
        lines = ["l0: &l0 [1, 1]"] + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, levels)]
        return "\n".join(lines) + "\n"

    assert len(safe_yaml.load(doc(10))["l9"]) == 2
    with pytest.raises(safe_yaml.YAMLInputError, match="expands to more than 100000 values"):
        safe_yaml.load(doc(17))


def test_depth_counts_aliased_nesting():
    nested = "a: &a " + "[" * 20 + "1" + "]" * 20 + "\nb: " + "[" * 15 + "*a" + "]" * 15 + "\n"
    with pytest.raises(safe_yaml.YAMLInputError, match="nesting deeper than 32 levels"):
        safe_yaml.load(nested)


@pytest.mark.parametrize("text", ["1" * 41, "-" + "1" * 41, "0x" + "f" * 41])
def test_long_integers_refused(text):
    with pytest.raises(safe_yaml.YAMLInputError, match="integer of"):
        safe_yaml.load(f"seed: {text}\n")


def test_twenty_digit_seed_allowed():
    assert safe_yaml.load("seed: 18446744073709551615\n") == {"seed": 2**64 - 1}


def test_misplaced_bool_paths():
    assert misplaced_bool(int, True) == ""
    assert misplaced_bool(bool, True) is None
    assert misplaced_bool(int | None, False) == ""
    assert misplaced_bool(list[int] | None, [1, True]) == "[1]"
    assert misplaced_bool(dict[int, str], {True: "x"}) == "[True]"
    assert misplaced_bool(dict[str, float], {"a": True}) == "[a]"
    assert misplaced_bool(dict[str, Any], {"a": True}) is None
    assert misplaced_bool(dict[str, bool], {"a": True}) is None
