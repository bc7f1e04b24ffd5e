"""BN-based adapters: equations re-computed by hand, online protocol, no labels."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bn_models import small_bn_cnn
from torch import nn

from fedsim.adapters import ADAPTERS, Adapter, adapter_settings, build_adapter
from fedsim.adapters._norm import MixedStatBatchNorm
from fedsim.adapters.unmix_tns import UnMixBatchNorm2d
from fedsim.tta.streams import build_stream


def _bn2d(c: int = 3, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


def _foundation() -> nn.Module:
    return small_bn_cnn(seed=9, width=12)


def _build(name: str, model: nn.Module) -> Adapter:
    return build_adapter(name, model, foundation=_foundation()) if name == "cema" else build_adapter(name, model)


# ------------------------------------------------------------------ alpha-BN / TBN


@pytest.mark.parametrize("moment_matched", [False, True])
def test_alpha_bn_statistics_equal_formula(moment_matched: bool) -> None:
    bn = _bn2d()
    a = 0.3
    layer = MixedStatBatchNorm(bn, a, moment_matched)
    x = torch.randn(4, 3, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 + 1
    y = layer(x)
    for c in range(3):
        v = x[:, c].flatten().double()
        mu_b = v.sum() / v.numel()
        var_b = ((v - mu_b) ** 2).sum() / v.numel()
        mu_s, var_s = bn.running_mean[c].double(), bn.running_var[c].double()
        mu = (1 - a) * mu_s + a * mu_b
        var = (1 - a) * var_s + a * var_b + (a * (1 - a) * (mu_b - mu_s) ** 2 if moment_matched else 0)
        expected = (x[:, c].double() - mu) / torch.sqrt(var + bn.eps) * bn.weight[c] + bn.bias[c]
        assert torch.allclose(y[:, c].double(), expected, atol=1e-5)


def test_alpha_bn_limits_and_batch_size_one() -> None:
    bn = _bn2d()
    x = torch.randn(5, 3, 4, 4)
    assert torch.allclose(MixedStatBatchNorm(bn, 0.0)(x), bn(x), atol=1e-5)
    tbn = F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    assert torch.allclose(MixedStatBatchNorm(bn, 1.0)(x), tbn, atol=1e-5)
    one = x[:1]  # batch size 1: statistics over H*W
    mu_b, var_b = one.mean(dim=(0, 2, 3)), one.var(dim=(0, 2, 3), unbiased=False)
    mu, var = MixedStatBatchNorm(bn, 0.1).statistics(one)
    assert torch.allclose(mu, 0.9 * bn.running_mean + 0.1 * mu_b)
    assert torch.allclose(var, 0.9 * bn.running_var + 0.1 * var_b)
    bn1 = nn.BatchNorm1d(4).eval()  # BatchNorm1d at batch size 1: source statistics
    with torch.no_grad():
        bn1.running_mean.fill_(0.5)
        bn1.running_var.fill_(2.0)
    v = torch.randn(1, 4)
    assert torch.allclose(MixedStatBatchNorm(bn1, 0.5)(v), bn1(v), atol=1e-6)


# ------------------------------------------------------------------ UnMix-TNS


def test_unmix_init_keeps_source_moments_in_expectation() -> None:
    bn = _bn2d(c=4)
    means, variances = [], []
    for seed in range(300):
        layer = UnMixBatchNorm2d(bn, num_components=16, c=0.5, generator=torch.Generator().manual_seed(seed))
        mu_k, var_k = layer.comp_mean.double(), layer.comp_var.double()
        assert torch.allclose(var_k, 0.5 * bn.running_var.double().expand(16, -1))
        means.append(mu_k.mean(0))
        variances.append(var_k.mean(0) + mu_k.var(0, unbiased=False))
    mean, var = torch.stack(means).mean(0), torch.stack(variances).mean(0)
    sigma = bn.running_var.double().sqrt()
    assert torch.all((mean - bn.running_mean.double()).abs() < 0.05 * sigma)
    assert torch.allclose(var, bn.running_var.double(), rtol=0.03)


def test_unmix_mixing_and_update_match_direct_computation() -> None:
    bn = _bn2d(c=3, seed=2)
    k, batch = 4, 3
    layer = UnMixBatchNorm2d(
        bn,
        num_components=k,
        temperature=0.07,
        momentum=0.1,
        max_batch_size=8,
        generator=torch.Generator().manual_seed(0),
    )
    comp_mean, comp_var = layer.comp_mean.clone().double(), layer.comp_var.clone().double()
    x = torch.randn(batch, 3, 2, 3, generator=torch.Generator().manual_seed(5)) * 1.5 + 0.3
    y = layer(x).double()
    xd = x.double()
    m = 1 - (1 - 0.1) ** (batch / 8)
    new_mean, new_var = comp_mean.clone(), comp_var.clone()
    for b in range(batch):
        mu_b = xd[b].mean(dim=(1, 2))
        var_b = ((xd[b] - mu_b[:, None, None]) ** 2).mean(dim=(1, 2))
        cos = torch.stack([torch.dot(mu_b, comp_mean[j]) / (mu_b.norm() * comp_mean[j].norm()) for j in range(k)])
        p = torch.exp(cos / 0.07) / torch.exp(cos / 0.07).sum()
        mu_bk = torch.stack([(1 - p[j]) * comp_mean[j] + p[j] * mu_b for j in range(k)])
        var_bk = torch.stack([(1 - p[j]) * comp_var[j] + p[j] * var_b for j in range(k)])
        mean = mu_bk.mean(0)
        var = var_bk.mean(0) + ((mu_bk - mean) ** 2).mean(0)
        expected = (xd[b] - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps)
        expected = expected * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
        assert torch.allclose(y[b], expected, atol=1e-5)
        for j in range(k):
            new_mean[j] += m * p[j] * (mu_b - comp_mean[j]) / batch
            new_var[j] += m * p[j] * (var_b - comp_var[j]) / batch
    assert torch.allclose(layer.comp_mean.double(), new_mean, atol=1e-5)
    assert torch.allclose(layer.comp_var.double(), new_var, atol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_unmix_paths_match_direct_computation(grad: bool, channels_last: bool) -> None:
    """Both forward paths (with autograd; without, squared deviations in the output buffer)
    on both memory formats, K = 16, against the equations in float64."""
    bn = _bn2d(c=5, seed=3)
    k, batch = 16, 6
    layer = UnMixBatchNorm2d(bn, num_components=k, max_batch_size=8, generator=torch.Generator().manual_seed(1))
    mu_k, var_k = layer.comp_mean.double(), layer.comp_var.double()
    x = torch.randn(batch, 5, 4, 3, generator=torch.Generator().manual_seed(2)) * 1.5 + 0.7
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    xd = x.double()
    mu_b = xd.mean(dim=(2, 3))
    var_b = ((xd - mu_b[:, :, None, None]) ** 2).mean(dim=(2, 3))
    cos = (mu_b / mu_b.norm(dim=1, keepdim=True)) @ (mu_k / mu_k.norm(dim=1, keepdim=True)).t()
    p = torch.softmax(cos / 0.07, dim=1)[:, :, None]  # [B, K, 1]
    mu_bk = (1 - p) * mu_k + p * mu_b[:, None]
    var_bk = (1 - p) * var_k + p * var_b[:, None]
    mean = mu_bk.mean(1)
    var = var_bk.mean(1) + ((mu_bk - mean[:, None]) ** 2).mean(1)
    expected = (xd - mean[:, :, None, None]) / torch.sqrt(var[:, :, None, None] + bn.eps)
    expected = expected * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    m = 1 - 0.9 ** (batch / 8)
    torch.testing.assert_close(
        layer.comp_mean.double(), mu_k + m * (p * (mu_b[:, None] - mu_k)).mean(0), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        layer.comp_var.double(), var_k + m * (p * (var_b[:, None] - var_k)).mean(0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", ["unmix_tns", "unmix_tns_tent", "alpha_bn", "tbn", "tent", "source", "cema"])
def test_batch_size_one_runs(name: str) -> None:
    adapter = _build(name, small_bn_cnn())
    for i in range(3):
        out = adapter.predict_and_adapt(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)))
        assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_unmix_reset_restores_components() -> None:
    adapter = build_adapter("unmix_tns", small_bn_cnn(), num_components=4)
    layer = next(m for m in adapter.model.modules() if isinstance(m, UnMixBatchNorm2d))
    before = layer.comp_mean.clone()
    adapter.predict_and_adapt(torch.rand(8, 3, 16, 16))
    assert not torch.equal(layer.comp_mean, before)
    adapter.reset()
    assert torch.equal(layer.comp_mean, before)


# ------------------------------------------------------------------ Tent and the online protocol


def test_tent_predicts_before_adapting() -> None:
    model = small_bn_cnn()
    tent, tbn = build_adapter("tent", model), build_adapter("tbn", model)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(16, 3, 16, 16, generator=g), torch.rand(16, 3, 16, 16, generator=g)
    assert torch.allclose(tent.predict_and_adapt(x1), tbn.predict_and_adapt(x1), atol=1e-6)
    assert not torch.allclose(tent.predict_and_adapt(x2), tbn.predict_and_adapt(x2), atol=1e-6)
    changed = {n for n, p in tent.model.named_parameters() if not torch.equal(p, dict(tbn.model.named_parameters())[n])}
    assert changed and all(
        isinstance(tent.model.get_submodule(n.rsplit(".", 1)[0]), MixedStatBatchNorm) for n in changed
    )
    tent.reset()
    assert torch.allclose(tent.predict_and_adapt(x1), tbn.predict_and_adapt(x1), atol=1e-6)


def _updated(adapter: Adapter, source: nn.Module) -> set[str]:
    """Names of the parameters one adapted batch changed."""
    adapter.predict_and_adapt(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
    before = dict(source.named_parameters())
    return {n for n, p in adapter.model.named_parameters() if not torch.equal(p, before[n])}


# small_bn_cnn: BatchNorm2d at modules 1 and 5, BatchNorm1d at 10
BN2D_AFFINE = {"1.weight", "1.bias", "5.weight", "5.bias"}
BN1D_AFFINE = {"10.weight", "10.bias"}


@pytest.mark.parametrize(
    ("name", "norm_layers", "expected"),
    [
        ("tent", None, BN2D_AFFINE),  # DequanWang/tent: BatchNorm2d only
        ("tent", "all_bn", BN2D_AFFINE | BN1D_AFFINE),
        ("tent", "all_norm", BN2D_AFFINE | BN1D_AFFINE),
        ("unmix_tns_tent", None, BN2D_AFFINE | BN1D_AFFINE),  # the UnMix-TNS code's Tent: every norm layer
        ("unmix_tns_tent", "bn2d", BN2D_AFFINE),
    ],
)
def test_tent_scope_decides_which_parameters_are_updated(
    name: str, norm_layers: str | None, expected: set[str]
) -> None:
    source = small_bn_cnn()
    kwargs = {} if norm_layers is None else {"norm_layers": norm_layers}
    adapter = build_adapter(name, source, **kwargs)
    assert {n for n, p in adapter.model.named_parameters() if p.requires_grad} == expected
    assert _updated(adapter, source) == expected


def test_unmix_init_follows_the_formula_for_the_given_c() -> None:
    """mu_k = mu_src + sqrt(c K / (K - 1)) sigma_src eps_k, var_k = (1 - c) var_src, with the
    eps of each BatchNorm2d drawn in turn from one generator seeded ``seed``."""
    source = small_bn_cnn()
    k, seed = 4, 7
    for c in (0.5, 0.01, 0.9):
        adapter = build_adapter("unmix_tns", source, num_components=k, c=c, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        for name in ("1", "5"):
            bn = source.get_submodule(name)
            layer = adapter.model.get_submodule(name)
            assert isinstance(layer, UnMixBatchNorm2d) and layer.c == c
            eps = torch.randn(k, bn.num_features, generator=gen).double()
            mu, var = bn.running_mean.double(), bn.running_var.double()
            expected_mean = mu + math.sqrt(c * k / (k - 1)) * var.sqrt() * eps
            torch.testing.assert_close(layer.comp_mean.double(), expected_mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer.comp_var.double(), ((1 - c) * var).expand(k, -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="c must be in"):
        build_adapter("unmix_tns", source, c=1.0)


def test_unmix_predicts_with_components_from_before_the_batch() -> None:
    model = small_bn_cnn()
    a, b = build_adapter("unmix_tns", model), build_adapter("unmix_tns", model)
    x = torch.rand(8, 3, 16, 16)
    for layer in b.model.modules():
        if isinstance(layer, UnMixBatchNorm2d):
            layer.update = False
    assert torch.allclose(a.predict_and_adapt(x), b.predict_and_adapt(x), atol=1e-6)


# ------------------------------------------------------------------ registry, settings, no labels


def test_registry_and_settings() -> None:
    assert set(ADAPTERS.names()) >= {"source", "tbn", "alpha_bn", "unmix_tns", "unmix_tns_tent", "tent", "cema"}
    adapter = build_adapter("alpha_bn", small_bn_cnn(), a=0.25)
    assert adapter.a == 0.25 and adapter.moment_matched is False
    with pytest.raises(TypeError, match="alpah"):
        build_adapter("alpha_bn", small_bn_cnn(), alpah=0.2)
    with pytest.raises(TypeError, match="foundation"):
        build_adapter("cema", small_bn_cnn())
    assert adapter_settings(ADAPTERS.get("tent")) == {"lr": 1e-3, "steps": 1, "norm_layers": "bn2d"}
    assert adapter_settings(ADAPTERS.get("unmix_tns"))["c"] == 0.5
    assert adapter_settings(ADAPTERS.get("unmix_tns_tent"))["norm_layers"] == "all_norm"
    with pytest.raises(ValueError, match="norm_layers"):
        build_adapter("tent", small_bn_cnn(), norm_layers="bn")
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        assert isinstance(cls.needs_grad, bool) and cls.changes and cls.name == name
    assert ADAPTERS.get("unmix_tns_tent").needs_grad and not ADAPTERS.get("cema").needs_grad


@pytest.mark.parametrize("name", ["source", "tbn", "alpha_bn", "unmix_tns", "unmix_tns_tent", "tent", "cema"])
def test_adapters_never_see_labels(name: str) -> None:
    cls = ADAPTERS.get(name)
    assert list(inspect.signature(cls.predict_and_adapt).parameters) == ["self", "x"]
    rng = np.random.default_rng(0)
    images = (rng.random((48, 16, 16, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, 48)
    kw = dict(images=images, batch_size=12, protocol="continual", seed=1)
    s1 = build_stream(["gaussian_noise@3", "fog@2"], labels=labels, **kw)
    s2 = build_stream(["gaussian_noise@3", "fog@2"], labels=rng.permutation(labels), **kw)
    a1, a2 = _build(name, small_bn_cnn()), _build(name, small_bn_cnn())
    for b1, b2 in zip(s1, s2, strict=True):
        assert torch.equal(b1.x, b2.x)
        assert torch.equal(a1.predict_and_adapt(b1.x), a2.predict_and_adapt(b2.x))
    assert not math.isnan(a1.metrics()["samples"])


@pytest.mark.parametrize(
    "a,mm,shape,channels_last",
    [
        (0.1, False, (8, 4, 5, 5), False),
        (0.3, True, (8, 4, 5, 5), False),
        (1.0, False, (8, 4, 5, 5), False),
        (0.1, False, (1, 4, 5, 5), False),
        (0.1, False, (6, 4), False),
        (0.0, False, (6, 4), False),
        (0.1, False, (8, 4, 5, 5), True),
        (0.3, True, (8, 4, 5, 5), True),
        (0.1, False, (1, 4, 5, 5), True),
    ],
)
def test_mixed_stat_bn_fused_path_equals_formula(
    a: float, mm: bool, shape: tuple[int, ...], channels_last: bool
) -> None:
    """The fused forward (no autograd: BN's statistics kernel, then F.batch_norm) gives the
    formula's output, also on a channels-last input (the layout of the benchmark's activations)."""
    from fedsim.adapters._norm import MixedStatBatchNorm

    bn = torch.nn.BatchNorm2d(4) if len(shape) == 4 else torch.nn.BatchNorm1d(4)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    layer = MixedStatBatchNorm(bn, a, moment_matched=mm)
    x = torch.randn(*shape) * 2 + 0.5
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fused = layer(x)
    mu, var = layer.statistics(x)
    view = (1, -1) + (1,) * (x.ndim - 2)
    expected = (x - mu.view(view)) / torch.sqrt(var.view(view) + layer.eps) * layer.weight.view(view) + layer.bias.view(
        view
    )
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_small_bn_cnn_is_deterministic() -> None:
    x = torch.rand(4, 3, 16, 16)
    a, b = small_bn_cnn(1), small_bn_cnn(1)
    assert torch.equal(a(x), b(x))
    assert any(isinstance(m, nn.BatchNorm1d) for m in a.modules())
