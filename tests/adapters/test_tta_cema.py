"""CEMA against a direct transcription of the official code (chenyaofo/CEMA): the upload
filters' decisions, the TBR layer, the foundation and distillation loss gradients; then
the cloud's rounds, replay, extra steps, byte counts and the former variant's settings."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from bn_models import small_bn_cnn
from torch import nn

from fedsim.adapters import build_adapter
from fedsim.adapters._norm import BatchRenorm, norm_affine_parameters
from fedsim.adapters.cema import (
    CEMA,
    CemaEdgeFilter,
    distillation_loss,
    prepare_model,
    weighted_entropy,
)

C = 10
E0 = 0.4 * math.log(C)


# -- transcription of the official code ----------------------------------------------------
def official_entropy(logits: torch.Tensor) -> torch.Tensor:
    """codebase/criterion/tta.py: entropy(reduction="none")."""
    logits = torch.clamp(logits, min=torch.finfo(logits.dtype).min)
    return -(F.softmax(logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(-1)


class OfficialFilters:
    """codebase/core/tta/cema.py: AverageMetric, EntropyCriterion.filter_out,
    update_model_probs, SimilarityCriterion.filter_out, and CEMA.__init__'s margins
    (``ent_*_margin * math.log(n_class)``)."""

    def __init__(
        self, ent_high: float, ent_low: float | None, warm_up: int | None, coeff: float, d_margin: float | None
    ) -> None:
        self.high = ent_high * math.log(C)
        self.low = None if ent_low is None else ent_low * math.log(C)
        self.warm_up_n = 10**12 if warm_up is None else warm_up
        self.coeff, self.d_margin = coeff, d_margin
        self.n, self.value_sum, self.init, self.init_value = 0, 0.0, False, 0.0
        self.history: torch.Tensor | None = None

    def _threshold(self) -> float:
        if self.init:
            return self.high * ((self.value_sum / self.n) / self.init_value) * self.coeff
        return self.high

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        ents = official_entropy(logits)
        self.n += ents.numel()
        self.value_sum += ents.sum().item()
        if self.n >= self.warm_up_n and not self.init:
            self.init, self.init_value = True, self.value_sum / self.n
        remain = torch.where(ents < self._threshold())[0]
        if self.low is not None:
            remain = remain[torch.where(ents[remain] > self.low)[0]]
        out = logits[remain]
        if self.d_margin is None:
            sim = torch.arange(out.shape[0])
        elif self.history is not None:
            cos = F.cosine_similarity(self.history.unsqueeze(dim=0), out.softmax(1), dim=1)
            sim = torch.where(torch.abs(cos) < self.d_margin)[0]
            if sim.numel():
                self.history = 0.9 * self.history + (1 - 0.9) * out[sim].softmax(1).mean(0)
        else:
            if out.shape[0]:
                self.history = out.softmax(1).mean(0)
            sim = torch.arange(out.shape[0])
        mask = torch.zeros(logits.shape[0], dtype=torch.bool)
        mask[remain[sim]] = True
        return mask


def official_distillation(
    source: torch.Tensor, target: torch.Tensor, e_max: float, alpha: float, beta: float, gamma: float, t: float
) -> torch.Tensor:
    """codebase/criterion/distillation.py: TTADistillationLoss.forward."""
    ent = official_entropy(source)
    ent_loss = ent.mul(1 / torch.exp(ent.clone().detach() - e_max)).mean()
    ce_ent = official_entropy(target)
    ce_coeff = 1 / torch.exp(ce_ent.clone().detach() - e_max)
    kl = (
        F.kl_div(
            F.log_softmax(source / t, dim=-1), F.softmax(target / t, dim=-1), reduction="none", log_target=False
        ).sum(-1)
        * t**2
    )
    ce = F.cross_entropy(source, torch.argmax(target, dim=-1), reduction="none")
    return alpha * ent_loss + beta * kl.mul(ce_coeff).mean() + gamma * ce.mul(ce_coeff).mean()


def official_foundation_loss(outputs: torch.Tensor, e_max: float) -> torch.Tensor:
    """codebase/core/tta/cema.py: CEMA.infer, step 1."""
    ent = official_entropy(outputs)
    return ent.mul(1 / torch.exp(ent.clone().detach() - e_max)).mean()


def tbr_bn_forward_impl(self: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """codebase/core/tta/tbr.py (4-D inputs)."""
    batch_var, batch_mean = torch.var_mean(x, dim=(0, 2, 3), keepdim=True)
    batch_std = torch.sqrt(batch_var + self.eps)
    if self.running_mean is None:
        self.running_mean, self.running_var = batch_mean.clone().detach(), batch_var.clone().detach()
    self.running_mean, self.running_var = self.running_mean.view(1, -1, 1, 1), self.running_var.view(1, -1, 1, 1)
    r = batch_std.detach() / torch.sqrt(self.running_var + self.eps)
    d = (batch_mean.detach() - self.running_mean) / torch.sqrt(self.running_var + self.eps)
    x = ((x - batch_mean) / batch_std) * r + d
    if self.training:
        self.running_mean += self.momentum * (batch_mean.detach() - self.running_mean)
        self.running_var += self.momentum * (batch_var.detach() - self.running_var)
    return self.weight.view(1, -1, 1, 1) * x + self.bias.view(1, -1, 1, 1)


def conv_bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, C),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def official_tbr_model(model: nn.Module) -> nn.Module:
    """prepare_model_for_tent_tta + replace_bn_forward_with(tbr_bn_forward_impl)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.forward = types.MethodType(tbr_bn_forward_impl, m)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


