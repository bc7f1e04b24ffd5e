"""Tent (Wang et al., ICLR 2021): entropy minimization of the BN affine parameters."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedsim.adapters import ADAPTERS
from fedsim.adapters._norm import NORM_TYPES, AdaptiveNorm, MixedStatBatchNorm, entropy, is_batchnorm, replace_modules
from fedsim.adapters.base import Adapter

NORM_LAYERS: tuple[str, ...] = ("bn2d", "all_bn", "all_norm")
"""Which normalization layers' affine parameters an entropy step trains: ``bn2d`` (BatchNorm2d
only, DequanWang/tent), ``all_bn`` (every BatchNorm, 1d too), ``all_norm`` (also GroupNorm,
LayerNorm, InstanceNorm)."""


def batchnorm2d_names(model: nn.Module) -> frozenset[str]:
    """Module names of the BatchNorm2d layers (taken before the adapters replace them)."""
    return frozenset(name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))


def adapted_affine_parameters(model: nn.Module, norm_layers: str, bn2d: frozenset[str]) -> list[nn.Parameter]:
    """The affine weight/bias that ``norm_layers`` (one of :data:`NORM_LAYERS`) selects;
    ``bn2d`` names the modules that were BatchNorm2d layers before replacement."""
    if norm_layers not in NORM_LAYERS:
        raise ValueError(f"norm_layers must be one of {', '.join(NORM_LAYERS)}, got '{norm_layers}'")
    kinds: tuple[type[nn.Module], ...] = (AdaptiveNorm, _BatchNorm)
    if norm_layers == "all_norm":
        kinds = (AdaptiveNorm, *NORM_TYPES)
    params: list[nn.Parameter] = []
    for name, module in model.named_modules():
        selected = name in bn2d if norm_layers == "bn2d" else isinstance(module, kinds)
        if selected:
            affine = (getattr(module, "weight", None), getattr(module, "bias", None))
            params.extend(p for p in affine if isinstance(p, nn.Parameter))
    return params


def entropy_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    """One Tent step: logits = model(x); minimise mean_b H(softmax(logits_b)); return the
    logits (computed before the step)."""
    with torch.enable_grad():
        logits = model(x)
        loss = entropy(logits).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return logits.detach()


@ADAPTERS.register("tent")
class Tent(Adapter):
    """Tent: minimise the mean prediction entropy ``H(p) = -sum_c p_c log p_c`` over the
    BatchNorm affine parameters only, with every BatchNorm in batch-statistics mode (as TBN).

    One optimizer step per batch; the returned logits are those of the forward pass the
    step is computed from (before the update). Adam with ``lr`` (default 1e-3, betas
    (0.9, 0.999)), ``steps`` steps per batch (default 1; further steps re-run the forward).
    ``norm_layers`` picks the trained layers (:data:`NORM_LAYERS`): ``bn2d`` (default, as the
    official DequanWang/tent, whose ``collect_params`` takes BatchNorm2d only; its
    ``model.train()`` still puts BatchNorm1d in batch-statistics mode, as here), ``all_bn``
    (BatchNorm1d too) or ``all_norm`` (also GroupNorm/LayerNorm/InstanceNorm).
    """

    name = "tent"
    needs_grad = True
    changes = "bn-affine"

    def __init__(self, model: nn.Module, *, lr: float = 1e-3, steps: int = 1, norm_layers: str = "bn2d") -> None:
        if lr <= 0 or steps < 1:
            raise ValueError("tent: lr must be > 0 and steps >= 1")
        if norm_layers not in NORM_LAYERS:
            raise ValueError(f"tent: norm_layers must be one of {', '.join(NORM_LAYERS)}, got '{norm_layers}'")
        self.lr = float(lr)
        self.steps = int(steps)
        self.norm_layers = str(norm_layers)
        super().__init__(model)
        self.optimizer = self._make_optimizer()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        bn2d = batchnorm2d_names(model)
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, a=1.0))
        model.requires_grad_(False)  # the replacements hold fresh Parameters (requires_grad=True)
        for p in adapted_affine_parameters(model, self.norm_layers, bn2d):
            p.requires_grad_(True)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("tent: the model has no normalization affine parameters to adapt")
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999))

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        logits = entropy_step(self.model, self.optimizer, x)
        for _ in range(self.steps - 1):
            entropy_step(self.model, self.optimizer, x)
        return logits

    def reset(self) -> None:
        super().reset()
        self.optimizer = self._make_optimizer()
