"""flwr-datasets' label- and quantity-skew partitioners, transcribed onto label arrays.

Flower users know these by name (``flwr_datasets.partitioner``, version 0.6.1): each
function below reproduces one partitioner's assignment of sample indices to partitions,
step by step and with the same draws from the same ``numpy.random.Generator``, so that
``fn(labels, ..., np.random.default_rng(42))`` gives the same index sets as the
partitioner with ``seed=42`` on a dataset with those labels
(``tests/data/test_partitioners.py`` checks this against flwr-datasets when it is installed).
What is left out: flwr-datasets' final in-partition shuffle (fedsim permutes each client's
samples itself) and its HuggingFace ``datasets`` plumbing.

Every function takes the labels of one pool of samples (a domain, or all domains pooled)
and returns one sorted int64 array of *positions into that pool* per partition; positions
may be left unassigned (e.g. the incomplete last shard), never assigned twice. They raise
:class:`PartitionError` with ``data.<key>: message`` when the partition cannot be made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

ClassAssignmentMode = str  # "random" | "deterministic" | "first-deterministic"


class PartitionError(ValueError):
    """A partition that cannot be made (e.g. more clients than samples)."""


def _as_arrays(parts: Sequence[Sequence[int]] | Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def pathological(
    labels: np.ndarray,
    num_partitions: int,
    num_classes_per_partition: int,
    class_assignment_mode: ClassAssignmentMode,
    rng: np.random.Generator,
    where: str = "",
) -> list[np.ndarray]:
    """``PathologicalPartitioner``: every partition holds exactly
    ``num_classes_per_partition`` classes; each class's samples (in index order) are cut
    by ``np.array_split`` into as many near-equal parts as partitions hold that class.

    ``class_assignment_mode``: ``random`` (each partition draws its classes without
    replacement), ``deterministic`` (partition p gets classes (p + i) % C),
    ``first-deterministic`` (first class p % C, the others drawn one at a time until
    distinct; the mode of Li et al., "Federated Learning on Non-IID Data Silos").
    Classes no partition drew stay unassigned (flwr-datasets warns about them)."""
    labels = np.asarray(labels)
    unique = np.unique(labels)  # sorted, as flwr-datasets' sorted(dataset.unique(...))
    n_classes = len(unique)
    if num_classes_per_partition > n_classes:
        raise PartitionError(
            f"data.num_classes_per_partition: {num_classes_per_partition} is more than the {n_classes} classes{where}"
        )
    assigned: list[list[int]] = [[] for _ in range(num_partitions)]
    if class_assignment_mode == "first-deterministic":
        for pid in range(num_partitions):
            assigned[pid].append(unique[pid % n_classes].item())
            while len(assigned[pid]) < num_classes_per_partition:
                label = rng.choice(unique, size=1)[0].item()
                if label not in assigned[pid]:
                    assigned[pid].append(label)
    elif class_assignment_mode == "deterministic":
        for pid in range(num_partitions):
            assigned[pid] = [unique[(pid + i) % n_classes].item() for i in range(num_classes_per_partition)]
    elif class_assignment_mode == "random":
        for pid in range(num_partitions):
            assigned[pid] = rng.choice(unique, size=num_classes_per_partition, replace=False).tolist()
    else:
        raise PartitionError(
            f"data.class_assignment_mode: must be random, deterministic or first-deterministic (got {class_assignment_mode!r})"
        )
    times_used = {c.item(): sum(c.item() in a for a in assigned) for c in unique}
    for c in unique:
        available = int(np.sum(labels == c))
        if times_used[c.item()] > available:
            raise PartitionError(
                f"data.num_classes_per_partition: class {c.item()} is assigned to {times_used[c.item()]} clients but has only {available} samples{where}; lower it or data.clients_per_domain, or use data.class_assignment_mode deterministic"
            )
    out: list[list[int]] = [[] for _ in range(num_partitions)]
    for c in unique:
        if times_used[c.item()] == 0:
            continue
        pieces = np.array_split(np.where(labels == c)[0], times_used[c.item()])
        k = 0
        for pid in range(num_partitions):
            if c.item() in assigned[pid]:
                out[pid].extend(pieces[k].tolist())
                k += 1
    return _as_arrays(out)


def shard(
    labels: np.ndarray,
    num_partitions: int,
    num_shards_per_partition: int | None,
    shard_size: int | None,
    keep_incomplete_shard: bool,
    rng: np.random.Generator,
    where: str = "",
) -> list[np.ndarray]:
    """``ShardPartitioner`` (McMahan et al.'s pathological non-IID split): sort the
    samples by label (stable), cut them into consecutive shards of ``shard_size``, give
    each partition ``num_shards_per_partition`` shards drawn at random.

    - both given: exactly that many shards of that size per partition;
    - only ``num_shards_per_partition``: ``shard_size = int(n / (num_partitions *
      num_shards_per_partition))``;
    - only ``shard_size``: all floor(n / shard_size) shards are dealt out (ceil with
      ``keep_incomplete_shard``, the last one shorter), the first partitions taking one
      more when they do not divide evenly."""
    labels = np.asarray(labels)
    n = len(labels)
    order = np.argsort(labels, kind="stable")  # datasets' Dataset.sort is stable
    if (
        shard_size is not None
        and num_shards_per_partition is not None
        and shard_size * num_shards_per_partition * num_partitions > n
    ):
        raise PartitionError(
            f"data.shard_size: {num_partitions} clients x {num_shards_per_partition} shards x {shard_size} samples need {shard_size * num_shards_per_partition * num_partitions} samples but there are {n}{where}"
        )
    if num_shards_per_partition is not None:
        num_shards_used = num_partitions * num_shards_per_partition
        per_partition = np.ones(num_partitions) * num_shards_per_partition
        if shard_size is None:
            shard_size = int(n / num_shards_used)
            if shard_size < 1:
                raise PartitionError(
                    f"data.num_shards_per_partition: {num_partitions} clients x {num_shards_per_partition} shards is more than the {n} samples{where}"
                )
            usable = math.ceil(n / shard_size) if keep_incomplete_shard else math.floor(n / shard_size)
        else:
            usable = math.floor(n / shard_size)
    else:
        if shard_size is None:
            raise PartitionError(
                "data.shard_size: give data.shard_size or data.num_shards_per_partition for partition shard"
            )
        num_shards_used = math.ceil(n / shard_size) if keep_incomplete_shard else math.floor(n / shard_size)
        usable = num_shards_used
        base = int(num_shards_used / num_partitions)
        per_partition = np.ones(num_partitions) * base
        for i in range(num_shards_used - num_partitions * base):
            per_partition[i] += 1
    if usable < num_partitions:
        raise PartitionError(
            f"data.shard_size: {usable} shards of {shard_size} samples for {num_partitions} clients leave some empty{where}; lower data.shard_size"
        )
    cuts = np.cumsum(per_partition, dtype=int)
    shard_ids = rng.permutation(usable)[:num_shards_used]
    out: list[list[int]] = []
    for ids in np.split(shard_ids, cuts)[:-1]:
        positions: list[int] = []
        for s in ids:
            positions.extend(range(int(s * shard_size), min(int((s + 1) * shard_size), n)))
        out.append(order[positions].tolist() if positions else [])
    return _as_arrays(out)


# Quantity skew: IdToSizeFncPartitioner's size functions, applied to ids 1..M.
SIZE_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda x: x,
    "square": np.square,
    "exponential": np.exp,
}


def id_to_size(n: int, num_partitions: int, size_fn: str, where: str = "") -> np.ndarray:
    """Partition sizes of ``LinearPartitioner`` / ``SquarePartitioner`` /
    ``ExponentialPartitioner``: partition p (1-based) gets ``f(p) / sum_q f(q)`` of the
    ``n`` samples, rounded down; the remainder goes to the last (largest) partition."""
    units = SIZE_FUNCTIONS[size_fn](np.linspace(start=1, stop=num_partitions, num=num_partitions))
    sizes = np.array(units / units.sum() * n, dtype=np.int64)
    sizes[-1] += n - np.sum(sizes)
    if (sizes < 1).any():
        raise PartitionError(
            f"data.partition: {size_fn} gives client {int(np.argmin(sizes))} no samples ({n} samples, {num_partitions} clients){where}; lower data.clients_per_domain"
        )
    return sizes


def contiguous(n: int, sizes: Sequence[int], where: str = "") -> list[np.ndarray]:
    """``SizePartitioner``: consecutive blocks of the given sizes (positions 0..n-1);
    samples beyond their sum stay unassigned."""
    if sum(sizes) > n:
        raise PartitionError(f"data.partition_sizes: they sum to {sum(sizes)} but there are only {n} samples{where}")
    ends = np.cumsum(sizes)
    return [np.arange(e - s, e, dtype=np.int64) for s, e in zip(sizes, ends)]
