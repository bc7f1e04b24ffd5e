"""Online test streams: batches of shifted test images played in a fixed, seeded order.

A stream is built from *shifts*. A shift is either a corruption at a severity, written
``"name@severity"`` (e.g. ``"gaussian_noise@5"``), applied to a clean test set, or the name
of a domain whose own test images are played as they are ("domains as shifts": a model
trained on some domains meets the others). With ``corrupted_source`` a corruption shift
reads pre-corrupted images (e.g. the CIFAR-10-C files) instead of generating them.

Protocols (docs/tta.md, "Streams"):

- ``reset-each-shift``: each shift is its own segment; the runner resets the adapter
  between segments (``TestStream.reset_between_shifts`` is True).
- ``continual``: the shifts in sequence, no reset.
- ``gradual``: each corruption at severities 1, 2, 3, 4, 5, 4, 3, 2, 1 in sequence, no reset
  (shifts are corruption names without severity).
- ``mixed``: the samples of all shifts shuffled together into one segment named ``"mixed"``.

Label-temporal correlation (:func:`dirichlet_order`) orders each segment (the pooled set for
``mixed``) by Dirichlet(delta) chunks; ``delta=None`` is an i.i.d. shuffle.

Determinism: sample selection, ordering and corruption noise derive from ``seed`` alone
(corruption noise of batch i of shift j from ``SeedSequence([seed, 1, j, i])``), so the same
arguments give the same stream on every pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.config import Scenario
from fedsim.data.base import CorruptedSource, ImageArray, MultiDomainDataset
from fedsim.data.loading import load_dataset
from fedsim.tta.config import CLEAN, AdaptationConfig
from fedsim.tta.corruptions import CORRUPTIONS, SEVERITIES, corrupt

PROTOCOLS: tuple[str, ...] = ("reset-each-shift", "continual", "gradual", "mixed")
GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)


@dataclass
class StreamBatch:
    """One batch of a test stream.

    x: float32 [B, C, H, W] in [0, 1]; y: int64 [B], for scoring only (never given to an
    adapter); shift: the shift's name (``"gaussian_noise@5"``, a domain name, or ``"mixed"``);
    index: position of the batch in the stream; segment: index of the contiguous run of
    batches of one shift (the runner resets between segments when asked).
    """

    x: torch.Tensor
    y: torch.Tensor
    shift: str
    index: int
    segment: int = 0


@dataclass(frozen=True)
class Shift:
    """A parsed shift: a corruption at a severity, or a domain."""

    name: str
    corruption: str | None = None
    severity: int | None = None
    domain: str | None = None


def parse_shift(name: str, domains: Mapping[str, Any] | None = None) -> Shift:
    """Parse ``"corruption@severity"`` or a domain name into a :class:`Shift`."""
    if domains is not None and name in domains:
        return Shift(name=name, domain=name)
    corruption, sep, sev = name.partition("@")
    if corruption in CORRUPTIONS:
        if not sep:
            raise ValueError(f"shift '{name}': give a severity, e.g. '{corruption}@5'")
        if not sev.isdigit() or int(sev) not in SEVERITIES:
            raise ValueError(f"shift '{name}': severity must be 1..5")
        return Shift(name=f"{corruption}@{int(sev)}", corruption=corruption, severity=int(sev))
    known = sorted(domains) if domains else []
    raise ValueError(f"shift '{name}' is neither a corruption@severity nor a domain (domains: {known})")


def dirichlet_order(
    labels: np.ndarray,
    num_classes: int,
    delta: float | None,
    rng: np.random.Generator,
    shuffle_slots: bool = True,
) -> np.ndarray:
    """Permutation of ``range(len(labels))`` with Dirichlet(delta) label-temporal correlation.

    Each class's (shuffled) samples are split into ``num_classes`` chunks (slots) with
    proportions ``q ~ Dirichlet(delta * 1)``; slot j collects chunk j of every class; slots
    are played in order 0..num_classes-1. ``shuffle_slots=True`` shuffles the samples inside
    each slot (the RoTTA / UnMix-TNS sampler: large delta tends to i.i.d.; small delta leaves
    a few classes per slot, so windows hold few labels); ``False`` plays each slot's class
    chunks one after another (long runs of one label; large delta gives runs of about
    N / num_classes^2). ``delta=None`` or ``inf``: i.i.d. shuffle; ``delta=0``: sorted by
    label. Every index occurs exactly once.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if delta is None or math.isinf(delta):
        return rng.permutation(n)
    if delta < 0:
        raise ValueError("delta must be >= 0, None or inf")
    if delta == 0:
        perm = rng.permutation(n)
        return perm[np.argsort(labels[perm], kind="stable")]
    slots: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        q = rng.dirichlet(np.full(num_classes, float(delta)))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # underflow for tiny delta: one slot
            q = np.eye(num_classes)[rng.integers(num_classes)]
        cuts = (np.cumsum(q)[:-1] * len(idx)).round().astype(int)
        for j, chunk in enumerate(np.split(idx, np.clip(cuts, 0, len(idx)))):
            slots[j].append(chunk)
    parts = [np.concatenate(s) for s in slots if s]
    if shuffle_slots:
        parts = [rng.permutation(p) for p in parts]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


