"""CEMA (Chen et al., ICLR 2024): cloud-edge elastic model adaptation, as a split adapter."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.adapters import ADAPTERS
from fedsim.adapters._norm import (
    BatchRenorm,
    MixedStatBatchNorm,
    entropy,
    is_batchnorm,
    norm_affine_parameters,
    replace_modules,
)
from fedsim.adapters.base import CloudHalf, EdgeHalf, Payload, SplitAdapter

NORMALIZATIONS = ("tbr", "batch", "source")
OPTIMIZERS = ("sgd", "adam")


@ADAPTERS.register("cema")
class CEMA(SplitAdapter):
    """CEMA: the edge runs forward only and uploads a filtered subset of its samples; the
    cloud adapts a foundation model and distills it into a copy of the edge model, whose
    normalization layers it sends back. By default this follows the official code
    (chenyaofo/CEMA: ``codebase/core/tta/cema.py``, ``codebase/criterion/distillation.py``,
    ``codebase/core/tta/tbr.py``, ``conf/cema.conf``); each setting below names its official
    value, and the variant fedsim ran before is reachable by settings (end of this docstring).

    Normalization (``normalization``, official ``is_tbr: true`` -> ``"tbr"``): every BatchNorm
    of the edge model, its cloud copy and the foundation becomes :class:`~fedsim.adapters._norm.BatchRenorm`:
    forward with running statistics set from the first batch the layer sees and moved
    (momentum 0.1) only while the model trains in the cloud. The edge's first batch sets the
    edge model's statistics; the edge uploads them once (float32) so the cloud copy starts
    from the same ones, as the official code's shared model does. ``"batch"``: test-batch
    statistics everywhere (fedsim's former default); ``"source"``: the edge model keeps its
    source running statistics, the foundation uses test-batch statistics.

    Edge, per batch (p = softmax(edge logits), H = entropy, E0 = ``e0_ratio`` * ln C):

    - unreliable: drop ``H >= E_max``. E_max = E0 (official ``ent_high_margin: 0.4``,
      ``warm_up_batch_size: null``). With ``warmup_samples`` set: from the batch that brings
      the samples seen to ``warmup_samples`` on, ``E_max = E0 * lam * mean_H_all / mean_H_warm``
      with mean_H_warm the mean over the samples seen up to that batch and mean_H_all over all
      seen, this batch included (official ``AverageMetric``; ``lam`` = ``ent_high_margin_coeff``, 0.6).
    - low-informative: drop ``H <= e_min_ratio * ln C`` (official ``ent_low_margin: null``: off).
    - redundant: of the rest, drop ``|cos(p_mean, p)| >= redundancy_margin`` (official
      ``d_margin: 0.05``; None: off; no test before p_mean exists). Then
      ``p_mean <- m p_mean + (1 - m) mean p`` over the samples kept (m = ``p_mean_momentum``,
      0.9 in the official ``update_model_probs``; initialised to their mean).
    - upload the rest as uint8 images (C*H*W bytes each). ``upload_all=True`` uploads every
      sample (the full-upload baseline; not an official setting).

    Cloud, per edge batch: the uploads enter the pending buffer and the history (FIFO,
    ``buffer_size`` 10,000 = ``replay_buffer_size``; 0 turns replay off); so replay draws
    from a history that already holds this batch's uploads. Then, for each full
    ``cloud_batch`` (32 = ``batch_size``) of pending samples, a round:

    - foundation (normalization layers in training mode, affine trained): minimise
      ``mean(exp(E0 - H_f) * H_f)``, weight detached, one step;
    - distill into the edge copy (normalization affine only, training mode), teacher logits
      t from the foundation in eval mode, on the 32 new samples plus ``replay_size`` (96 =
      3 * batch_size) drawn uniformly without replacement from the history once it holds
      ``replay_start`` (256) samples, ``distill_steps`` (1) steps of :func:`distillation_loss`
      (``w_ent``, ``w_kl``, ``w_ce`` = alpha 3, beta 3, gamma 1; ``temperature`` 1; E_max = E0);
    - optimizers: SGD momentum 0.9 (``optimizer: "sgd"``), ``lr_foundation`` 2.5e-4
      (``t_tta_lr``), ``lr_edge`` 2.5e-3 (``s_tta_lr``); ``"adam"`` is fedsim's former choice.

    A batch that runs no round while the history holds more than ``replay_start`` samples
    runs one distillation step on ``extra_replay_size`` (128 = 4 * batch_size; 0: off)
    history samples. In the official code the edge and its cloud copy are one object, so
    during the edge's first 9 batches (which put it in eval mode) that step leaves the
    running statistics unchanged; this is reproduced. After every round or extra step the
    cloud sends the copy's normalization affine parameters and (``"tbr"``) running
    statistics (float32), and the edge predicts with them from its next batch on (official
    ``K: 1``). Replay draws use NumPy's generator seeded by ``seed`` (the official code uses
    Python's ``random``). Uploads are uint8 (official: float tensors in memory).

    Metrics: samples_uploaded, upload_fraction, bytes_up, bytes_down, cloud_steps (rounds),
    extra_steps. reset() restores edge, cloud copy and foundation and clears buffers and
    filter statistics; counters keep running.

    fedsim's former variant: ``normalization: batch, teacher_weights: false, optimizer: adam,
    lr_foundation: 1e-3, lr_edge: 1e-3, extra_replay_size: 0, warmup_samples: 512, lam: 1.0,
    e_min_ratio: 0.0087`` (its replay drew from the history before the new uploads; that
    order is not kept).

    ``foundation`` (required): the stronger cloud model, same inputs and classes as the edge.
    """

    name = "cema"
    needs_grad = False
    changes = "norm-affine and norm statistics (sent from the cloud)"

    def __init__(
        self,
        model: nn.Module,
        *,
        foundation: nn.Module,
        upload_all: bool = False,
        e0_ratio: float = 0.4,
        e_min_ratio: float | None = None,
        warmup_samples: int | None = None,
        lam: float = 0.6,
        redundancy_margin: float | None = 0.05,
        p_mean_momentum: float = 0.9,
        cloud_batch: int = 32,
        buffer_size: int = 10_000,
        replay_size: int = 96,
        replay_start: int = 256,
        extra_replay_size: int = 128,
        optimizer: str = "sgd",
        lr_foundation: float = 2.5e-4,
        lr_edge: float = 2.5e-3,
        distill_steps: int = 1,
        w_ent: float = 3.0,
        w_kl: float = 3.0,
        w_ce: float = 1.0,
        temperature: float = 1.0,
        teacher_weights: bool = True,
        normalization: str = "tbr",
        seed: int = 0,
    ) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"cema: normalization must be one of {', '.join(NORMALIZATIONS)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"cema: optimizer must be one of {', '.join(OPTIMIZERS)}")
        if (
            cloud_batch < 1
            or buffer_size < 0
            or replay_size < 0
            or extra_replay_size < 0
            or distill_steps < 1
            or temperature <= 0
        ):
            raise ValueError(
                "cema: need cloud_batch, distill_steps >= 1, buffer_size, replay_size, extra_replay_size >= 0, temperature > 0"
            )
        settings = dict(locals())
        for k in ("self", "model", "__class__"):
            settings.pop(k, None)
        for k, v in settings.items():
            if k != "foundation":
                setattr(self, k, v)
        super().__init__(model, settings)

    @classmethod
    def make_edge(cls, model: nn.Module, settings: dict[str, Any]) -> CemaEdge:
        return CemaEdge(model, settings)

    @classmethod
    def make_cloud(cls, model: nn.Module, settings: dict[str, Any]) -> CemaCloud:
        return CemaCloud(model, settings["foundation"], settings)

    # views used by tests and benchmarks
    @property
    def filter(self) -> CemaEdgeFilter:
        assert isinstance(self.edge, CemaEdge)
        return self.edge.filter

    @property
    def student(self) -> nn.Module:
        assert isinstance(self.cloud, CemaCloud)
        return self.cloud.student

    @property
    def foundation(self) -> nn.Module:
        assert isinstance(self.cloud, CemaCloud)
        return self.cloud.foundation

    def upload_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Select the samples of a batch to upload and update the filter state. Bool mask [B]."""
        return self.filter.select(logits)

    def entropy_threshold(self) -> float | None:
        """E_max used for the last filtered batch (None before any)."""
        return self.filter.e_max


# -- the equations -------------------------------------------------------------------------
def weighted_entropy(logits: torch.Tensor, e_max: float) -> torch.Tensor:
    """``mean(exp(E_max - H) * H)``, the weight detached (official ``coeff = 1 / exp(H - E_max)``)."""
    h = entropy(logits)
    return (torch.exp(e_max - h.detach()) * h).mean()


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    e_max: float,
    w_ent: float,
    w_kl: float,
    w_ce: float,
    temperature: float,
    teacher_weights: bool,
) -> torch.Tensor:
    """CEMA's distillation loss (official ``TTADistillationLoss.forward``)::

        w_ent * mean(exp(E_max - H_s) H_s)
        + w_kl * T^2 * mean(u * KL(softmax(t/T) || softmax(s/T)))
        + w_ce * mean(u * CE(s, argmax t)),   u = exp(E_max - H_t)

    every weight detached; ``teacher_weights=False`` sets u = 1.
    """
    t = temperature
    u = (
        torch.exp(e_max - entropy(teacher).detach())
        if teacher_weights
        else torch.ones(teacher.shape[0], device=teacher.device)
    )
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="none").sum(1)
    ce = F.cross_entropy(student, teacher.argmax(dim=1), reduction="none")
    return w_ent * weighted_entropy(student, e_max) + w_kl * t * t * (u * kl).mean() + w_ce * (u * ce).mean()


