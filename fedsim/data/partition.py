"""Partition a multi-domain dataset into clients.

Each client gets its own train and test split (``test_fraction`` of its pool); every domain
keeps a global test set (the domain's test part). Schemes:

- ``by-domain``: each domain is cut into ``clients_per_domain`` i.i.d. shards; a client holds
  exactly one domain (FedBN / FedWon's multi-domain setting).
- ``dirichlet``: label skew. For each class, proportions over the clients are drawn from
  Dirichlet(``alpha``); within each domain unless ``options.mix_domains`` pools all domains.
- ``iid``: uniform shards; within each domain, or of the pooled data with ``mix_domains``.
- flwr-datasets' partitioners, same names and parameters (:mod:`fedsim.data.partitioners`):
  ``pathological`` (k classes per client), ``shard`` (sorted-by-label shards), quantity
  skew ``linear`` / ``square`` / ``exponential`` / ``size``. Like ``dirichlet`` they are
  applied to each domain separately (a domain's ``clients_per_domain`` clients are the
  ``num_partitions``), or once to the pooled domains with ``mix_domains``. Quantity skew
  cuts a seeded permutation of the pool, as flwr-datasets cuts its shuffled dataset.
  Samples these partitioners leave out (unused classes, the incomplete last shard, what
  ``partition_sizes`` does not cover) belong to no client.

Everything is a pure function of the labels, the data config and the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedsim.data import partitioners
from fedsim.data.config import DataConfig
from fedsim.data.partitioners import PartitionError

__all__ = ["ClientPartition", "PartitionError", "make_partitions", "mix_domains"]


@dataclass(frozen=True)
class ClientPartition:
    """One client's data, as indices into each domain's *train* part.

    ``train`` / ``test``: {domain: int64 indices}; ``domain``: the client's main domain
    (the one it holds most samples of).
    """

    client_id: int
    domain: str
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]

    @property
    def num_train(self) -> int:
        return int(sum(len(v) for v in self.train.values()))

    @property
    def num_test(self) -> int:
        return int(sum(len(v) for v in self.test.values()))

    @property
    def domains(self) -> list[str]:
        return [d for d, idx in self.train.items() if len(idx)] or [self.domain]


def mix_domains(cfg: DataConfig) -> bool:
    return bool(cfg.options.get("mix_domains", False))


def _split_counts(n: int, parts: int) -> np.ndarray:
    base = np.full(parts, n // parts)
    base[: n % parts] += 1
    return base


def _iid_shards(indices: np.ndarray, parts: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(indices)
    cuts = np.cumsum(_split_counts(len(perm), parts))[:-1]
    return [np.sort(s) for s in np.split(perm, cuts)]


def _dirichlet_shards(
    labels: np.ndarray,
    indices: np.ndarray,
    parts: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int,
    tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed shards: for each class, Dirichlet(alpha) proportions over the clients.
    Redrawn (seeded) until every client has at least ``min_size`` samples."""
    classes = np.unique(labels[indices])
    for _ in range(tries):
        shards: list[list[np.ndarray]] = [[] for _ in range(parts)]
        for c in classes:
            members = rng.permutation(indices[labels[indices] == c])
            props = rng.dirichlet(np.full(parts, alpha))
            cuts = (np.cumsum(props) * len(members)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(members, cuts)):
                shards[k].append(chunk)
        out = [np.sort(np.concatenate(s)) if s else np.empty(0, np.int64) for s in shards]
        if min(len(s) for s in out) >= min_size:
            return out
    raise PartitionError(
        f"dirichlet alpha={alpha} leaves a client with fewer than {min_size} samples after {tries} draws; raise data.alpha or lower data.clients_per_domain"
    )