@dataclass
class _Source:
    shift: Shift
    images: ImageArray
    labels: np.ndarray
    generate: bool  # apply the corruption on the fly (False: images are already shifted)


@dataclass
class _Segment:
    name: str
    members: np.ndarray  # [n, 2]: (source id, index into that source), play order


@dataclass
class TestStream:
    """An iterable of :class:`StreamBatch`; iterate as often as needed (same batches each time).

    Built by :func:`build_stream`. ``record()`` describes it for a run's record (protocol,
    reset policy, shifts, sample counts, seed).
    """

    protocol: str
    batch_size: int
    seed: int
    delta: float | None
    quantize: bool
    sources: list[_Source]
    segments: list[_Segment]
    info: dict[str, Any] = field(default_factory=dict)

    __test__ = False  # not a pytest class

    @property
    def reset_between_shifts(self) -> bool:
        """Whether the runner should reset the adapter at each new segment."""
        return self.protocol == "reset-each-shift"

    @property
    def num_samples(self) -> int:
        return int(sum(len(s.members) for s in self.segments))

    def __len__(self) -> int:
        return int(sum(math.ceil(len(s.members) / self.batch_size) for s in self.segments))

    def record(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "reset_between_shifts": self.reset_between_shifts,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "dirichlet_delta": self.delta,
            "segments": [{"shift": s.name, "samples": int(len(s.members))} for s in self.segments],
            "samples": self.num_samples,
            "batches": len(self),
            **self.info,
        }

    def __iter__(self) -> Iterator[StreamBatch]:
        index = 0
        for seg_id, seg in enumerate(self.segments):
            for start in range(0, len(seg.members), self.batch_size):
                members = seg.members[start : start + self.batch_size]
                x, y = self._load(members, index)
                yield StreamBatch(x=x, y=y, shift=seg.name, index=index, segment=seg_id)
                index += 1

    def _load(self, members: np.ndarray, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs: list[torch.Tensor | None] = [None] * len(members)
        ys = np.empty(len(members), dtype=np.int64)
        for sid in np.unique(members[:, 0]):
            pos = np.flatnonzero(members[:, 0] == sid)
            src = self.sources[sid]
            idx = members[pos, 1]
            order = np.argsort(idx, kind="stable")
            raw = np.asarray(src.images[idx[order]])  # sorted indices suit lazy readers
            raw = raw[np.argsort(order, kind="stable")]
            x = torch.from_numpy(np.ascontiguousarray(raw)).permute(0, 3, 1, 2).float().div_(255.0)
            if src.generate:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1, int(sid), batch_index]))
                x = corrupt(x, src.shift.corruption or "", src.shift.severity or 1, rng)
                if self.quantize:
                    x = torch.round(x * 255.0) / 255.0
            for k, p in enumerate(pos):
                xs[p] = x[k]
            ys[pos] = src.labels[idx]
        return torch.stack(xs).contiguous(), torch.from_numpy(ys)  # type: ignore[arg-type]


