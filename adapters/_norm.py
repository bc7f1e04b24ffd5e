"""Normalization layers and helpers shared by the BN-based adapters."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """[C] -> [1, C, 1, ...] broadcastable against an input with ``ndim`` dims."""
    return t.view(1, -1, *([1] * (ndim - 2)))


class AdaptiveNorm(nn.Module):
    """Base of the adapters' normalization layers: per-channel ``weight`` and ``bias``
    (nn.Parameter or None) applied after normalizing."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None


class MixedStatBatchNorm(AdaptiveNorm):
    """Batch normalization with a mix of source and current-batch statistics.

    Per channel, with a the weight on the test batch::

        mu  = (1 - a) * mu_src  + a * mu_batch
        var = (1 - a) * var_src + a * var_batch [+ a * (1 - a) * (mu_batch - mu_src)^2]
        y   = (x - mu) / sqrt(var + eps) * weight + bias

    Batch statistics are over every dimension but the channel (N, H, W for BatchNorm2d, so a
    single image uses its H*W positions); the variance is the biased one, as BatchNorm uses
    in training mode. a = 0 is the source model, a = 1 test-batch normalization (TBN). The
    bracketed term (``moment_matched``) is the variance of the two-component mixture.
    When a layer sees fewer than two values per channel (BatchNorm1d on a batch of one),
    batch statistics are undefined and the source statistics are used (a = 0 for that call).
    Gradients flow through the batch statistics (as in BatchNorm's training mode).
    """

    def __init__(self, bn: _BatchNorm, a: float, moment_matched: bool = False) -> None:
        super().__init__()
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"a must be in [0, 1], got {a}")
        has_stats = bn.running_mean is not None and bn.running_var is not None
        if not has_stats and a < 1.0:
            raise ValueError("a BatchNorm without running statistics can only use a = 1")
        self.a = float(a)
        self.moment_matched = bool(moment_matched)
        self.eps = bn.eps
        self.num_features = bn.num_features
        c = bn.num_features
        mean = bn.running_mean.detach().clone() if has_stats else torch.zeros(c)
        var = bn.running_var.detach().clone() if has_stats else torch.ones(c)
        self.register_buffer("source_mean", mean)
        self.register_buffer("source_var", var)
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.affine else None

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (mean, var) per channel this layer normalizes ``x`` with."""
        dims = [0, *range(2, x.ndim)]
        count = x.numel() // x.shape[1]
        if self.a == 0.0 or count < 2:
            return self.source_mean, self.source_var
        mu_b = x.mean(dim=dims)
        var_b = x.var(dim=dims, unbiased=False)
        return self._mix(mu_b, var_b)

    def _mix(self, mu_b: torch.Tensor, var_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.a
        mu = torch.lerp(self.source_mean, mu_b, a)
        var = torch.lerp(self.source_var, var_b, a)
        if self.moment_matched:
            shift = mu_b - self.source_mean
            var = torch.addcmul(var, shift, shift, value=a * (1 - a))
        return mu, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fused F.batch_norm wherever it computes the same thing: a plain x.var over
        # (N, H, W) plus four elementwise passes made alpha-BN 3x the cost of inference.
        count = x.numel() // x.shape[1]
        if self.a == 0.0 or count < 2:
            return F.batch_norm(x, self.source_mean, self.source_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.a == 1.0 and not self.moment_matched:  # TBN; gradients flow as in training mode
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if not torch.is_grad_enabled():
            # batch mean and biased variance in BN's own statistics kernel, without writing
            # a normalized copy of x (a fresh x-sized tensor costs about as much as a pass)
            mu_b, var_b = torch.batch_norm_update_stats(x, None, None, 0.0)
            mu, var = self._mix(mu_b, var_b)
            return F.batch_norm(x, mu, var, self.weight, self.bias, False, 0.0, self.eps)
        mu, var = self.statistics(x)
        y = (x - _channel_view(mu, x.ndim)) * _channel_view(torch.rsqrt(var + self.eps), x.ndim)
        if self.weight is not None and self.bias is not None:
            y = y * _channel_view(self.weight, x.ndim) + _channel_view(self.bias, x.ndim)
        return y


def replace_modules(
    model: nn.Module, match: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
) -> int:
    """Replace (in place, recursively) every submodule for which ``match`` holds by ``make(it)``.

    Returns the number replaced. The root module itself is never replaced.
    """
    count = 0
    for name, child in list(model.named_children()):
        if match(child):
            setattr(model, name, make(child))
            count += 1
        else:
            count += replace_modules(child, match, make)
    return count


def is_batchnorm(module: nn.Module) -> bool:
    """nn.BatchNorm1d/2d/3d (and SyncBatchNorm), not the adapters' replacements."""
    return isinstance(module, _BatchNorm)