# -- model preparation ---------------------------------------------------------------------
def prepare_model(model: nn.Module, normalization: str, foundation: bool = False) -> nn.Module:
    """Eval mode, no gradients, BatchNorms replaced as ``normalization`` says (``"source"``
    keeps them for the edge model, uses test-batch statistics for the foundation)."""
    if normalization == "tbr":
        replace_modules(model, is_batchnorm, BatchRenorm)
    elif normalization == "batch" or foundation:
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, a=1.0))
    model.eval()  # after the replacement: new modules start in training mode
    model.requires_grad_(False)
    return model


def _renorms(model: nn.Module) -> list[BatchRenorm]:
    return [m for m in model.modules() if isinstance(m, BatchRenorm)]


def _set_renorm_training(model: nn.Module, mode: bool) -> None:
    for m in _renorms(model):
        m.train(mode)


def model_update(model: nn.Module) -> Payload:
    """What the cloud sends the edge: normalization affine parameters and BatchRenorm running
    statistics (float32), named as in the model's state_dict."""
    wanted = {id(p) for p in norm_affine_parameters(model)}
    for m in _renorms(model):
        wanted.update((id(m.running_mean), id(m.running_var)))
    state = model.state_dict(keep_vars=True)
    return {k: v.detach().float().cpu().clone() for k, v in state.items() if id(v) in wanted}


