"""Load a scenario's dataset once per process and hand clients their tensors."""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from fedsim.data.base import DATASETS, MultiDomainDataset
from fedsim.data.config import DataConfig
from fedsim.data.partition import ClientPartition, Partitions, make_partitions


@functools.lru_cache(maxsize=4)
def _load_cached(cfg_json: str) -> MultiDomainDataset:
    cfg = DataConfig.model_validate_json(cfg_json)
    loader = DATASETS.get(cfg.dataset)
    dataset = loader(cfg)
    if cfg.domains:
        dataset.domains = {d: dataset.domains[d] for d in cfg.domains}
    return dataset


def load_dataset(cfg: DataConfig) -> MultiDomainDataset:
    """The dataset named in ``cfg`` (cached per process: loaders build or read once)."""
    return _load_cached(cfg.model_dump_json())


def num_clients(cfg: DataConfig) -> int:
    """How many clients the data section makes: ``clients_per_domain`` for each domain
    (loads the dataset only when ``domains`` does not list them)."""
    n_domains = len(cfg.domains) if cfg.domains else len(load_dataset(cfg).domains)
    return n_domains * cfg.clients_per_domain


@functools.lru_cache(maxsize=4)
def _partitions_cached(cfg_json: str, seed: int) -> Partitions:
    cfg = DataConfig.model_validate_json(cfg_json)
    dataset = load_dataset(cfg)
    labels = {d: np.asarray(s.y_train) for d, s in dataset.domains.items()}
    return make_partitions(labels, cfg, seed)


def partitions(cfg: DataConfig, seed: int) -> Partitions:
    """Every client's partition (cached per process); ``[cid]`` builds one client's
    indices, so a population of any size costs a few flat arrays (:class:`Partitions`)."""
    return _partitions_cached(cfg.model_dump_json(), seed)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class ClientTensors:
    x_train: torch.Tensor  # [N, C, H, W] float32 in [0, 1]
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def _gather(dataset: MultiDomainDataset, parts: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for d, idx in parts.items():
        if len(idx):
            split = dataset.domains[d]
            xs.append(np.asarray(split.x_train[idx]))
            ys.append(np.asarray(split.y_train)[idx])
    if not xs:
        h = dataset.image_size
        return torch.empty(0, dataset.channels, h, h), torch.empty(0, dtype=torch.long)
    return to_tensor(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys).astype(np.int64))


class ClientDataCache:
    """Per-process LRU of client tensors: built when a client is first sampled, so a
    population of thousands never sits in memory at once."""

    def __init__(self, cfg: DataConfig, seed: int, capacity: int = 64) -> None:
        self.cfg, self.seed, self.capacity = cfg, seed, capacity
        self._items: OrderedDict[int, ClientTensors] = OrderedDict()
        self._domain_tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dataset(self) -> MultiDomainDataset:
        return load_dataset(self.cfg)

    def partition(self, client_id: int) -> ClientPartition:
        return partitions(self.cfg, self.seed)[client_id]

    def client(self, client_id: int) -> ClientTensors:
        if client_id in self._items:
            self._items.move_to_end(client_id)
            return self._items[client_id]
        part = self.partition(client_id)
        x_tr, y_tr = _gather(self.dataset, part.train)
        x_te, y_te = _gather(self.dataset, part.test)
        item = ClientTensors(x_tr, y_tr, x_te, y_te)
        self._items[client_id] = item
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return item

    def domain_test(self, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The domain's global test set (capped by ``domain_test_samples``, seeded)."""
        if domain not in self._domain_tests:
            split = self.dataset.domains[domain]
            n = len(split.y_test)
            idx = np.arange(n)
            cap = self.cfg.domain_test_samples
            if cap is not None and cap < n:
                idx = np.sort(np.random.default_rng([self.seed, 0x7E57]).permutation(n)[:cap])
            self._domain_tests[domain] = (
                to_tensor(np.asarray(split.x_test[idx])),
                torch.from_numpy(np.asarray(split.y_test)[idx].astype(np.int64)),
            )
        return self._domain_tests[domain]
