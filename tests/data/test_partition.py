"""Partitions: disjoint, complete, seeded; label skew where asked."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.config import DataConfig
from fedsim.data.partition import PartitionError, make_partitions


def labels(n_domains=3, n=300, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {f"d{i}": rng.integers(0, classes, n) for i in range(n_domains)}


def all_indices(parts, domain):
    out = []
    for p in parts:
        out += list(p.train.get(domain, [])) + list(p.test.get(domain, []))
    return out


@pytest.mark.parametrize("scheme", ["by-domain", "iid", "dirichlet"])
def test_partitions_are_disjoint_and_complete(scheme):
    lab = labels()
    cfg = DataConfig(partition=scheme, clients_per_domain=4, alpha=0.5)
    parts = make_partitions(lab, cfg, seed=1)
    assert len(parts) == 12
    for d in lab:
        idx = all_indices(parts, d)
        assert len(idx) == len(set(idx)) == len(lab[d])  # each sample exactly once
    for p in parts:
        assert set(p.train) == {p.domain} and p.num_test >= 1 and p.num_train >= 1
        assert not set(p.train[p.domain]) & set(p.test[p.domain])


def test_test_fraction_and_cap():
    cfg = DataConfig(partition="by-domain", clients_per_domain=2, test_fraction=0.25, samples_per_client=60)
    parts = make_partitions(labels(), cfg, seed=0)
    for p in parts:
        assert p.num_train == 60 and p.num_test == 20


def test_seeded_and_seed_sensitive():
    cfg = DataConfig(partition="dirichlet", clients_per_domain=3, alpha=0.3)
    a = make_partitions(labels(), cfg, seed=5)
    b = make_partitions(labels(), cfg, seed=5)
    c = make_partitions(labels(), cfg, seed=6)
    assert all(np.array_equal(x.train[x.domain], y.train[y.domain]) for x, y in zip(a, b))
    assert any(not np.array_equal(x.train[x.domain], y.train[y.domain]) for x, y in zip(a, c))


def test_dirichlet_small_alpha_skews_labels():
    lab = labels(1, 2000)

    def skew(alpha):
        parts = make_partitions(lab, DataConfig(partition="dirichlet", clients_per_domain=5, alpha=alpha), seed=0)
        # mean over clients of the share of the client's most common label
        return np.mean([np.bincount(lab["d0"][p.train["d0"]], minlength=10).max() / p.num_train for p in parts])

    assert skew(0.1) > skew(100.0) + 0.2


def test_mix_domains_pools_domains():
    lab = labels()
    parts = make_partitions(
        lab, DataConfig(partition="iid", clients_per_domain=2, options={"mix_domains": True}), seed=0
    )
    assert len(parts) == 6 and all(len(p.domains) == 3 for p in parts)
    for d in lab:
        idx = all_indices(parts, d)
        assert len(idx) == len(set(idx)) == len(lab[d])


def test_errors():
    with pytest.raises(PartitionError, match="clients_per_domain"):
        make_partitions(labels(n=10), DataConfig(clients_per_domain=6), seed=0)
    with pytest.raises(PartitionError, match="mix_domains"):
        make_partitions(labels(), DataConfig(partition="by-domain", options={"mix_domains": True}), seed=0)
