"""CEMA (Chen et al., ICLR 2024): cloud-edge elastic model adaptation."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adapters import ADAPTERS
from adapters._norm import MixedStatBatchNorm, entropy, is_batchnorm, norm_affine_parameters, replace_modules
from adapters.base import Adapter


@ADAPTERS.register("cema")
class CEMA(Adapter):
    """CEMA: the edge runs forward only and uploads a filtered subset of its samples; the
    cloud adapts a foundation model and distills it into a copy of the edge model, whose
    normalization affine parameters are sent back.

    Edge, per batch (p = softmax(edge logits), H = entropy(p), E0 = e0_ratio * ln C):

    - unreliable: drop ``H >= E_max``. During the warm-up (the first ``warmup_samples``
      samples since the last reset; a batch starting inside it counts wholly) E_max = E0;
      afterwards ``E_max = E0 * lam * mean_H_all / mean_H_warmup`` with mean_H_all over all
      samples seen since the reset, this batch included.
    - low-informative: drop ``H <= e_min``.
    - redundant: of the rest, drop ``|cos(p_mean, p)| >= redundancy_margin`` (no test
      before p_mean exists). Then ``p_mean <- m p_mean + (1 - m) mean p`` over the uploaded
      samples (m = ``p_mean_momentum``, 0.9; initialised to their mean; unchanged if none),
      as EATA does.
    - upload the rest as uint8 images (C*H*W bytes each). ``upload_all=True`` uploads every
      sample (the full-upload baseline).

    Cloud, each time ``cloud_batch`` (32) new samples are buffered, on those 32:

    - foundation (BN in batch-statistics mode, affine trained, Adam ``lr_foundation``):
      minimise ``mean(w * H_f)``, ``w = exp(E0 - H_f)`` detached;
    - replay: once ``replay_start`` (256) samples are stored, ``replay_size`` (96) stored
      samples drawn uniformly without replacement are added; then the new samples enter the
      FIFO store of ``buffer_size`` (10,000);
    - distill into the edge copy (normalization affine only, Adam ``lr_edge``, ``distill_steps``
      steps) on new + replayed samples with teacher logits t of the updated foundation:
      ``w_ent * mean(exp(E0 - H_s) H_s) + w_kl * T^2 * KL(softmax(t/T) || softmax(s/T))
      + w_ce * CE(s, argmax t)`` (3, 3, 1, T = 1, weights detached);
    - send the copy's normalization affine parameters to the edge (float32, 4 bytes each).

    Unconfirmed settings (defaults chosen here): lam (1.0), warmup_samples (512), the
    optimizers (Adam, lr 1e-3 for both), edge_bn ("batch": the edge's BN uses test-batch
    statistics as in Tent/EATA; "source" keeps running statistics). The margin 0.05 suits
    many classes; with 10 classes probability vectors are rarely that orthogonal (EATA used
    0.4 on CIFAR). Metrics add samples_uploaded, upload_fraction, bytes_up, bytes_down,
    cloud_steps; reset() restores edge, cloud copy and foundation and clears buffers and
    filter statistics, while the counters keep running.

    ``foundation`` (required): the stronger cloud model, same inputs and classes as the edge.

    The two halves are separate objects so they can run on different machines (the edge
    demo, :mod:`fedsim.edge`): :class:`CemaEdgeFilter` (edge: which samples to upload) and
    :class:`CemaCloud` (cloud: buffers, foundation, distillation). This adapter wires them
    in one process; the order of operations is the same in both.
    """

    name = "cema"
    needs_grad = False
    changes = "norm-affine (sent from the cloud)"

    def __init__(
        self,
        model: nn.Module,
        *,
        foundation: nn.Module,
        upload_all: bool = False,
        e0_ratio: float = 0.4,
        e_min: float = 0.02,
        lam: float = 1.0,
        warmup_samples: int = 512,
        redundancy_margin: float = 0.05,
        p_mean_momentum: float = 0.9,
        cloud_batch: int = 32,
        buffer_size: int = 10_000,
        replay_size: int = 96,
        replay_start: int = 256,
        lr_foundation: float = 1e-3,
        lr_edge: float = 1e-3,
        distill_steps: int = 1,
        w_ent: float = 3.0,
        w_kl: float = 3.0,
        w_ce: float = 1.0,
        temperature: float = 1.0,
        edge_bn: str = "batch",
        seed: int = 0,
    ) -> None:
        if edge_bn not in ("batch", "source"):
            raise ValueError("cema: edge_bn must be 'batch' or 'source'")
        if cloud_batch < 1 or buffer_size < 1 or replay_size < 0 or distill_steps < 1 or temperature <= 0:
            raise ValueError("cema: need cloud_batch, buffer_size, distill_steps >= 1, replay_size >= 0, temperature > 0")
        self.upload_all = bool(upload_all)
        self.e0_ratio = float(e0_ratio)
        self.e_min = float(e_min)
        self.lam = float(lam)
        self.warmup_samples = int(warmup_samples)
        self.redundancy_margin = float(redundancy_margin)
        self.p_mean_momentum = float(p_mean_momentum)
        self.cloud_batch = int(cloud_batch)
        self.buffer_size = int(buffer_size)
        self.replay_size = int(replay_size)
        self.replay_start = int(replay_start)
        self.lr_foundation = float(lr_foundation)
        self.lr_edge = float(lr_edge)
        self.distill_steps = int(distill_steps)
        self.w_ent, self.w_kl, self.w_ce = float(w_ent), float(w_kl), float(w_ce)
        self.temperature = float(temperature)
        self.edge_bn = edge_bn
        self.seed = int(seed)
        super().__init__(model)
        self.filter = CemaEdgeFilter({k: getattr(self, k) for k in CemaEdgeFilter.SETTINGS})
        self.cloud = CemaCloud(self, self.model, foundation)
        self.samples_uploaded = 0
        self.bytes_up = 0

    # ------------------------------------------------------------------ preparation
    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        return prepare_edge_model(model, self.edge_bn)

    def reset(self) -> None:
        super().reset()
        self.cloud.reset()
        self.filter.clear()

    # ------------------------------------------------------------------ edge
    def e0(self, num_classes: int) -> float:
        """E0 = e0_ratio * ln C."""
        return self.e0_ratio * math.log(num_classes)

    def entropy_threshold(self) -> float | None:
        """E_max used for the last filtered batch (None before any)."""
        return self.filter.e_max

    @property
    def p_mean(self) -> torch.Tensor | None:
        return self.filter.p_mean

    def upload_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Select the samples of a batch to upload and update the filter state (E_max
        statistics, p_mean). Returns a bool mask [B]."""
        return self.filter.select(logits)

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(x)
        images = self.filter.uploads(x, self.upload_mask(logits))
        if images is not None:
            self.samples_uploaded += int(images.shape[0])
            self.bytes_up += int(images.numel())
            if self.cloud.receive(images):
                copy_affine(self.model, self.cloud.edge_affine())
        return logits

    # ------------------------------------------------------------------ cloud (delegated)
    @property
    def student(self) -> nn.Module:
        return self.cloud.student

    @property
    def foundation(self) -> nn.Module:
        return self.cloud.foundation

    @property
    def cloud_steps(self) -> int:
        return self.cloud.steps

    @property
    def bytes_down(self) -> int:
        return self.cloud.bytes_down

    @property
    def _pending(self) -> list[torch.Tensor]:
        return self.cloud.pending

    @property
    def _stored(self) -> int:
        return self.cloud.stored

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        seen = out["samples"]
        out.update(
            samples_uploaded=float(self.samples_uploaded),
            upload_fraction=self.samples_uploaded / seen if seen else 0.0,
            bytes_up=float(self.bytes_up),
            bytes_down=float(self.bytes_down),
            cloud_steps=float(self.cloud_steps),
        )
        return out


