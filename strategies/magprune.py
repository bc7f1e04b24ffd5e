"""Magnitude-pruning baseline for FedTiny: one-shot pruning at the start, fixed mask.

The initial model is pruned by weight magnitude to the same overall density and the same
layer densities (ERK by default, ``layer_densities: uniform`` for a uniform ratio) as
FedTiny's sparse start, then trained with FedAvg under the fixed mask, with the same sparse
wire format (values + indices) and the same metrics. It is FedTiny without its two modules
(adaptive BN selection and progressive prune-and-grow), so the difference between the two
is the gain of those modules.
"""

from __future__ import annotations

from fedsim.strategies import STRATEGIES
from fedsim.strategies.fedtiny import FedTiny


@STRATEGIES.register("magprune")
class MagPrune(FedTiny):
    """Parameters: ``density`` (0.1), ``layer_densities`` (``erk`` | ``uniform``),
    ``uplink_indices`` and every :class:`FedAvg` argument."""

    def __init__(
        self, density: float = 0.1, layer_densities: str = "erk", uplink_indices: bool = True, **kwargs
    ) -> None:
        super().__init__(
            density=density,
            layer_densities=layer_densities,
            bn_selection=False,
            progressive=False,
            uplink_indices=uplink_indices,
            **kwargs,
        )
