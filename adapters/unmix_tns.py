"""UnMix-TNS (Tomar et al., ICLR 2024): un-mixing test-time normalization statistics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedsim.adapters import ADAPTERS
from fedsim.adapters._norm import AdaptiveNorm, MixedStatBatchNorm, is_batchnorm, replace_modules
from fedsim.adapters.base import Adapter
from fedsim.adapters.tent import NORM_LAYERS, adapted_affine_parameters, batchnorm2d_names, entropy_step


class UnMixBatchNorm2d(AdaptiveNorm):
    """A BatchNorm2d holding K statistics components (UnMix-TNS).

    Init from the source statistics (eps_k ~ N(0, I), drawn with ``generator``)::

        mu_k  = mu_src + sqrt(c * K / (K - 1)) * sigma_src * eps_k,   var_k = (1 - c) * var_src

    ``c`` in (0, 1) is the share of the source variance moved into the spread of the component
    means (the official code hard-codes ``coeff = 0.5``, "alpha" in its comment).

    Forward, per instance b with instance statistics over H*W (biased variance)
    mu_b, var_b::

        p_bk   = softmax_k(cos(mu_b, mu_k) / tau)
        mu_bk  = (1 - p_bk) mu_k  + p_bk mu_b,     var_bk = (1 - p_bk) var_k + p_bk var_b
        mean_b = mean_k mu_bk,                     v_b    = mean_k var_bk + Var_k(mu_bk)
        y_b    = (x_b - mean_b) / sqrt(v_b + eps) * weight + bias

    (Var_k is the population variance over the K components, which makes the init keep the
    source variance in expectation.) Then, without gradients, after the output is computed
    (online protocol)::

        mu_k  += m * mean_b p_bk (mu_b - mu_k),   var_k += m * mean_b p_bk (var_b - var_k)
        m = 1 - (1 - momentum)^(B / max_batch_size)

    Set ``update = False`` to freeze the components.
    """

    def __init__(
        self,
        bn: _BatchNorm,
        num_components: int = 16,
        c: float = 0.5,
        temperature: float = 0.07,
        momentum: float = 0.1,
        max_batch_size: int = 64,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("UnMix-TNS needs BatchNorm layers with running statistics")
        if num_components < 2:
            raise ValueError("UnMix-TNS needs at least 2 components")
        k = int(num_components)
        self.num_components = k
        self.c = float(c)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.max_batch_size = int(max_batch_size)
        self.eps = bn.eps
        self.update = True
        mu_src = bn.running_mean.detach().float()
        var_src = bn.running_var.detach().float()
        noise = torch.randn(k, mu_src.numel(), generator=generator).to(mu_src.device)
        comp_mean = mu_src + math.sqrt(self.c * k / (k - 1)) * var_src.sqrt() * noise
        comp_var = ((1 - self.c) * var_src).expand(k, -1).clone()
        self.register_buffer("comp_mean", comp_mean)
        self.register_buffer("comp_var", comp_var)
        self.weight = nn.Parameter(bn.weight.detach().clone()) if bn.affine else None
        self.bias = nn.Parameter(bn.bias.detach().clone()) if bn.affine else None

    def assignments(self, mu_b: torch.Tensor) -> torch.Tensor:
        """p [B, K] = softmax_k(cos(mu_b, mu_k) / tau)."""
        cos = F.normalize(mu_b, dim=1) @ F.normalize(self.comp_mean, dim=1).t()
        return torch.softmax(cos / self.temperature, dim=1)

    def mixed_statistics(
        self, mu_b: torch.Tensor, var_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-instance (mean [B, C], var [B, C]) to normalize with, and p [B, K], from the
        instance statistics, as [B, K] x [K, C] matmuls (no [B, K, C] tensor: elementwise
        passes over it cost more than the whole normalization of a small layer).

        With q = 1 - p and the rows of p summing to 1, around the components' centre c
        (mc = mu_k - c, u = mu_b - c; centred, so that Var_k does not cancel catastrophically):
        mu_bk - c = q mc + p u, so mean_k of it is (q mc + u) / K and mean_k of its square is
        (q^2 mc^2 + 2 u (q p) mc + sum_k(p^2) u^2) / K; mean_k var_bk = (q var_k + var_b) / K."""
        p = self.assignments(mu_b)
        k = self.num_components
        q = 1 - p
        centre = self.comp_mean.mean(dim=0)
        mc, u = self.comp_mean - centre, mu_b - centre
        first = torch.addmm(u, q, mc, beta=1 / k, alpha=1 / k)
        second = torch.addcmul((q * q) @ (mc * mc), u, (q * p) @ mc, value=2)
        second = torch.addcmul(second, (p * p).sum(dim=1, keepdim=True), u * u)
        spread = torch.addcmul(second / k, first, first, value=-1)
        var = torch.addmm(var_b, q, self.comp_var, beta=1 / k, alpha=1 / k) + spread
        return first + centre, var, p

    @torch.no_grad()
    def update_components(self, p: torch.Tensor, mu_b: torch.Tensor, var_b: torch.Tensor) -> None:
        """The online update of the K components from one batch (see class docstring), with
        sum_b p_bk (s_b - s_k) = (p^T s)_k - (sum_b p_bk) s_k as one matmul per statistic."""
        b = p.shape[0]
        m = 1 - (1 - self.momentum) ** (b / self.max_batch_size)
        pt, mass = p.t(), p.sum(dim=0).unsqueeze(1)
        d_mean = torch.addcmul(pt @ mu_b, mass, self.comp_mean, value=-1)
        d_var = torch.addcmul(pt @ var_b, mass, self.comp_var, value=-1)
        # new tensors, not in-place: the old ones may be saved for a backward pass (Tent).
        self.comp_mean = torch.add(self.comp_mean, d_mean, alpha=m / b)
        self.comp_var = torch.add(self.comp_var, d_var, alpha=m / b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError("UnMixBatchNorm2d takes [B, C, H, W]")
        var_b, mu_b, sq = _instance_var_mean(x)
        mean, var, p = self.mixed_statistics(mu_b, var_b)
        # y = (x - mean) / sqrt(var + eps) * w + b as one fused x * scale + shift over x
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None and self.bias is not None:
            scale = scale * self.weight
            shift = torch.addcmul(self.bias, mean, scale, value=-1)
        else:
            shift = -mean * scale
        # Without autograd the squared deviations' buffer, no longer needed, takes the output:
        # one fresh x-sized tensor per call, as in plain BN.
        out = None if torch.is_grad_enabled() else sq
        y = torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None], out=out)
        if self.update:
            self.update_components(p.detach(), mu_b.detach(), var_b.detach())
        return y