def prepare_edge_model(model: nn.Module, edge_bn: str) -> nn.Module:
    """The edge's forward-only model: BN on test-batch statistics (``edge_bn='batch'``) or
    on its running statistics (``'source'``)."""
    if edge_bn == "batch":
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, a=1.0))
    return model


@torch.no_grad()
def copy_affine(model: nn.Module, params: list[torch.Tensor]) -> None:
    """Write normalization affine parameters (in :func:`norm_affine_parameters` order)."""
    for dst, src in zip(norm_affine_parameters(model), params, strict=True):
        dst.copy_(src)


class CemaEdgeFilter:
    """CEMA's edge side: the entropy and redundancy filters (see :class:`CEMA`).

    Its whole state is a few scalars and ``p_mean``; :meth:`state` / :meth:`load_state`
    carry it between the messages of a deployed edge.
    """

    SETTINGS = ("upload_all", "e0_ratio", "e_min", "lam", "warmup_samples", "redundancy_margin", "p_mean_momentum")
    SCALARS = ("seen", "h_sum", "warm_count", "warm_h_sum")

    def __init__(self, settings: dict[str, Any]) -> None:
        self.upload_all = bool(settings["upload_all"])
        self.e0_ratio = float(settings["e0_ratio"])
        self.e_min = float(settings["e_min"])
        self.lam = float(settings["lam"])
        self.warmup_samples = int(settings["warmup_samples"])
        self.redundancy_margin = float(settings["redundancy_margin"])
        self.p_mean_momentum = float(settings["p_mean_momentum"])
        self.clear()

    def clear(self) -> None:
        self.p_mean: torch.Tensor | None = None
        self.seen = 0  # since the last reset
        self.h_sum = 0.0
        self.warm_count = 0
        self.warm_h_sum = 0.0
        self.e_max: float | None = None

    @torch.no_grad()
    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool mask [B] of the samples to upload; updates E_max statistics and p_mean."""
        s = self
        probs = torch.softmax(logits.float(), dim=1)
        h = entropy(logits.float())
        b, num_classes = probs.shape
        if s.upload_all:
            return torch.ones(b, dtype=torch.bool, device=logits.device)
        e0 = s.e0_ratio * math.log(num_classes)
        in_warmup = self.warm_count < s.warmup_samples
        self.seen += b
        self.h_sum += float(h.sum())
        if in_warmup:
            self.warm_count += b
            self.warm_h_sum += float(h.sum())
            e_max = e0
        else:
            mean_all = self.h_sum / self.seen
            mean_warm = self.warm_h_sum / max(self.warm_count, 1)
            e_max = e0 * s.lam * mean_all / max(mean_warm, 1e-12)
        self.e_max = e_max
        mask = (h < e_max) & (h > s.e_min)
        if self.p_mean is not None:
            cos = F.cosine_similarity(probs, self.p_mean.unsqueeze(0), dim=1)
            mask &= cos.abs() < s.redundancy_margin
        if mask.any():
            chosen = probs[mask].mean(dim=0)
            if self.p_mean is None:
                self.p_mean = chosen
            else:
                self.p_mean = s.p_mean_momentum * self.p_mean + (1 - s.p_mean_momentum) * chosen
        return mask

    @staticmethod
    def uploads(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The selected images as uint8 [n, C, H, W] (C*H*W bytes each), or None."""
        if not mask.any():
            return None
        return torch.round(x[mask].clamp(0, 1) * 255).to(torch.uint8).cpu()

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.SCALARS}
        out["e_max"] = self.e_max
        out["p_mean"] = None if self.p_mean is None else self.p_mean.detach().cpu().numpy()
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        self.seen, self.warm_count = int(state["seen"]), int(state["warm_count"])
        self.h_sum, self.warm_h_sum = float(state["h_sum"]), float(state["warm_h_sum"])
        self.e_max = None if state.get("e_max") is None else float(state["e_max"])
        p = state.get("p_mean")
        self.p_mean = None if p is None else torch.as_tensor(p)