@torch.no_grad()
def apply_update(model: nn.Module, update: Payload) -> None:
    state = model.state_dict()
    for k, v in update.items():
        state[k].copy_(v)


def _norm_statistics(model: nn.Module) -> torch.Tensor:
    """Every BatchRenorm's running mean and variance, concatenated (float32)."""
    return torch.cat([torch.cat([m.running_mean, m.running_var]) for m in _renorms(model)]).float().cpu()


@torch.no_grad()
def _load_norm_statistics(model: nn.Module, flat: torch.Tensor) -> None:
    at = 0
    for m in _renorms(model):
        c = m.num_features
        m.running_mean.copy_(flat[at : at + c])
        m.running_var.copy_(flat[at + c : at + 2 * c])
        m.initialized.fill_(True)
        at += 2 * c


# -- the edge half -------------------------------------------------------------------------
class CemaEdgeFilter:
    """CEMA's upload filters (see :class:`CEMA`; official ``EntropyCriterion`` and
    ``SimilarityCriterion``). Its state is a few scalars and ``p_mean``."""

    SCALARS = ("seen", "h_sum", "warm_h_mean", "e_max")

    def __init__(self, settings: dict[str, Any]) -> None:
        self.upload_all = bool(settings["upload_all"])
        self.e0_ratio = float(settings["e0_ratio"])
        self.e_min_ratio = settings["e_min_ratio"]
        self.warmup_samples = settings["warmup_samples"]
        self.lam = float(settings["lam"])
        self.redundancy_margin = settings["redundancy_margin"]
        self.p_mean_momentum = float(settings["p_mean_momentum"])
        self.clear()

    def clear(self) -> None:
        self.p_mean: torch.Tensor | None = None
        self.seen = 0  # since the last reset
        self.h_sum = 0.0
        self.warm_h_mean: float | None = None
        self.e_max: float | None = None

    @torch.no_grad()
    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool mask [B] of the samples to upload; updates the entropy statistics and p_mean."""
        logits = logits.float()
        b, num_classes = logits.shape
        if self.upload_all:
            return torch.ones(b, dtype=torch.bool, device=logits.device)
        h = entropy(logits)
        e0 = self.e0_ratio * math.log(num_classes)
        self.seen += b
        self.h_sum += float(h.sum())
        if self.warmup_samples is not None and self.warm_h_mean is None and self.seen >= self.warmup_samples:
            self.warm_h_mean = self.h_sum / self.seen
        if self.warm_h_mean is not None:
            self.e_max = e0 * (self.h_sum / self.seen / self.warm_h_mean) * self.lam
        else:
            self.e_max = e0
        mask = h < self.e_max
        if self.e_min_ratio is not None:
            mask &= h > self.e_min_ratio * math.log(num_classes)
        if self.redundancy_margin is not None:
            probs = torch.softmax(logits, dim=1)
            if self.p_mean is not None:
                cos = F.cosine_similarity(self.p_mean.unsqueeze(0), probs, dim=1)
                mask &= cos.abs() < self.redundancy_margin
            if mask.any():
                chosen = probs[mask].mean(dim=0)
                m = self.p_mean_momentum
                self.p_mean = chosen if self.p_mean is None else m * self.p_mean + (1 - m) * chosen
        return mask

    def state(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.SCALARS}, "p_mean": self.p_mean}

    def load_state(self, state: dict[str, Any]) -> None:
        for k in self.SCALARS:
            setattr(self, k, state[k])
        self.p_mean = state["p_mean"]


class CemaEdge(EdgeHalf):
    """CEMA on the device: forward with the latest model the cloud sent, filter, upload."""

    def __init__(self, model: nn.Module, settings: dict[str, Any]) -> None:
        self.model = prepare_model(copy.deepcopy(model), settings["normalization"])
        self._source = copy.deepcopy(self.model.state_dict())
        self.filter = CemaEdgeFilter(settings)
        self.stats_sent = False

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def select(self, x: torch.Tensor, logits: torch.Tensor) -> Payload | None:
        mask = self.filter.select(logits)
        out: Payload = {}
        if mask.any():
            out["images"] = torch.round(x[mask].clamp(0, 1) * 255).to(torch.uint8).cpu()
        if _renorms(self.model) and not self.stats_sent:  # the first forward set them
            out["norm_statistics"] = _norm_statistics(self.model)
            self.stats_sent = True
        return out or None

    def apply(self, update: Payload) -> None:
        apply_update(self.model, update)

    def reset(self) -> None:
        self.model.load_state_dict(self._source)
        self.filter.clear()
        self.stats_sent = False

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "filter": self.filter.state(), "stats_sent": self.stats_sent}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.filter.load_state(state["filter"])
        self.stats_sent = bool(state["stats_sent"])


# -- the cloud half ------------------------------------------------------------------------
class CemaCloud(CloudHalf):
    """CEMA's cloud for one edge: pending uploads, history, foundation model and the copy of
    the edge model it distills into (see :class:`CEMA`)."""

    EDGE_EVAL_BATCHES = 9  # official ``infer``: ``iters < 10`` puts the shared edge model in eval mode

    def __init__(self, edge_model: nn.Module, foundation: nn.Module, settings: dict[str, Any]) -> None:
        self.s = dict(settings)
        norm = self.s["normalization"]
        self.student = prepare_model(copy.deepcopy(edge_model), norm)
        self._student_params = list(norm_affine_parameters(self.student))
        self.device = next(iter(self._student_params)).device if self._student_params else torch.device("cpu")
        self.foundation = prepare_model(copy.deepcopy(foundation), norm, foundation=True).to(self.device)
        self._foundation_params = list(norm_affine_parameters(self.foundation))
        if not self._student_params or not self._foundation_params:
            raise ValueError("cema: edge and foundation models need normalization affine parameters")
        for p in [*self._student_params, *self._foundation_params]:
            p.requires_grad_(True)
        self._source = (copy.deepcopy(self.student.state_dict()), copy.deepcopy(self.foundation.state_dict()))
        self.steps = 0
        self.extra_steps = 0
        self._clear()

    def _optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        if self.s["optimizer"] == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.Adam(params, lr=lr)

    def _clear(self) -> None:
        self.opt_foundation = self._optimizer(self._foundation_params, float(self.s["lr_foundation"]))
        self.opt_student = self._optimizer(self._student_params, float(self.s["lr_edge"]))
        self.rng = np.random.default_rng(int(self.s["seed"]))
        self.pending: list[torch.Tensor] = []  # uint8 [C, H, W]
        self._store: torch.Tensor | None = None  # uint8 [buffer_size, C, H, W], FIFO ring
        self.stored = 0
        self._next = 0
        self.batches = 0

    def reset(self) -> None:
        self.student.load_state_dict(self._source[0])
        self.foundation.load_state_dict(self._source[1])
        self._clear()

    def metrics(self) -> dict[str, float]:
        return {"cloud_steps": float(self.steps), "extra_steps": float(self.extra_steps)}

    def _extra_active(self) -> bool:
        return self.s["buffer_size"] > 0 and self.s["extra_replay_size"] > 0 and self.stored > self.s["replay_start"]

    def upload_budget(self) -> int:
        if self._extra_active():
            return 0  # every batch changes the edge's model
        need = self.s["cloud_batch"] - len(self.pending)
        if self.s["buffer_size"] > 0 and self.s["extra_replay_size"] > 0:
            need = min(need, self.s["replay_start"] + 1 - self.stored)
        return need

    def receive(self, upload: Payload | None) -> Payload | None:
        self.batches += 1
        upload = upload or {}
        if "norm_statistics" in upload:
            _load_norm_statistics(self.student, upload["norm_statistics"].to(self.device))
        images = upload.get("images")
        if images is not None:
            self.pending.extend(images.unbind(0))
            self._store_samples(images)
        changed = False
        while len(self.pending) >= self.s["cloud_batch"]:
            batch = torch.stack(self.pending[: self.s["cloud_batch"]])
            del self.pending[: self.s["cloud_batch"]]
            self._round(batch)
            changed = True
        if not changed and self._extra_active():
            self._extra_step()
            changed = True
        return model_update(self.student) if changed else None

    def _e0(self, logits: torch.Tensor) -> float:
        return float(self.s["e0_ratio"]) * math.log(logits.shape[1])

    def _distill(self, x: torch.Tensor, student_training: bool) -> None:
        s = self.s
        _set_renorm_training(self.foundation, False)
        with torch.no_grad():
            teacher = self.foundation(x)
        _set_renorm_training(self.student, student_training)
        with torch.enable_grad():
            for _ in range(int(s["distill_steps"])):
                loss = distillation_loss(
                    self.student(x),
                    teacher,
                    self._e0(teacher),
                    s["w_ent"],
                    s["w_kl"],
                    s["w_ce"],
                    s["temperature"],
                    s["teacher_weights"],
                )
                self.opt_student.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_student.step()
        _set_renorm_training(self.student, False)

    def _round(self, new: torch.Tensor) -> None:
        """One cloud round on ``cloud_batch`` new uint8 samples (see :class:`CEMA`)."""
        x_new = new.to(self.device).float() / 255.0
        _set_renorm_training(self.foundation, True)
        with torch.enable_grad():
            logits_f = self.foundation(x_new)
            loss_f = weighted_entropy(logits_f, self._e0(logits_f))
            self.opt_foundation.zero_grad(set_to_none=True)
            loss_f.backward()
            self.opt_foundation.step()
        replay = self._replay(int(self.s["replay_size"])) if self.stored >= self.s["replay_start"] else None
        x_all = x_new if replay is None else torch.cat([x_new, replay.to(self.device).float() / 255.0])
        self._distill(x_all, True)
        self.steps += 1

    def _extra_step(self) -> None:
        replay = self._replay(int(self.s["extra_replay_size"]))
        assert replay is not None
        # the official edge model shares the object: its first 9 forwards leave it in eval mode
        self._distill(replay.to(self.device).float() / 255.0, self.steps > 0 and self.batches > self.EDGE_EVAL_BATCHES)
        self.extra_steps += 1

    def _replay(self, count: int) -> torch.Tensor | None:
        if self._store is None or self.stored == 0 or count == 0:
            return None
        idx = self.rng.choice(self.stored, size=min(count, self.stored), replace=False)
        return self._store[torch.from_numpy(idx)]

    def _store_samples(self, images: torch.Tensor) -> None:
        size = int(self.s["buffer_size"])
        if size == 0:
            return
        if self._store is None:
            self._store = torch.empty((size, *images.shape[1:]), dtype=torch.uint8)
        for img in images:
            self._store[self._next] = img
            self._next = (self._next + 1) % size
            self.stored = min(self.stored + 1, size)
