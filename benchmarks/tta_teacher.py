"""CEMA's cloud teacher scored on the edges' own streams, as an adapter.

``benchmarks.tta_teacher:Teacher`` predicts with the foundation model fedsim injects (the
``foundation`` setting, as for ``cema``) and ignores the deployed edge model. It runs on the
same streams, batches and online protocol as the other adapters, so its error is directly
comparable: CEMA's premise is a teacher clearly stronger than the edge on the shifted data.
It is a measurement, not an edge method (the edge could not run this model).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsim.adapters._norm import BatchRenorm, MixedStatBatchNorm, is_batchnorm, replace_modules
from fedsim.adapters.base import Adapter


class Teacher(Adapter):
    """The foundation model, forward only. ``normalization``: ``batch`` (every BatchNorm
    uses the test batch's statistics, like TBN), ``source`` (its training statistics) or
    ``tbr`` (CEMA's official normalization of the foundation,
    :class:`~fedsim.adapters._norm.BatchRenorm`: running test statistics set by the stream's
    first batch, then moved towards each batch's by the BatchNorm momentum after predicting)."""

    name = "teacher"
    needs_grad = False
    changes = "nothing (scores the foundation model)"

    def __init__(self, model: nn.Module, *, foundation: nn.Module, normalization: str = "batch") -> None:
        if normalization not in ("batch", "source", "tbr"):
            raise ValueError(f"teacher: normalization must be batch, source or tbr, got '{normalization}'")
        if foundation is None:
            raise ValueError("teacher: needs the foundation model")
        self.normalization = normalization
        super().__init__(foundation)  # the edge model is not used

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        if self.normalization == "tbr":
            replace_modules(model, is_batchnorm, BatchRenorm)
            for m in model.modules():
                if isinstance(m, BatchRenorm):
                    m.train()  # training mode: each forward moves the running statistics
            return model
        a = 1.0 if self.normalization == "batch" else 0.0
        replace_modules(model, is_batchnorm, lambda bn: MixedStatBatchNorm(bn, a=a))
        return model

    @torch.no_grad()
    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
