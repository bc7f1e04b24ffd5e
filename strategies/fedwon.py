"""FedWon (Zhuang & Lyu, ICLR 2024): federated learning without normalization.

The model side is ``model.normalization: none`` (fedsim.models): every normalization layer
removed, every convolution a :class:`fedsim.models.layers.ScaledWSConv2d` (scaled weight
standardization, learnable per-channel gain, gamma for ReLU); fully connected layers stay
plain. The client side is adaptive gradient clipping (:mod:`fedsim.engine.agc`) in every local
optimizer step. The server side is FedAvg (weighted by ``num-examples``).

FedWon expects ``model.normalization: none``: with norm layers left in, this is FedAvg +
AGC, not FedWon. The strategy cannot see the model's modules, only the arrays it sends;
it warns once when those contain BatchNorm buffers (``running_mean`` ...), or raises
``ValueError`` with ``strict=True``. GroupNorm / LayerNorm leave no such trace.
"""

from __future__ import annotations

import logging

from fedsim.config import Scenario
from fedsim.engine.agc import DEFAULT_EPS, DEFAULT_LAMBDA
from fedsim.engine.hooks import ClientHooks, hooks_path
from fedsim.strategies import STRATEGIES
from fedsim.strategies.fedavg import FedAvg

log = logging.getLogger(__name__)

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class FedWonClient(ClientHooks):
    """FedAvg's client; AGC before every optimizer step comes from the config's
    ``fedsim.agc.lambda``, which every fedsim client honours."""


@STRATEGIES.register("fedwon")
class FedWon(FedAvg):
    """FedAvg aggregation over a normalization-free model, AGC on the clients.

    Parameters: ``agc_lambda`` (clip factor; FedWon's own value is **unconfirmed**, NFNets'
    0.01 is for batch 4096, default :data:`fedsim.engine.agc.DEFAULT_LAMBDA`; 0 turns AGC off),
    ``agc_eps`` (floor of a weight row's norm, 1e-3), ``agc_exclude`` (comma-separated
    parameter-name prefixes not clipped, default none), ``strict`` (raise instead of warn
    when the model still has BatchNorm), and every :class:`FedAvg` argument
    (``fraction_train`` for cross-device sampling, ...).
    """

    client_hooks = hooks_path(FedWonClient)

    @classmethod
    def check_scenario(cls, scenario: Scenario) -> None:
        """FedWon trains a normalization-free model (checked when the scenario is loaded)."""
        if scenario.model.normalization != "none":
            raise ValueError(
                f"model.normalization: FedWon needs a normalization-free model: set model.normalization: none (got {scenario.model.normalization})"
            )

    def __init__(
        self,
        agc_lambda: float = DEFAULT_LAMBDA,
        agc_eps: float = DEFAULT_EPS,
        agc_exclude: str = "",
        strict: bool = False,
        **kwargs,
    ) -> None:
        if agc_lambda < 0:
            raise ValueError(f"agc_lambda must be >= 0 (got {agc_lambda})")
        if agc_eps <= 0:
            raise ValueError(f"agc_eps must be > 0 (got {agc_eps})")
        super().__init__(**kwargs)
        self.agc_lambda = float(agc_lambda)
        self.agc_eps = float(agc_eps)
        self.agc_exclude = str(agc_exclude)
        self.strict = bool(strict)
        self.client_config = {
            "fedsim.agc.lambda": self.agc_lambda,
            "fedsim.agc.eps": self.agc_eps,
            "fedsim.agc.exclude": self.agc_exclude,
        }
        self._checked = False

    def configure_train(self, server_round, arrays, config, grid):
        if not self._checked:
            self._checked = True
            bn = sorted(k for k in arrays.keys() if k.rsplit(".", 1)[-1] in _BN_BUFFERS)
            if bn:
                msg = f"FedWon expects model.normalization: none, but the model has BatchNorm buffers ({bn[0]}, ...); this runs FedAvg + AGC, not FedWon"
                if self.strict:
                    raise ValueError(msg)
                log.warning(msg)
        return super().configure_train(server_round, arrays, config, grid)
