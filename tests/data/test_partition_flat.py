"""Partitions held as flat arrays (:class:`fedsim.data.partition.Partitions`) give every
client exactly the indices of the former eager, one-object-per-client construction,
which is re-computed here directly (same generators, same draws)."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.data.config import DataConfig
from fedsim.data.partition import ClientPartition, Partitions, _iid_shards, _label_shards, make_partitions, mix_domains


def eager(labels: dict[str, np.ndarray], cfg: DataConfig, seed: int) -> list[ClientPartition]:
    """The former make_partitions: shards first, then every client's split at once."""
    rng = np.random.default_rng([seed, 0xDA7A])
    domains = list(labels)
    per = cfg.clients_per_domain
    shards: list[dict[str, np.ndarray]] = []
    if mix_domains(cfg):
        offsets = np.cumsum([0] + [len(labels[d]) for d in domains])
        pooled = _label_shards(
            cfg, np.concatenate([labels[d] for d in domains]), np.arange(offsets[-1]), len(domains) * per, rng, 2, ""
        )
        for s in pooled:
            shards.append({d: s[(s >= offsets[i]) & (s < offsets[i + 1])] - offsets[i] for i, d in enumerate(domains)})
    else:
        for d in domains:
            idx = np.arange(len(labels[d]))
            parts = (
                _iid_shards(idx, per, rng)
                if cfg.partition == "by-domain"
                else _label_shards(cfg, labels[d], idx, per, rng, 2, "")
            )
            shards.extend({d: p} for p in parts)
    clients = []
    for cid, shard in enumerate(shards):
        train, test = {}, {}
        crng = np.random.default_rng([seed, 0xC11E, cid])
        for d, idx in shard.items():
            idx = crng.permutation(idx)
            if cfg.samples_per_client is not None:
                share = len(idx) / max(1, sum(len(v) for v in shard.values()))
                idx = idx[: int(np.ceil(cfg.samples_per_client * share / (1.0 - cfg.test_fraction)))]
            n_test = int(round(len(idx) * cfg.test_fraction)) if len(idx) > 1 else 0
            n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1) if len(idx) > 1 else 0
            test[d], train[d] = np.sort(idx[:n_test]).astype(np.int64), np.sort(idx[n_test:]).astype(np.int64)
        clients.append(ClientPartition(cid, max(shard, key=lambda d: len(shard[d])), train, test))
    return clients


CONFIGS = [
    {"partition": "by-domain", "clients_per_domain": 7},
    {"partition": "by-domain", "clients_per_domain": 7, "samples_per_client": 10},
    {"partition": "by-domain", "clients_per_domain": 3, "samples_per_client": 25, "test_fraction": 0.3},
    {"partition": "iid", "clients_per_domain": 4},
    {"partition": "iid", "clients_per_domain": 4, "options": {"mix_domains": True}, "samples_per_client": 12},
    {"partition": "dirichlet", "clients_per_domain": 5, "alpha": 0.3},
    {
        "partition": "dirichlet",
        "clients_per_domain": 5,
        "alpha": 0.1,
        "options": {"mix_domains": True},
        "samples_per_client": 20,
    },
    {"partition": "pathological", "clients_per_domain": 5, "num_classes_per_partition": 2},
    {"partition": "shard", "clients_per_domain": 5, "num_shards_per_partition": 2},
    {"partition": "square", "clients_per_domain": 3, "options": {"mix_domains": True}},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("seed", [0, 3])
def test_flat_partitions_match_eager_construction(kw, seed):
    rng = np.random.default_rng(1)
    labels = {d: rng.integers(0, 10, n) for d, n in zip("abc", (300, 500, 411))}
    cfg = DataConfig(dataset="toy", **kw)
    want = eager(labels, cfg, seed)
    got = make_partitions(labels, cfg, seed)
    assert isinstance(got, Partitions) and len(got) == len(want)
    for a, b in zip(want, got):
        assert (b.client_id, b.domain) == (a.client_id, a.domain)
        assert list(b.train) == list(a.train) and list(b.test) == list(a.test)
        for d in a.train:
            assert (
                b.train[d].dtype == np.int64
                and np.array_equal(b.train[d], a.train[d])
                and np.array_equal(b.test[d], a.test[d])
            )
    # counts and main domains come from the flat arrays, without building any client
    assert got.num_train.tolist() == [p.num_train for p in want]
    assert got.num_test.tolist() == [p.num_test for p in want]
    assert [got.domain(c) for c in range(len(got))] == [p.domain for p in want]
    # sequence behaviour: negative index, slice, out of range
    assert got[-1].client_id == len(got) - 1 and [p.client_id for p in got[1:3]] == [1, 2]
    with pytest.raises(IndexError):
        got[len(got)]


def test_large_population_is_a_few_arrays():
    """40,000 clients: the partitions hold flat arrays (a few int64 per client plus the
    indices), not Python objects per client."""
    labels = {d: np.arange(40_000) % 4 for d in "abcd"}  # 10,000 clients per domain, 4 samples each
    parts = make_partitions(labels, DataConfig(dataset="toy", clients_per_domain=10_000), seed=0)
    assert len(parts) == 40_000
    arrays = [v for v in vars(parts).values() if isinstance(v, np.ndarray)]
    held = sum(a.nbytes for a in arrays)
    assert held <= 96 * len(parts) + 8 * 160_000
    assert parts.num_train.min() == 3 and parts.num_test.max() == 1
    assert parts[39_999].train["d"].tolist() == sorted(parts[39_999].train["d"].tolist())