def build_stream(
    shifts: Sequence[str],
    *,
    images: ImageArray | None = None,
    labels: np.ndarray | None = None,
    domains: Mapping[str, tuple[ImageArray, np.ndarray]] | None = None,
    protocol: str = "continual",
    batch_size: int = 64,
    samples_per_shift: int | None = None,
    num_classes: int | None = None,
    dirichlet_delta: float | None = None,
    shuffle_slots: bool = True,
    seed: int = 0,
    corrupted_source: CorruptedSource | None = None,
    quantize: bool = True,
) -> TestStream:
    """Build a :class:`TestStream`.

    Args:
        shifts: ``"corruption@severity"`` or domain names (corruption names alone for
            ``gradual``). The order is the play order.
        images, labels: the clean test set (uint8 [N, H, W, C], int [N]) that corruption
            shifts corrupt; not needed when every corruption comes from ``corrupted_source``.
        domains: domain name -> (uint8 images, labels) for domain shifts.
        protocol: one of :data:`PROTOCOLS`.
        batch_size: >= 1; the last batch of a segment may be smaller.
        samples_per_shift: draw this many samples (without replacement, seeded) per shift;
            None keeps all.
        num_classes: number of Dirichlet slots (default ``max label + 1``).
        dirichlet_delta: None (i.i.d.), 0 (sorted by label) or > 0.
        shuffle_slots: shuffle inside Dirichlet slots (see :func:`dirichlet_order`).
        seed: the stream's only seed.
        corrupted_source: ``(corruption, severity) -> (uint8 images, labels)`` of
            pre-corrupted images used instead of generating corruptions.
        quantize: round generated corruptions to multiples of 1/255 (like stored uint8 files).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}' (known: {', '.join(PROTOCOLS)})")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if not shifts:
        raise ValueError("give at least one shift")
    if protocol == "gradual":
        names = []
        for s in shifts:
            if s not in CORRUPTIONS:
                raise ValueError(f"gradual protocol takes corruption names without severity, got '{s}'")
            names += [f"{s}@{k}" for k in GRADUAL_SEVERITIES]
    else:
        names = list(shifts)
    parsed = [parse_shift(n, domains) for n in names]

    root = np.random.SeedSequence(seed)
    sel_rng = np.random.default_rng(root.spawn(1)[0])
    sources: list[_Source] = []
    cache: dict[tuple[str, int], tuple[ImageArray, np.ndarray]] = {}
    members: list[np.ndarray] = []
    all_labels: list[np.ndarray] = []
    for sid, shift in enumerate(parsed):
        if shift.domain is not None:
            assert domains is not None
            imgs, labs = domains[shift.domain]
        elif corrupted_source is not None:
            key = (shift.corruption or "", shift.severity or 1)
            if key not in cache:
                ci, cl = corrupted_source(*key)
                cache[key] = (ci, np.asarray(cl))
            imgs, labs = cache[key]
        else:
            if images is None or labels is None:
                raise ValueError(f"shift '{shift.name}' needs the clean test set (images, labels)")
            imgs, labs = images, labels
        labs = np.asarray(labs).astype(np.int64)
        if len(imgs) != len(labs):
            raise ValueError(f"shift '{shift.name}': {len(imgs)} images but {len(labs)} labels")
        n = len(labs)
        take = (
            np.arange(n)
            if samples_per_shift is None or samples_per_shift >= n
            else np.sort(sel_rng.choice(n, size=samples_per_shift, replace=False))
        )
        generate = shift.corruption is not None and corrupted_source is None
        sources.append(_Source(shift, imgs, labs, generate))
        members.append(np.stack([np.full(len(take), sid), take], axis=1).astype(np.int64))
        all_labels.append(labs[take])

    k = num_classes if num_classes is not None else int(max(int(lab.max()) for lab in all_labels if len(lab)) + 1)
    order_rng = np.random.default_rng(root.spawn(2)[1])
    segments: list[_Segment] = []
    if protocol == "mixed":
        pooled, pooled_labels = np.concatenate(members), np.concatenate(all_labels)
        segments.append(
            _Segment("mixed", pooled[dirichlet_order(pooled_labels, k, dirichlet_delta, order_rng, shuffle_slots)])
        )
    else:
        for shift, mem, lab in zip(parsed, members, all_labels):
            segments.append(
                _Segment(shift.name, mem[dirichlet_order(lab, k, dirichlet_delta, order_rng, shuffle_slots)])
            )
    info = {
        "shifts": [s.name for s in parsed],
        "num_classes": k,
        "samples_per_shift": samples_per_shift,
        "shuffle_slots": shuffle_slots,
        "source": "corrupted_source" if corrupted_source is not None else "generated",
    }
    return TestStream(protocol, batch_size, seed, dirichlet_delta, quantize, sources, segments, info)


def domain_sets(
    dataset: MultiDomainDataset, names: Sequence[str] | None = None
) -> dict[str, tuple[ImageArray, np.ndarray]]:
    """The test sets ``(x_test, y_test)`` of a dataset's domains (all, or ``names``), for ``domains=``."""
    chosen = list(dataset.domains) if names is None else list(names)
    missing = [n for n in chosen if n not in dataset.domains]
    if missing:
        raise ValueError(f"dataset '{dataset.name}' has no domain(s) {missing}")
    return {n: (dataset.domains[n].x_test, np.asarray(dataset.domains[n].y_test)) for n in chosen}


