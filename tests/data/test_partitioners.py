"""flwr-datasets' partitioners in fedsim: their defining properties, how they combine with
domains, and (when flwr-datasets is installed: ``pip install -e .[flwr-datasets]``) equality
with flwr-datasets' own output on the same labels and seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from fedsim.config import DataConfig, Scenario
from fedsim.data import partitioners
from fedsim.data.partition import PartitionError, make_partitions
from fedsim.schema import validation_error_line


def labels(n=400, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def assert_disjoint(parts, n):
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) and flat.min() >= 0 and flat.max() < n


# -- pathological -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["random", "deterministic", "first-deterministic"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_exactly_k_classes(mode, k):
    y = labels()
    parts = partitioners.pathological(y, 7, k, mode, np.random.default_rng(3))
    assert len(parts) == 7
    assert_disjoint(parts, len(y))
    for p in parts:
        assert len(np.unique(y[p])) == k
    # every class a partition holds is split evenly among the partitions holding it
    for c in np.unique(y):
        sizes = [int(np.sum(y[p] == c)) for p in parts if np.any(y[p] == c)]
        if sizes:
            assert sum(sizes) == int(np.sum(y == c)) and max(sizes) - min(sizes) <= 1


def test_pathological_deterministic_and_first_deterministic_classes():
    y = labels(classes=5)
    parts = partitioners.pathological(y, 6, 2, "deterministic", np.random.default_rng(0))
    assert [sorted(np.unique(y[p]).tolist()) for p in parts] == [
        sorted({(p + i) % 5 for i in range(2)}) for p in range(6)
    ]
    parts = partitioners.pathological(y, 6, 3, "first-deterministic", np.random.default_rng(0))
    for pid, p in enumerate(parts):
        assert pid % 5 in set(y[p].tolist())


def test_pathological_errors():
    with pytest.raises(PartitionError, match="num_classes_per_partition"):
        partitioners.pathological(labels(classes=3), 4, 4, "random", np.random.default_rng(0))
    with pytest.raises(PartitionError, match="class 0 is assigned to 6 clients but has only 2"):
        partitioners.pathological(np.array([0, 0, 1, 1, 1, 1, 1, 1]), 6, 2, "deterministic", np.random.default_rng(0))


# -- shard --------------------------------------------------------------------------------


def test_shard_sizes_and_label_runs():
    y = labels(n=1000)
    order = np.argsort(y, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(y))
    parts = partitioners.shard(y, 10, 2, 40, False, np.random.default_rng(1))
    assert_disjoint(parts, len(y))
    for p in parts:
        assert len(p) == 80
        # two runs of 40 consecutive samples in label-sorted order, each starting on a shard boundary
        r = np.sort(rank[p])
        runs = np.split(r, np.flatnonzero(np.diff(r) != 1) + 1)
        assert all(len(run) % 40 == 0 and run[0] % 40 == 0 for run in runs)


def test_shard_size_only_deals_out_all_shards():
    y = labels(n=1003)
    parts = partitioners.shard(y, 9, None, 100, False, np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [100] * 8 + [200]  # 10 full shards, 3 samples left out
    assert sum(len(p) for p in parts) == 1000
    parts = partitioners.shard(y, 9, None, 100, True, np.random.default_rng(0))
    assert sum(len(p) for p in parts) == 1003  # the shorter 11th shard is dealt too
    assert_disjoint(parts, len(y))
    parts = partitioners.shard(y, 10, 2, None, False, np.random.default_rng(0))
    assert all(len(p) == 2 * int(1003 / 20) for p in parts)


def test_shard_errors():
    with pytest.raises(PartitionError, match="data.shard_size"):
        partitioners.shard(labels(n=100), 5, 3, 10, False, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="data.shard_size"):
        partitioners.shard(labels(n=100), 5, None, 30, False, np.random.default_rng(0))


# -- quantity skew ------------------------------------------------------------------------


@pytest.mark.parametrize("fn,f", [("linear", lambda x: x), ("square", lambda x: x * x), ("exponential", math.exp)])
def test_quantity_skew_sizes_follow_formula(fn, f):
    n, m = 1234, 6
    sizes = partitioners.id_to_size(n, m, fn)
    total = sum(f(p) for p in range(1, m + 1))
    expected = [math.floor(f(p) / total * n) for p in range(1, m + 1)]
    expected[-1] += n - sum(expected)
    assert sizes.tolist() == expected and sizes.sum() == n


def test_quantity_skew_too_many_clients():
    with pytest.raises(PartitionError, match="exponential gives client 0 no samples"):
        partitioners.id_to_size(100, 8, "exponential")


def test_contiguous_sizes():
    parts = partitioners.contiguous(10, [2, 3, 4])
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(PartitionError, match="data.partition_sizes"):
        partitioners.contiguous(5, [3, 3])


# -- with domains, through make_partitions -----------------------------------------------


def domain_labels(n_domains=3, n=300, classes=10):
    return {f"d{i}": labels(n, classes, seed=i) for i in range(n_domains)}


CONFIGS = [
    {"partition": "pathological", "num_classes_per_partition": 2},
    {"partition": "pathological", "num_classes_per_partition": 3, "class_assignment_mode": "first-deterministic"},
    {"partition": "shard", "num_shards_per_partition": 2},
    {"partition": "shard", "shard_size": 25, "keep_incomplete_shard": True},
    {"partition": "linear"},
    {"partition": "square"},
    {"partition": "exponential"},
    {"partition": "size", "partition_sizes": [30, 60, 90, 120]},
]


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: kw["partition"])
def test_within_each_domain_each_sample_at_most_once(kw):
    lab = domain_labels()
    cfg = DataConfig(clients_per_domain=4, **kw)
    parts = make_partitions(lab, cfg, seed=1)
    assert len(parts) == 12
    for i, d in enumerate(lab):
        mine = parts[4 * i : 4 * i + 4]
        assert all(set(p.train) == {d} and p.domain == d for p in mine)  # one domain per client
        idx = np.concatenate([np.r_[p.train[d], p.test[d]] for p in mine])
        assert len(idx) == len(set(idx.tolist())) <= len(lab[d])
        if kw["partition"] == "pathological":
            assert all(
                len(np.unique(lab[d][np.r_[p.train[d], p.test[d]]])) == kw["num_classes_per_partition"] for p in mine
            )
        if kw["partition"] in ("linear", "square", "exponential"):
            assert [p.num_train + p.num_test for p in mine] == partitioners.id_to_size(
                len(lab[d]), 4, kw["partition"]
            ).tolist()
        if kw["partition"] == "size":
            assert [p.num_train + p.num_test for p in mine] == kw["partition_sizes"]
    again = make_partitions(lab, cfg, seed=1)
    other = make_partitions(lab, cfg, seed=2)
    same = all(np.array_equal(a.train[a.domain], b.train[b.domain]) for a, b in zip(parts, again))
    differs = any(not np.array_equal(a.train[a.domain], b.train[b.domain]) for a, b in zip(parts, other))
    assert same and differs


def test_mix_domains_pools_then_partitions():
    lab = domain_labels()
    cfg = DataConfig(
        clients_per_domain=2, partition="pathological", num_classes_per_partition=2, options={"mix_domains": True}
    )
    parts = make_partitions(lab, cfg, seed=0)
    assert len(parts) == 6
    for p in parts:
        classes = set()
        for d in lab:
            classes |= set(lab[d][np.r_[p.train.get(d, []), p.test.get(d, [])].astype(int)].tolist())
        assert len(classes) == 2
    cfg = DataConfig(clients_per_domain=2, partition="size", partition_sizes=[5, 5], options={"mix_domains": True})
    with pytest.raises(PartitionError, match="needs one size per client \\(6 of the pooled domains\\), got 2"):
        make_partitions(lab, cfg, seed=0)


def test_too_small_client_is_an_error():
    cfg = DataConfig(clients_per_domain=4, partition="size", partition_sizes=[1, 5, 5, 5])
    with pytest.raises(PartitionError, match="gives client 0 in domain 'd0' 1 sample"):
        make_partitions(domain_labels(), cfg, seed=0)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"partition": "iid", "shard_size": 10}, "data.shard_size: only used by partition shard (partition is iid)"),
        ({"partition": "pathological"}, "data.num_classes_per_partition: required by partition pathological"),
        (
            {"partition": "shard"},
            "data.shard_size: partition shard needs data.shard_size, data.num_shards_per_partition or both",
        ),
        ({"partition": "size"}, "data.partition_sizes: required by partition size (one size per client of a domain)"),
        (
            {"partition": "size", "partition_sizes": [3, 0]},
            "data.partition_sizes: must be a non-empty list of sizes >= 1 (got [3, 0])",
        ),
        (
            {"partition": "dirichlet", "class_assignment_mode": "random"},
            "data.class_assignment_mode: only used by partition pathological (partition is dirichlet)",
        ),
    ],
)
def test_config_rejects_misplaced_or_missing_parameters(kw, message):
    with pytest.raises(ValidationError) as info:
        Scenario.model_validate({"data": kw})
    assert validation_error_line("x.yaml", info.value, Scenario) == f"x.yaml: {message}"


# -- equality with flwr-datasets ----------------------------------------------------------

FLWR_CASES = [
    (
        "PathologicalPartitioner",
        {"num_partitions": 7, "num_classes_per_partition": 2, "class_assignment_mode": "random"},
        lambda y, rng: partitioners.pathological(y, 7, 2, "random", rng),
    ),
    (
        "PathologicalPartitioner",
        {"num_partitions": 12, "num_classes_per_partition": 3, "class_assignment_mode": "first-deterministic"},
        lambda y, rng: partitioners.pathological(y, 12, 3, "first-deterministic", rng),
    ),
    (
        "PathologicalPartitioner",
        {"num_partitions": 5, "num_classes_per_partition": 4, "class_assignment_mode": "deterministic"},
        lambda y, rng: partitioners.pathological(y, 5, 4, "deterministic", rng),
    ),
    (
        "ShardPartitioner",
        {"num_partitions": 10, "num_shards_per_partition": 2, "shard_size": 45},
        lambda y, rng: partitioners.shard(y, 10, 2, 45, False, rng),
    ),
    (
        "ShardPartitioner",
        {"num_partitions": 10, "num_shards_per_partition": 3},
        lambda y, rng: partitioners.shard(y, 10, 3, None, False, rng),
    ),
    (
        "ShardPartitioner",
        {"num_partitions": 9, "shard_size": 70},
        lambda y, rng: partitioners.shard(y, 9, None, 70, False, rng),
    ),
    (
        "ShardPartitioner",
        {"num_partitions": 9, "shard_size": 70, "keep_incomplete_shard": True},
        lambda y, rng: partitioners.shard(y, 9, None, 70, True, rng),
    ),
    (
        "LinearPartitioner",
        {"num_partitions": 6},
        lambda y, rng: partitioners.contiguous(len(y), partitioners.id_to_size(len(y), 6, "linear").tolist()),
    ),
    (
        "SquarePartitioner",
        {"num_partitions": 6},
        lambda y, rng: partitioners.contiguous(len(y), partitioners.id_to_size(len(y), 6, "square").tolist()),
    ),
    (
        "ExponentialPartitioner",
        {"num_partitions": 5},
        lambda y, rng: partitioners.contiguous(len(y), partitioners.id_to_size(len(y), 5, "exponential").tolist()),
    ),
    (
        "SizePartitioner",
        {"partition_sizes": [100, 50, 300]},
        lambda y, rng: partitioners.contiguous(len(y), [100, 50, 300]),
    ),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("seed", [42, 7])
@pytest.mark.parametrize("name,kwargs,ours", FLWR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FLWR_CASES)])
def test_same_partitions_as_flwr_datasets(name, kwargs, ours, seed):
    datasets = pytest.importorskip("datasets")
    flwr_partitioner = pytest.importorskip("flwr_datasets.partitioner")
    y = labels(n=997, classes=10, seed=seed)
    cls = getattr(flwr_partitioner, name)
    if name in ("PathologicalPartitioner", "ShardPartitioner"):
        partitioner = cls(partition_by="label", seed=seed, **kwargs)
    else:
        partitioner = cls(**kwargs)
    partitioner.dataset = datasets.Dataset.from_dict({"label": y.tolist(), "idx": list(range(len(y)))})
    theirs = [sorted(partitioner.load_partition(i)["idx"]) for i in range(partitioner.num_partitions)]
    mine = [p.tolist() for p in ours(y, np.random.default_rng(seed))]
    assert mine == theirs