def _instance_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-instance, per-channel (biased var, mean) over H*W: [B, C] each, in two passes
    (the mean, then the mean of the squared deviations from it, which are returned too).
    torch.var_mean over H, W is a slow scalar reduction on CPU, and a batch_norm over x
    viewed as [1, B*C, H, W] copies a channels-last x (the benchmark's layout) first."""
    mean = x.mean(dim=(2, 3))
    sq = F.mse_loss(x, mean[:, :, None, None].expand_as(x), reduction="none")
    return sq.mean(dim=(2, 3)), mean, sq


@ADAPTERS.register("unmix_tns")
class UnMixTNS(Adapter):
    """UnMix-TNS: every BatchNorm2d becomes an :class:`UnMixBatchNorm2d` with K statistics
    components, initialised from the source statistics and updated online without
    gradients (equations in that class). Other BatchNorm layers (BatchNorm1d) keep their
    source statistics. Predictions use the components as they were before the batch.

    Settings: num_components K (16; 128 for mixed domains); c, the init spread (0.5, the
    official ``coeff``; it is not a setting there: smaller values such as 0.01 start every
    component near the source statistics, see docs/tta.md); temperature tau (0.07); momentum
    (0.1, the base of m); max_batch_size B_max in ``m = 1 - (1 - 0.1)^(B / B_max)`` (64, the
    official ``UNMIXTNS.BATCH_SIZE_MAX``); seed (component init); tent (False: compose with
    Tent, i.e. also minimise entropy over normalization affine parameters with Adam lr ``lr``,
    one step per batch); lr (1e-3, used with tent); norm_layers, the layers Tent trains
    (``all_norm``, as the official UnMix-TNS Tent, which collects BatchNorm1d/2d, LayerNorm,
    GroupNorm and its UnMix layers; ``bn2d``/``all_bn`` as in ``tent``).
    """

    name = "unmix_tns"
    needs_grad = False
    changes = "bn-statistics"

    def __init__(
        self,
        model: nn.Module,
        *,
        num_components: int = 16,
        c: float = 0.5,
        temperature: float = 0.07,
        momentum: float = 0.1,
        max_batch_size: int = 64,
        seed: int = 0,
        tent: bool = False,
        lr: float = 1e-3,
        norm_layers: str = "all_norm",
    ) -> None:
        if norm_layers not in NORM_LAYERS:
            raise ValueError(f"unmix_tns: norm_layers must be one of {', '.join(NORM_LAYERS)}, got '{norm_layers}'")
        if not 0.0 < c < 1.0:
            raise ValueError(f"unmix_tns: c must be in (0, 1), got {c}")
        if num_components < 2 or max_batch_size < 1 or temperature <= 0:
            raise ValueError("unmix_tns: need num_components >= 2, max_batch_size >= 1, temperature > 0")
        self.num_components = int(num_components)
        self.c = float(c)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.max_batch_size = int(max_batch_size)
        self.seed = int(seed)
        self.tent = bool(tent)
        self.lr = float(lr)
        self.norm_layers = str(norm_layers)
        if self.tent:  # composition changes what the adapter needs and changes
            self.needs_grad = True  # type: ignore[misc]
            self.changes = "bn-statistics+bn-affine"  # type: ignore[misc]
        super().__init__(model)
        self.optimizer = self._make_optimizer() if self.tent else None

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        gen = torch.Generator().manual_seed(self.seed)
        bn2d = batchnorm2d_names(model)

        def make(bn: nn.Module) -> nn.Module:
            if isinstance(bn, nn.BatchNorm2d):
                return UnMixBatchNorm2d(
                    bn, self.num_components, self.c, self.temperature, self.momentum, self.max_batch_size, gen
                )
            return MixedStatBatchNorm(bn, a=0.0)  # type: ignore[arg-type]

        replace_modules(model, is_batchnorm, make)
        if self.tent:
            model.requires_grad_(False)  # the replacements hold fresh Parameters (requires_grad=True)
            for p in adapted_affine_parameters(model, self.norm_layers, bn2d):
                p.requires_grad_(True)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999))

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.optimizer is not None:
            return entropy_step(self.model, self.optimizer, x)
        with torch.no_grad():
            return self.model(x)

    def reset(self) -> None:
        super().reset()
        if self.tent:
            self.optimizer = self._make_optimizer()


@ADAPTERS.register("unmix_tns_tent")
class UnMixTNSTent(UnMixTNS):
    """UnMix-TNS composed with Tent: UnMix-TNS statistics, plus one Adam step (lr 1e-3) per
    batch minimising the mean prediction entropy over the normalization affine parameters
    (``norm_layers``, default ``all_norm`` as the official code). Same settings as
    ``unmix_tns`` with ``tent`` fixed to True."""

    name = "unmix_tns_tent"
    needs_grad = True
    changes = "bn-statistics+bn-affine"

    def __init__(
        self,
        model: nn.Module,
        *,
        num_components: int = 16,
        c: float = 0.5,
        temperature: float = 0.07,
        momentum: float = 0.1,
        max_batch_size: int = 64,
        seed: int = 0,
        lr: float = 1e-3,
        norm_layers: str = "all_norm",
    ) -> None:
        super().__init__(
            model,
            num_components=num_components,
            c=c,
            temperature=temperature,
            momentum=momentum,
            max_batch_size=max_batch_size,
            seed=seed,
            tent=True,
            lr=lr,
            norm_layers=norm_layers,
        )