# A scenario's edge streams -------------------------------------------------------------


def full_dataset(scenario: Scenario) -> MultiDomainDataset:
    """The run's dataset with every domain (training may have used a subset)."""
    if scenario.data.domains is None:
        return load_dataset(scenario.data)
    return load_dataset(scenario.data.model_copy(update={"domains": None}))


def stream_seed(seed: int, client_id: int) -> int:
    """The seed of edge ``client_id``'s stream: ``SeedSequence([seed, client_id])``."""
    return int(np.random.SeedSequence([int(seed), int(client_id)]).generate_state(1)[0] % (2**31))


def reset_on_new_shift(cfg: AdaptationConfig, stream: TestStream) -> bool:
    if cfg.reset == "auto":
        return stream.reset_between_shifts
    return cfg.reset == "each-shift"


def stream_record(
    cfg: AdaptationConfig, stream: TestStream, edge: int, domain: str, seed: int
) -> tuple[dict[str, Any], bool]:
    """The stream's record as results keep it, and whether the adapter resets between shifts."""
    reset = reset_on_new_shift(cfg, stream)
    record = stream.record()
    record.update(edge=edge, domain=domain, base_seed=seed, reset_policy=cfg.reset, reset_on_new_shift=reset)
    return record, reset


def edge_stream(scenario: Scenario, cfg: AdaptationConfig, edge: int, domain: str, seed: int) -> TestStream:
    """The stream of edge ``edge`` whose data is ``domain``: shifts of that domain's global
    test set, as ``cfg.stream_for(edge)`` describes them. A dataset with pre-corrupted test
    sets (``MultiDomainDataset.corrupted_source``) supplies the corruption shifts."""
    ds = load_dataset(scenario.data)
    split = ds.domains[domain]
    st = cfg.stream_for(edge)
    names = st.shift_names()
    domains: dict[str, tuple[Any, np.ndarray]] = {}
    for name in names:
        if name == CLEAN:
            domains[CLEAN] = (split.x_test, np.asarray(split.y_test))
        elif name.partition("@")[0] not in CORRUPTIONS:
            src = ds if name in ds.domains else full_dataset(scenario)
            domains[name] = (src.domains[name].x_test, np.asarray(src.domains[name].y_test))
    return build_stream(
        names,
        images=split.x_test,
        labels=np.asarray(split.y_test),
        domains=domains or None,
        protocol=st.protocol,
        batch_size=st.batch_size,
        samples_per_shift=st.samples_per_shift,
        num_classes=ds.num_classes,
        dirichlet_delta=st.dirichlet_delta,
        shuffle_slots=st.shuffle_slots,
        seed=seed,
        corrupted_source=ds.corrupted_source,
        quantize=st.quantize,
    )