def _batches(n: int, seed: int, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, C, generator=g) * scale * torch.rand(16, 1, generator=g) for _ in range(n)]


# -- equations against the transcription ---------------------------------------------------
@pytest.mark.parametrize(
    "ent_low, warm_up, d_margin",
    [(None, None, 0.05), (0.02, None, 0.4), (None, 40, 0.4), (0.05, 24, None)],
)
def test_filter_decisions_equal_the_official_code(
    ent_low: float | None, warm_up: int | None, d_margin: float | None
) -> None:
    ours = CemaEdgeFilter(
        {
            "upload_all": False,
            "e0_ratio": 0.4,
            "e_min_ratio": ent_low,
            "warmup_samples": warm_up,
            "lam": 0.6,
            "redundancy_margin": d_margin,
            "p_mean_momentum": 0.9,
        }
    )
    official = OfficialFilters(0.4, ent_low, warm_up, 0.6, d_margin)
    kept = 0
    for logits in _batches(8, seed=1):
        expected = official.filter(logits)
        assert torch.equal(ours.select(logits), expected)
        assert ours.e_max == pytest.approx(official._threshold(), rel=1e-6)  # float32 entropies
        kept += int(expected.sum())
        if d_margin is not None and official.history is not None:
            assert torch.allclose(ours.p_mean, official.history, atol=1e-6)
    assert 0 < kept < 8 * 16  # the filters both kept and dropped samples
    if warm_up is not None:
        assert official.init and ours.e_max != pytest.approx(E0)  # the dynamic threshold was exercised


def test_tbr_equals_the_official_forward_gradient_and_statistics() -> None:
    model = conv_bn_cnn()
    ours, official = prepare_model(copy.deepcopy(model), "tbr"), official_tbr_model(model)
    g = torch.Generator().manual_seed(2)
    first = torch.rand(8, 3, 10, 10, generator=g)
    with torch.no_grad():  # the edge's first forward (eval mode) sets the statistics
        assert torch.allclose(ours(first), official(first), atol=1e-5)
    for mode in (True, True, False):
        x = torch.rand(8, 3, 10, 10, generator=g) * 2
        for m in ours.modules():
            if isinstance(m, BatchRenorm):
                m.train(mode)
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
        official.train(mode)
        official.requires_grad_(False)
        bns = [m for m in official.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.requires_grad_(True)
        y_ours, y_off = ours(x), official(x)
        assert torch.allclose(y_ours, y_off, atol=1e-5)
        loss_o, loss_f = official_foundation_loss(y_off, E0), weighted_entropy(y_ours, E0)
        go = torch.autograd.grad(loss_o, [p for m in bns for p in (m.weight, m.bias)])
        gf = torch.autograd.grad(loss_f, list(norm_affine_parameters(ours)))
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(gf, go, strict=True))
        for mine, theirs in zip([m for m in ours.modules() if isinstance(m, BatchRenorm)], bns, strict=True):
            assert torch.allclose(mine.running_mean, theirs.running_mean.flatten(), atol=1e-6)
            assert torch.allclose(mine.running_var, theirs.running_var.flatten(), atol=1e-6)


