"""TBN: test-batch normalization."""

from __future__ import annotations

import torch
from torch import nn

from fedsim.adapters import ADAPTERS
from fedsim.adapters._norm import MixedStatBatchNorm, is_batchnorm, replace_modules
from fedsim.adapters.base import Adapter


@ADAPTERS.register("tbn")
class TBN(Adapter):
    """Test-batch normalization ("norm-test"): every BatchNorm layer normalizes with the
    current test batch's statistics, ``y = (x - mu_batch) / sqrt(var_batch + eps) * w + b``
    (biased variance over N and the spatial dims; a BatchNorm2d at batch size 1 uses its
    H*W positions). A BatchNorm1d at batch size 1 has no batch statistics and falls back to
    its source statistics. Nothing is stored between batches; forward only. No settings.
    """

    name = "tbn"
    needs_grad = False
    changes = "bn-statistics"

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, a=1.0))
        return model

    @torch.no_grad()
    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
