"""FedAvg (McMahan et al., 2017): the weighted mean of client models."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedsim.strategies import STRATEGIES


@STRATEGIES.register("fedavg")
class FedAvg(FlowerFedAvg):
    """Flower's FedAvg with fedsim's defaults.

    Parameters (all of Flower's ``FedAvg``): ``fraction_train`` (clients per round),
    ``fraction_evaluate``, ``min_train_nodes`` ... Defaults here require one node, so a
    single-client scenario runs; weights are ``num-examples``.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        min_available_nodes: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            **kwargs,
        )