class CemaCloud:
    """CEMA's cloud side for one edge: upload buffer, replay store, foundation model and
    the student copy of the edge model it distills into (see :class:`CEMA`)."""

    def __init__(self, settings: CEMA, edge_model: nn.Module, foundation: nn.Module) -> None:
        self.s = settings
        self.student = copy.deepcopy(edge_model)
        self._student_params = list(norm_affine_parameters(self.student))
        for p in self._student_params:
            p.requires_grad_(True)
        self.device = next(iter(self._student_params)).device if self._student_params else torch.device("cpu")
        self.foundation = self._prepare_foundation(copy.deepcopy(foundation))
        self._foundation_params = [p for p in self.foundation.parameters() if p.requires_grad]
        if not self._student_params or not self._foundation_params:
            raise ValueError("cema: edge and foundation models need normalization affine parameters")
        self._source = (copy.deepcopy(self.student.state_dict()), copy.deepcopy(self.foundation.state_dict()))
        self.sync_bytes = 4 * sum(p.numel() for p in self._student_params)
        self.steps = 0
        self.bytes_down = 0
        self._clear()

    def _prepare_foundation(self, model: nn.Module) -> nn.Module:
        model.eval()
        model.requires_grad_(False)
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, a=1.0))
        for p in norm_affine_parameters(model):
            p.requires_grad_(True)
        return model.to(self.device)

    def _clear(self) -> None:
        s = self.s
        self.opt_foundation = torch.optim.Adam(self._foundation_params, lr=s.lr_foundation)
        self.opt_student = torch.optim.Adam(self._student_params, lr=s.lr_edge)
        self.rng = np.random.default_rng(s.seed)
        self.pending: list[torch.Tensor] = []  # uint8 [C, H, W]
        self._store: torch.Tensor | None = None  # uint8 [buffer_size, C, H, W], FIFO ring
        self.stored = 0
        self._next = 0

    def reset(self) -> None:
        """Back to the source student and foundation; buffers cleared, counters kept."""
        self.student.load_state_dict(self._source[0])
        self.foundation.load_state_dict(self._source[1])
        self._clear()

    def needed(self) -> int:
        """Samples still missing before the next cloud round."""
        return self.s.cloud_batch - len(self.pending)

    def receive(self, images: torch.Tensor) -> bool:
        """Buffer uploaded uint8 images [n, C, H, W]; run a cloud round per full
        ``cloud_batch``. Returns whether the edge's affine parameters changed."""
        self.pending.extend(images.unbind(0))
        stepped = False
        while len(self.pending) >= self.s.cloud_batch:
            batch = torch.stack(self.pending[: self.s.cloud_batch])
            del self.pending[: self.s.cloud_batch]
            self._step(batch)
            self.bytes_down += self.sync_bytes  # sent after every round, as in the paper
            stepped = True
        return stepped

    def edge_affine(self) -> list[torch.Tensor]:
        """The parameters sent to the edge (float32, ``sync_bytes`` per round)."""
        return [p.detach() for p in self._student_params]

    def _replay(self, count: int) -> torch.Tensor | None:
        if self._store is None or self.stored < self.s.replay_start or count == 0:
            return None
        idx = self.rng.choice(self.stored, size=min(count, self.stored), replace=False)
        return self._store[torch.from_numpy(idx)]

    def _store_samples(self, images: torch.Tensor) -> None:
        if self._store is None:
            self._store = torch.empty((self.s.buffer_size, *images.shape[1:]), dtype=torch.uint8)
        for img in images:
            self._store[self._next] = img
            self._next = (self._next + 1) % self.s.buffer_size
            self.stored = min(self.stored + 1, self.s.buffer_size)

    def _step(self, new: torch.Tensor) -> None:
        """One cloud round on ``cloud_batch`` new uint8 samples (see :class:`CEMA`)."""
        s, device = self.s, self.device
        x_new = new.to(device).float() / 255.0
        with torch.enable_grad():
            logits_f = self.foundation(x_new)
            e0 = s.e0(logits_f.shape[1])
            h_f = entropy(logits_f)
            loss_f = (torch.exp(e0 - h_f).detach() * h_f).mean()
            self.opt_foundation.zero_grad(set_to_none=True)
            loss_f.backward()
            self.opt_foundation.step()
        replay = self._replay(s.replay_size)
        self._store_samples(new)
        x_all = x_new if replay is None else torch.cat([x_new, replay.to(device).float() / 255.0])
        with torch.no_grad():
            teacher = self.foundation(x_all)
        t = s.temperature
        with torch.enable_grad():
            for _ in range(s.distill_steps):
                student = self.student(x_all)
                h_s = entropy(student)
                ent = (torch.exp(e0 - h_s).detach() * h_s).mean()
                kl = F.kl_div(
                    F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True
                )
                ce = F.cross_entropy(student, teacher.argmax(dim=1))
                loss = s.w_ent * ent + s.w_kl * t * t * kl + s.w_ce * ce
                self.opt_student.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_student.step()
        self.steps += 1
