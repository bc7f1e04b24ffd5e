"""Client state versioning: a round reads what existed before it, whatever a killed
later round wrote."""

from __future__ import annotations

import numpy as np

from fedsim.engine.client_state import ClientState


def test_versions_read_before_round_and_prune(tmp_path):
    s1 = ClientState(tmp_path, 3, server_round=1)
    assert s1.get("local") is None
    s1.put("local", {"a": np.ones(2)})
    s1.commit()
    s2 = ClientState(tmp_path, 3, server_round=2)
    np.testing.assert_array_equal(s2.get("local")["a"], np.ones(2))
    s2.put("local", {"a": np.full(2, 2.0)})
    s2.commit()
    # a killed round 3 wrote its state; re-running round 3 still reads round 2's
    s3 = ClientState(tmp_path, 3, server_round=3)
    s3.get("local")
    s3.put("local", {"a": np.full(2, 3.0)})
    s3.commit()
    again = ClientState(tmp_path, 3, server_round=3)
    np.testing.assert_array_equal(again.get("local")["a"], np.full(2, 2.0))
    # evaluation after round 3 reads round 3 (inclusive)
    ev = ClientState(tmp_path, 3, server_round=3, inclusive=True)
    np.testing.assert_array_equal(ev.get("local")["a"], np.full(2, 3.0))
    # versions older than the one read are pruned
    names = sorted(p.name for p in (tmp_path / "clients" / "3").iterdir())
    assert names == ["local.r2.safetensors", "local.r3.safetensors"]