def norm_affine_parameters(model: nn.Module, include_non_bn: bool = True) -> Iterator[nn.Parameter]:
    """The affine weight/bias of normalization layers (BN and its replacements; GroupNorm,
    LayerNorm and InstanceNorm too when ``include_non_bn``)."""
    kinds: tuple[type[nn.Module], ...] = (_BatchNorm, AdaptiveNorm)
    if include_non_bn:
        kinds = (*kinds, *NORM_TYPES)
    for module in model.modules():
        if isinstance(module, kinds):
            for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if isinstance(p, nn.Parameter):
                    yield p


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


class BatchRenorm(AdaptiveNorm):
    """CEMA's "TBR" batch renormalization (official ``codebase/core/tta/tbr.py``,
    ``tbr_bn_forward_impl``), replacing a BatchNorm.

    With batch statistics ``mu_b``, ``var_b`` (over every dimension but the channel; the
    *unbiased* variance, as ``torch.var_mean`` gives) and running ones ``mu_r``, ``var_r``::

        s_b = sqrt(var_b + eps),  s_r = sqrt(var_r + eps)
        r = s_b / s_r,  d = (mu_b - mu_r) / s_r            (both detached)
        y = ((x - mu_b) / s_b * r + d) * weight + bias

    The value equals normalizing with the running statistics, ``(x - mu_r) / s_r``; the
    gradient flows through the batch statistics, scaled by ``r`` (batch renormalization).
    The running statistics start unset: the first batch any forward sees sets them to its
    own statistics. In training mode each forward then moves them by ``momentum`` (the
    BatchNorm's, 0.1 by default) towards the batch's, after computing its output; in eval
    mode they stay. A layer seeing one value per channel uses the biased variance (0)
    where the official code would produce NaN.
    """

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.momentum = 0.1 if bn.momentum is None else float(bn.momentum)
        self.num_features = c = bn.num_features
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled() and bool(self.initialized):
            # Inference with set statistics (CEMA's edge after its first batch): the batch
            # statistics would change neither the output nor any state, so they are not
            # computed (a statistics pass over every BN input, about 10% of a forward).
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.ndim)]
        count = x.numel() // x.shape[1]
        batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=1 if count > 1 else 0)
        if not bool(self.initialized):
            with torch.no_grad():
                self.running_mean.copy_(batch_mean)
                self.running_var.copy_(batch_var)
                self.initialized.fill_(True)
        if torch.is_grad_enabled():

            def view(t: torch.Tensor) -> torch.Tensor:
                return _channel_view(t, x.ndim)

            batch_std = torch.sqrt(batch_var + self.eps)
            running_std = torch.sqrt(self.running_var + self.eps)
            r = batch_std.detach() / running_std
            d = (batch_mean.detach() - self.running_mean) / running_std
            y = (x - view(batch_mean)) / view(batch_std) * view(r) + view(d)
            if self.weight is not None and self.bias is not None:
                y = y * view(self.weight) + view(self.bias)
        else:  # the same value in one fused kernel (no gradient to route through the batch)
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if self.training:
            with torch.no_grad():
                self.running_mean.add_(batch_mean.detach() - self.running_mean, alpha=self.momentum)
                self.running_var.add_(batch_var.detach() - self.running_var, alpha=self.momentum)
        return y
