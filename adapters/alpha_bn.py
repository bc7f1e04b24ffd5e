"""alpha-BN (You et al., 2021): source and test-batch statistics mixed per BN layer."""

from __future__ import annotations

import torch
from torch import nn

from fedsim.adapters import ADAPTERS
from fedsim.adapters._norm import MixedStatBatchNorm, is_batchnorm, replace_modules
from fedsim.adapters.base import Adapter


@ADAPTERS.register("alpha_bn")
class AlphaBN(Adapter):
    """alpha-BN: each BatchNorm layer normalizes with mixed statistics (no gradients)::

        mu  = (1 - a) * mu_src  + a * mu_batch
        var = (1 - a) * var_src + a * var_batch  [+ a * (1 - a) * (mu_batch - mu_src)^2]

    then applies the layer's own affine. ``a`` is the weight on the *test batch* (default
    0.1; the paper's own convention is unconfirmed). ``moment_matched=True`` adds the
    bracketed term (the variance of the mixture). Batch statistics are over N and the
    spatial dims with the biased variance, so a BatchNorm2d works at batch size 1 (over
    H*W). A BatchNorm1d at batch size 1 has no batch statistics: it uses the source
    statistics (a = 0 for that call). The paper's Core loss is not implemented.

    Settings: a (float in [0, 1], default 0.1), moment_matched (bool, default False).
    """

    name = "alpha_bn"
    needs_grad = False
    changes = "bn-statistics"

    def __init__(self, model: nn.Module, *, a: float = 0.1, moment_matched: bool = False) -> None:
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha_bn: a must be in [0, 1], got {a}")
        self.a = float(a)
        self.moment_matched = bool(moment_matched)
        super().__init__(model)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, self.a, self.moment_matched))
        return model

    @torch.no_grad()
    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
