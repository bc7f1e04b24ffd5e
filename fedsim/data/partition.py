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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from fedsim.data import partitioners
from fedsim.data.config import DataConfig
from fedsim.data.partitioners import PartitionError

__all__ = ["ClientPartition", "PartitionError", "Partitions", "make_partitions", "mix_domains"]


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


def _flat(shards: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Arrays -> (their concatenation as int64, offsets [len + 1])."""
    offsets = np.zeros(len(shards) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in shards])
    flat = np.concatenate(shards).astype(np.int64, copy=False) if shards else np.empty(0, np.int64)
    return flat, offsets


def _iid_flat(indices: np.ndarray, parts: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_iid_shards` as one flat array + offsets (the same draws, the same shards),
    without a Python object per shard."""
    perm = rng.permutation(indices)
    offsets = np.zeros(parts + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(_split_counts(len(perm), parts))
    shard_of = np.repeat(np.arange(parts), np.diff(offsets))
    return perm[np.lexsort((perm, shard_of))].astype(np.int64, copy=False), offsets


class Partitions(Sequence[ClientPartition]):
    """Every client's partition, held as a few flat arrays (O(1) Python objects for any
    population); ``parts[cid]`` builds that client's :class:`ClientPartition` when asked.

    A client's data is a list of *segments*, one per domain it draws from (in domain
    order; one segment for ``by-domain`` and per-domain schemes). Segment ``g`` is the
    sorted shard ``shard_idx[shard_off[g]:shard_off[g + 1]]`` of domain
    ``domains[seg_domain[g]]``; the client keeps ``seg_take[g]`` of it after permuting it
    with its own generator (seeded by (seed, client id)) and tests on the first
    ``seg_test[g]`` of those. The sizes are fixed here, at construction, so counting and
    checking every client never draws a permutation; ``parts[cid]`` draws the permutation
    exactly as the former eager code did, so the indices are the same.
    """

    def __init__(
        self,
        domains: list[str],
        seed: int,
        shard_idx: np.ndarray,
        shard_off: np.ndarray,
        seg_domain: np.ndarray,
        client_seg: np.ndarray,
        seg_take: np.ndarray,
        seg_test: np.ndarray,
    ) -> None:
        self.domains = list(domains)
        self.seed = seed
        self.shard_idx, self.shard_off = shard_idx, shard_off
        self.seg_domain, self.client_seg = seg_domain, client_seg
        self.seg_take, self.seg_test = seg_take, seg_test
        seg_client = np.repeat(np.arange(len(client_seg) - 1), np.diff(client_seg))
        n = len(client_seg) - 1
        #: per client: training / test sample counts, main domain (index into ``domains``)
        self.num_train = np.bincount(seg_client, weights=seg_take - seg_test, minlength=n).astype(np.int64)
        self.num_test = np.bincount(seg_client, weights=seg_test, minlength=n).astype(np.int64)
        if len(seg_domain) == n:  # one segment per client: its domain
            self.main = np.asarray(seg_domain, dtype=np.int64)
        else:  # the former ``max(shard, key=len)``: the first of the largest segments
            sizes = np.diff(shard_off)
            self.main = np.array(
                [seg_domain[a + int(np.argmax(sizes[a:b]))] for a, b in zip(client_seg[:-1], client_seg[1:])],
                dtype=np.int64,
            )

    def __len__(self) -> int:
        return len(self.client_seg) - 1

    @overload
    def __getitem__(self, cid: int) -> ClientPartition: ...
    @overload
    def __getitem__(self, cid: slice) -> list[ClientPartition]: ...
    def __getitem__(self, cid: int | slice) -> ClientPartition | list[ClientPartition]:
        if isinstance(cid, slice):
            return [self[i] for i in range(*cid.indices(len(self)))]
        n = len(self)
        if not -n <= cid < n:
            raise IndexError(f"client {cid} out of range (0..{n - 1})")
        cid = int(cid) % n
        train: dict[str, np.ndarray] = {}
        test: dict[str, np.ndarray] = {}
        crng = np.random.default_rng([self.seed, 0xC11E, cid])
        for g in range(self.client_seg[cid], self.client_seg[cid + 1]):
            d = self.domains[self.seg_domain[g]]
            idx = crng.permutation(self.shard_idx[self.shard_off[g] : self.shard_off[g + 1]])[: self.seg_take[g]]
            n_test = self.seg_test[g]
            test[d] = np.sort(idx[:n_test]).astype(np.int64)
            train[d] = np.sort(idx[n_test:]).astype(np.int64)
        return ClientPartition(cid, self.domains[self.main[cid]], train, test)

    def domain(self, cid: int) -> str:
        """Client ``cid``'s main domain, without building its partition."""
        return self.domains[self.main[cid]]


def _sizes(n: int, total: int, cfg: DataConfig) -> tuple[int, int]:
    """(samples kept, test samples) of a segment of ``n`` in a client of ``total``:
    the ``samples_per_client`` cap shared by domain, then ``test_fraction`` of it (at
    least one test sample unless the segment has one sample, at least one train)."""
    if cfg.samples_per_client is not None:
        share = n / max(1, total)
        cap = int(np.ceil(cfg.samples_per_client * share / (1.0 - cfg.test_fraction)))
        n = len(range(n)[:cap])  # exactly what ``idx[:cap]`` keeps
    n_test = int(round(n * cfg.test_fraction)) if n > 1 else 0
    n_test = min(max(n_test, 1 if n > 1 else 0), n - 1) if n > 1 else 0
    return n, n_test


def make_partitions(labels: dict[str, np.ndarray], cfg: DataConfig, seed: int) -> Partitions:
    """Partition the train parts of the domains (``labels``: domain -> train labels, in
    domain order) into ``len(labels) * cfg.clients_per_domain`` clients."""
    rng = np.random.default_rng([seed, 0xDA7A])
    domains = list(labels)
    per = cfg.clients_per_domain
    min_size = 2  # at least one train and one test sample
    # segments, in client order: flat shard indices (+ offsets), the domain of each, and
    # where each client's segments start
    if mix_domains(cfg):
        if cfg.partition == "by-domain":
            raise PartitionError("data.options.mix_domains: cannot be combined with partition by-domain")
        offsets = np.cumsum([0] + [len(labels[d]) for d in domains])
        pooled_labels = np.concatenate([labels[d] for d in domains])
        all_idx = np.arange(len(pooled_labels))
        n = len(domains) * per
        pooled = _label_shards(cfg, pooled_labels, all_idx, n, rng, min_size, " of the pooled domains")
        segments = [
            s[(s >= offsets[i]) & (s < offsets[i + 1])] - offsets[i] for s in pooled for i in range(len(domains))
        ]
        shard_idx, shard_off = _flat(segments)
        seg_domain = np.tile(np.arange(len(domains)), n)
        client_seg = np.arange(n + 1, dtype=np.int64) * len(domains)
    else:
        flats, offs = [], []
        for d in domains:
            idx = np.arange(len(labels[d]))
            if len(idx) < per * min_size:
                raise PartitionError(
                    f"data.clients_per_domain: {per} clients need at least {per * min_size} samples but domain '{d}' has {len(idx)}"
                )
            if cfg.partition == "by-domain":
                flat, off = _iid_flat(idx, per, rng)
            else:
                flat, off = _flat(_label_shards(cfg, labels[d], idx, per, rng, min_size, f" in domain '{d}'"))
            flats.append(flat)
            offs.append(off[1:] + sum(len(f) for f in flats[:-1]))
        shard_idx = np.concatenate(flats).astype(np.int64, copy=False)
        shard_off = np.concatenate([np.zeros(1, np.int64), *offs])
        seg_domain = np.repeat(np.arange(len(domains)), per)
        client_seg = np.arange(len(domains) * per + 1, dtype=np.int64)

    sizes = np.diff(shard_off).tolist()
    take: list[int] = []
    tests: list[int] = []
    bounds = client_seg.tolist()
    for cid in range(len(bounds) - 1):
        a, b = bounds[cid], bounds[cid + 1]
        total = sum(sizes[a:b])
        for g in range(a, b):
            kept, n_test = _sizes(sizes[g], total, cfg)
            take.append(kept)
            tests.append(n_test)
        if sum(take[a:b]) == sum(tests[a:b]):
            raise PartitionError(f"data: client {cid} gets no training samples; lower data.clients_per_domain")
    return Partitions(
        domains, seed, shard_idx, shard_off, seg_domain, client_seg, np.array(take, np.int64), np.array(tests, np.int64)
    )
