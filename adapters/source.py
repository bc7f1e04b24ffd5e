"""Source: the model as trained, no adaptation."""

from __future__ import annotations

import torch

from fedsim.adapters import ADAPTERS
from fedsim.adapters.base import Adapter


@ADAPTERS.register("source")
class Source(Adapter):
    """Source model (baseline): BatchNorm layers use their running (training) statistics.

    Nothing changes; forward only. No settings.
    """

    name = "source"
    needs_grad = False
    changes = "nothing"

    @torch.no_grad()
    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