def test_foundation_and_distillation_gradients_equal_the_official_losses() -> None:
    g = torch.Generator().manual_seed(3)
    student = (torch.randn(24, C, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(24, C, generator=g) * 3
    ours = torch.autograd.grad(weighted_entropy(student, E0), student)[0]
    theirs = torch.autograd.grad(official_foundation_loss(student, E0), student)[0]
    assert torch.allclose(ours, theirs, atol=1e-7, rtol=1e-5)
    for t in (1.0, 2.0):
        ours = torch.autograd.grad(distillation_loss(student, teacher, E0, 3.0, 3.0, 1.0, t, True), student)[0]
        theirs = torch.autograd.grad(official_distillation(student, teacher, E0, 3.0, 3.0, 1.0, t), student)[0]
        assert torch.allclose(ours, theirs, atol=1e-7, rtol=1e-5)
    # teacher_weights=False: the KL and CE terms unweighted (fedsim's former loss)
    plain = distillation_loss(student, teacher, E0, 3.0, 3.0, 1.0, 1.0, False)
    kl = F.kl_div(F.log_softmax(student, 1), F.softmax(teacher, 1), reduction="batchmean")
    expected = 3.0 * weighted_entropy(student, E0) + 3.0 * kl + F.cross_entropy(student, teacher.argmax(1))
    assert torch.allclose(plain, expected, atol=1e-6)


# -- the adapter ---------------------------------------------------------------------------
def _cema(**settings: object) -> CEMA:
    adapter = build_adapter("cema", small_bn_cnn(), foundation=small_bn_cnn(seed=3, width=12), **settings)
    assert isinstance(adapter, CEMA)
    return adapter


def test_official_defaults() -> None:
    cema = _cema()
    s = cema.settings
    assert (s["normalization"], s["teacher_weights"], s["optimizer"], s["lr_edge"], s["lr_foundation"]) == (
        "tbr",
        True,
        "sgd",
        2.5e-3,
        2.5e-4,
    )
    assert (s["e0_ratio"], s["e_min_ratio"], s["warmup_samples"], s["redundancy_margin"], s["cloud_batch"]) == (
        0.4,
        None,
        None,
        0.05,
        32,
    )
    assert (
        s["buffer_size"],
        s["replay_size"],
        s["replay_start"],
        s["extra_replay_size"],
        s["w_ent"],
        s["w_kl"],
        s["w_ce"],
    ) == (10_000, 96, 256, 128, 3.0, 3.0, 1.0)
    opt = cema.cloud.opt_student
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_cloud_rounds_bytes_and_sync() -> None:
    cema = _cema(upload_all=True, extra_replay_size=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 16, 16, generator=g)
    cema.predict_and_adapt(x)
    for _ in range(4):
        cema.predict_and_adapt(torch.rand(16, 3, 16, 16, generator=g))
    m = cema.metrics()
    renorm = [mod for mod in cema.model.modules() if isinstance(mod, BatchRenorm)]
    stats = sum(2 * mod.num_features for mod in renorm)
    affine = sum(p.numel() for p in norm_affine_parameters(cema.model))
    assert m["samples"] == 80 and m["samples_uploaded"] == 80 and m["upload_fraction"] == 1.0
    assert m["cloud_steps"] == 2 and m["extra_steps"] == 0
    assert m["bytes_up"] == 80 * 3 * 16 * 16 + 4 * stats  # uint8 images + the first batch's statistics, once
    assert m["bytes_down"] == 2 * 4 * (affine + stats)  # affine and running statistics after each round
    edge, cloud = cema.model.state_dict(), cema.student.state_dict()
    assert all(torch.equal(edge[k], cloud[k]) for k in edge)  # the edge predicts with the cloud's copy
    source = prepare_model(small_bn_cnn(), "tbr").state_dict()
    assert any(not torch.equal(edge[k], source[k]) for k in edge if "weight" in k)
    cema.reset()
    assert all(torch.equal(cema.model.state_dict()[k], source[k]) for k in source)
    assert cema.metrics()["bytes_up"] == m["bytes_up"]  # counters run on across resets


def test_replay_draws_from_a_history_holding_the_new_uploads_and_extra_steps() -> None:
    cema = _cema(upload_all=True, cloud_batch=32, replay_start=20, replay_size=8, buffer_size=40, extra_replay_size=6)
    sizes: list[int] = []
    cema.student.register_forward_hook(lambda _m, inp, _out: sizes.append(inp[0].shape[0]))
    g = torch.Generator().manual_seed(1)
    budgets = []
    for _ in range(4):
        budgets.append(cema.cloud.upload_budget())
        cema.predict_and_adapt(torch.rand(16, 3, 16, 16, generator=g))
    # 16 stored: nothing; 32 stored: a round on 32 + 8 replayed; 40 (> 20) stored, no round: extra step on 6; then a round
    assert sizes == [40, 6, 40]
    assert budgets == [21, 5, 0, 0]  # the edge reports when a round or the extra step may start
    m = cema.metrics()
    assert m["cloud_steps"] == 2 and m["extra_steps"] == 1 and cema.cloud.stored == 40


def test_former_variant_by_settings() -> None:
    cema = _cema(
        normalization="batch",
        teacher_weights=False,
        optimizer="adam",
        lr_edge=1e-3,
        lr_foundation=1e-3,
        extra_replay_size=0,
    )
    assert isinstance(cema.cloud.opt_student, torch.optim.Adam)
    assert not any(isinstance(m, BatchRenorm) for m in cema.model.modules())
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(
        cema.predict_and_adapt(x), build_adapter("tbn", small_bn_cnn()).predict_and_adapt(x), atol=1e-6
    )
    with pytest.raises(ValueError, match="normalization"):
        _cema(normalization="group")


def test_tbr_edge_inference_skips_nothing_that_matters() -> None:
    """The edge's eval-mode, no-grad forwards after the first (which skip the batch
    statistics) give the official forward's outputs and leave every statistic as it was."""
    model = conv_bn_cnn()
    ours, official = prepare_model(copy.deepcopy(model), "tbr"), official_tbr_model(model)
    official.eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        renorms = [m for m in ours.modules() if isinstance(m, BatchRenorm)]
        assert renorms
        for step in range(3):
            x = torch.rand(8, 3, 10, 10, generator=g) * 3
            before = [(m.running_mean.clone(), m.running_var.clone()) for m in renorms]
            assert torch.allclose(ours(x), official(x), atol=1e-5)
            if step:  # the first forward set the statistics; later ones leave them
                assert all(
                    torch.equal(m.running_mean, a) and torch.equal(m.running_var, b)
                    for m, (a, b) in zip(renorms, before)
                )