def _label_shards(
    cfg: DataConfig,
    labels: np.ndarray,
    indices: np.ndarray,
    parts: int,
    rng: np.random.Generator,
    min_size: int,
    where: str,
) -> list[np.ndarray]:
    """``parts`` disjoint index arrays (subsets of ``indices``) by ``cfg.partition``."""
    if cfg.partition == "iid":
        return _iid_shards(indices, parts, rng)
    if cfg.partition == "dirichlet":
        return _dirichlet_shards(labels, indices, parts, cfg.alpha, rng, min_size)
    pool = labels[indices]
    if cfg.partition == "pathological":
        positions = partitioners.pathological(
            pool, parts, int(cfg.num_classes_per_partition or 0), cfg.class_assignment_mode or "random", rng, where
        )
    elif cfg.partition == "shard":
        positions = partitioners.shard(
            pool, parts, cfg.num_shards_per_partition, cfg.shard_size, bool(cfg.keep_incomplete_shard), rng, where
        )
    elif cfg.partition in partitioners.SIZE_FUNCTIONS or cfg.partition == "size":
        if cfg.partition == "size":
            sizes = list(cfg.partition_sizes or [])
            if len(sizes) != parts:
                raise PartitionError(
                    f"data.partition_sizes: needs one size per client ({parts}{where}), got {len(sizes)}"
                )
        else:
            sizes = partitioners.id_to_size(len(pool), parts, cfg.partition, where).tolist()
        # flwr-datasets cuts its shuffled dataset (FederatedDataset shuffles by default).
        order = rng.permutation(len(pool))
        positions = [np.sort(order[p]) for p in partitioners.contiguous(len(pool), sizes, where)]
    else:
        raise PartitionError(f"data.partition: {cfg.partition} does not split a domain into clients")
    out = [np.sort(indices[p]) for p in positions]
    for k, p in enumerate(out):
        if len(p) < min_size:
            raise PartitionError(
                f"data.partition: {cfg.partition} gives client {k}{where} {len(p)} sample(s), fewer than the {min_size} a client needs (one train, one test); lower data.clients_per_domain or change its parameters"
            )
    return out


def make_partitions(labels: dict[str, np.ndarray], cfg: DataConfig, seed: int) -> list[ClientPartition]:
    """Partition the train parts of the domains (``labels``: domain -> train labels, in
    domain order) into ``len(labels) * cfg.clients_per_domain`` clients."""
    rng = np.random.default_rng([seed, 0xDA7A])
    domains = list(labels)
    per = cfg.clients_per_domain
    min_size = 2  # at least one train and one test sample
    # shards: list of (domain -> indices) per client
    shards: list[dict[str, np.ndarray]] = []
    if mix_domains(cfg):
        if cfg.partition == "by-domain":
            raise PartitionError("data.options.mix_domains: cannot be combined with partition by-domain")
        offsets = np.cumsum([0] + [len(labels[d]) for d in domains])
        pooled_labels = np.concatenate([labels[d] for d in domains])
        all_idx = np.arange(len(pooled_labels))
        n = len(domains) * per
        pooled = _label_shards(cfg, pooled_labels, all_idx, n, rng, min_size, " of the pooled domains")
        for s in pooled:
            shards.append({d: s[(s >= offsets[i]) & (s < offsets[i + 1])] - offsets[i] for i, d in enumerate(domains)})
    else:
        for d in domains:
            idx = np.arange(len(labels[d]))
            if len(idx) < per * min_size:
                raise PartitionError(
                    f"data.clients_per_domain: {per} clients need at least {per * min_size} samples but domain '{d}' has {len(idx)}"
                )
            if cfg.partition == "by-domain":
                parts = _iid_shards(idx, per, rng)
            else:
                parts = _label_shards(cfg, labels[d], idx, per, rng, min_size, f" in domain '{d}'")
            shards.extend({d: p} for p in parts)

    clients = []
    for cid, shard in enumerate(shards):
        train: dict[str, np.ndarray] = {}
        test: dict[str, np.ndarray] = {}
        crng = np.random.default_rng([seed, 0xC11E, cid])
        for d, idx in shard.items():
            idx = crng.permutation(idx)
            if cfg.samples_per_client is not None:
                share = len(idx) / max(1, sum(len(v) for v in shard.values()))
                cap = int(np.ceil(cfg.samples_per_client * share / (1.0 - cfg.test_fraction)))
                idx = idx[:cap]
            n_test = int(round(len(idx) * cfg.test_fraction)) if len(idx) > 1 else 0
            n_test = min(max(n_test, 1 if len(idx) > 1 else 0), len(idx) - 1) if len(idx) > 1 else 0
            test[d] = np.sort(idx[:n_test]).astype(np.int64)
            train[d] = np.sort(idx[n_test:]).astype(np.int64)
        main = max(shard, key=lambda d: len(shard[d]))
        clients.append(ClientPartition(cid, main, train, test))
        if clients[-1].num_train == 0:
            raise PartitionError(f"data: client {cid} gets no training samples; lower data.clients_per_domain")
    return clients
