"""Base class of test-time adapters (online protocol, no labels)."""

from __future__ import annotations

import copy
import inspect
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


def adapter_settings(cls: type) -> dict[str, Any]:
    """An adapter class's settings and their defaults (``inspect.Parameter.empty`` if required):
    the keyword-only parameters of its constructor."""
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return {n: p.default for n, p in params.items() if n not in ("self", "model") and p.kind is p.KEYWORD_ONLY}


class Adapter:
    """A model adapted online on a stream of unlabeled test batches.

    ``predict_and_adapt(x)`` returns the logits for ``x`` computed *before* ``x`` updates
    anything (online protocol), then adapts. ``reset()`` returns to the source state (the
    model as prepared at construction). Adapters never see labels.

    Class attributes: ``name`` (registry name), ``needs_grad`` (whether the edge device
    back-propagates), ``changes`` (what the adapter changes); an instance overrides them
    where a setting changes the answer (e.g. ``unmix_tns`` with ``tent=True``). Settings are keyword-only
    constructor arguments with defaults; an unknown one raises ``TypeError`` naming it.
    Subclasses implement :meth:`prepare` (turn the copied model into the adapted form) and
    :meth:`_predict_and_adapt`, and may extend :meth:`reset` / :meth:`metrics`.
    :meth:`predict_and_adapt` is final: it checks the batch and keeps the counters that
    ``adaptation_summary.json`` reports (a subclass overriding it is a ``TypeError``).
    """

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = False
    changes: ClassVar[str] = "nothing"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # An override would silently bypass the batch check and the counters (samples,
        # batches, seconds read as 0 in adaptation_summary.json): refuse it at class creation.
        if "predict_and_adapt" in vars(cls):
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__} overrides predict_and_adapt; implement "
                "_predict_and_adapt(x) instead (predict_and_adapt checks the batch and counts samples, batches and time, then calls it)"
            )

    def __init__(self, model: nn.Module) -> None:
        self.model = self.prepare(copy.deepcopy(model))
        self._source_state = copy.deepcopy(self.model.state_dict())
        self._start_counters()

    def _start_counters(self) -> None:
        self._samples = 0
        self._batches = 0
        self._seconds = 0.0

    @property
    def device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Turn the (already copied) source model into this adapter's form. Default: eval mode,
        no gradients."""
        model.eval()
        model.requires_grad_(False)
        return model

    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for ``x`` (float [B, C, H, W] in [0, 1]) computed before
        this batch changes anything; then adapt on ``x``."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
            raise ValueError("predict_and_adapt takes a non-empty float tensor [B, C, H, W]")
        start = time.perf_counter()
        logits = self._predict_and_adapt(x.to(self.device, torch.float32))
        self._seconds += time.perf_counter() - start
        self._samples += int(x.shape[0])
        self._batches += 1
        return logits.detach()

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the source state. Counters in :meth:`metrics` keep running."""
        self.model.load_state_dict(self._source_state)

    def metrics(self) -> dict[str, float]:
        """Counters: samples and batches seen, seconds spent adapting."""
        return {"samples": float(self._samples), "batches": float(self._batches), "adapt_seconds": self._seconds}

    def describe(self) -> dict[str, Any]:
        """Name, needs_grad, changes and settings, for a run's record."""
        settings = {k: getattr(self, k) for k in adapter_settings(type(self)) if hasattr(self, k)}
        settings = {k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return {"name": self.name, "needs_grad": self.needs_grad, "changes": self.changes, "settings": settings}


# -- cloud-edge adapters -------------------------------------------------------------------
Payload = dict[str, torch.Tensor]
"""What crosses the network between the halves of a :class:`SplitAdapter`: named tensors.
In an upload the key ``"images"`` (uint8 [n, C, H, W]) holds the uploaded samples (they
count as ``samples_uploaded``); any other key is extra payload."""


def payload_bytes(payload: Payload | None) -> int:
    """Bytes a payload costs on the wire: every tensor's elements at their own width."""
    return 0 if payload is None else sum(t.numel() * t.element_size() for t in payload.values())


def uploaded_samples(upload: Payload | None) -> int:
    """Samples an upload carries (the leading size of ``"images"``)."""
    return 0 if upload is None or "images" not in upload else int(upload["images"].shape[0])


class EdgeHalf(ABC):
    """The device's half of a :class:`SplitAdapter`: forward only, decides what to upload,
    applies the cloud's model updates. ``model`` is the network it predicts with."""

    model: nn.Module

    @abstractmethod
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``x`` (float [B, C, H, W] on the model's device), before ``x`` changes anything."""

    @abstractmethod
    def select(self, x: torch.Tensor, logits: torch.Tensor) -> Payload | None:
        """What to upload for this batch (None: nothing); updates the half's own state."""

    @abstractmethod
    def apply(self, update: Payload) -> None:
        """Apply a model update the cloud sent."""

    @abstractmethod
    def reset(self) -> None:
        """Back to the state at construction."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything :meth:`load_state` needs to continue on a fresh half built from the same
        model and settings (tensors, Python scalars, None, lists/dicts of them): a deployed
        edge handles each message in a fresh process."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None: ...


class CloudHalf(ABC):
    """The cloud's half of a :class:`SplitAdapter` for one edge."""

    @abstractmethod
    def receive(self, upload: Payload | None) -> Payload | None:
        """Take one edge batch's upload (None when the edge uploaded nothing; called for
        every batch, in order), train, and return the model update for the edge (None:
        the edge's model stays)."""

    def upload_budget(self) -> int:
        """How many samples the edge may upload before it must report back: :meth:`receive`
        returns None for every batch that ends below it. 0 means after every batch (always
        correct; a larger value saves messages in a deployment)."""
        return 0

    @abstractmethod
    def reset(self) -> None:
        """Back to the state at construction; counters in :meth:`metrics` keep running."""

    def metrics(self) -> dict[str, float]:
        """Cumulative cloud-side counters (e.g. training steps)."""
        return {}


class SplitAdapter(Adapter):
    """A cloud-edge adapter: an :class:`EdgeHalf` on the device and a :class:`CloudHalf` in
    the cloud, exchanging :data:`Payload` s.

    A subclass implements :meth:`make_edge` and :meth:`make_cloud`; its constructor takes
    its settings as keyword-only arguments (as every adapter) and hands them on as a dict.
    This class runs both halves in one process, per batch: the edge predicts, selects its
    upload, the cloud receives it and may return an update, which the edge applies before
    the next batch. The deployed edge demo (:mod:`fedsim.edge.protocol`) runs the same two
    halves on two machines in the same order, so both score the same.

    Metrics add ``samples_uploaded``, ``upload_fraction``, ``bytes_up`` and ``bytes_down``
    (:func:`payload_bytes` of every upload and update) and the cloud half's counters.
    """

    needs_grad = False
    changes = "what the cloud sends"

    def __init__(self, model: nn.Module, settings: dict[str, Any]) -> None:
        self.settings = dict(settings)
        self.edge = self.make_edge(model, self.settings)
        self.cloud = self.make_cloud(model, self.settings)
        self.model = self.edge.model
        self._start_counters()
        self.samples_uploaded = 0
        self.bytes_up = 0
        self.bytes_down = 0

    @classmethod
    def make_edge(cls, model: nn.Module, settings: dict[str, Any]) -> EdgeHalf:
        """The edge half around (a copy of) the deployed ``model``; ``settings`` holds every
        setting (injected ones such as a foundation model may be absent on a device)."""
        raise NotImplementedError

    @classmethod
    def make_cloud(cls, model: nn.Module, settings: dict[str, Any]) -> CloudHalf:
        """The cloud half for an edge that deployed ``model``; ``settings`` holds every setting."""
        raise NotImplementedError

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.edge.predict(x)
        upload = self.edge.select(x, logits)
        self.samples_uploaded += uploaded_samples(upload)
        self.bytes_up += payload_bytes(upload)
        update = self.cloud.receive(upload)
        if update is not None:
            self.bytes_down += payload_bytes(update)
            self.edge.apply(update)
        return logits

    def reset(self) -> None:
        self.edge.reset()
        self.cloud.reset()

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        seen = out["samples"]
        out.update(
            samples_uploaded=float(self.samples_uploaded),
            upload_fraction=self.samples_uploaded / seen if seen else 0.0,
            bytes_up=float(self.bytes_up),
            bytes_down=float(self.bytes_down),
        )
        out.update(self.cloud.metrics())
        return out

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["settings"] = {k: v for k, v in self.settings.items() if isinstance(v, (int, float, str, bool, type(None)))}
        return out
