"""FedBN (Li et al., ICLR 2021): federated averaging with local batch normalization."""

from __future__ import annotations

from flwr.app import ArrayRecord
from torch import nn

from fedsim.engine.hooks import ClientHooks
from fedsim.models import norm_state_keys
from fedsim.strategies import STRATEGIES
from fedsim.strategies.fedavg import FedAvg


class FedBNClient(ClientHooks):
    """Keeps every normalization tensor (weight, bias, running_mean, running_var,
    num_batches_tracked) local: never sent, restored from the client's state each round."""

    def local_keys(self, model: nn.Module) -> set[str]:
        return norm_state_keys(model)


@STRATEGIES.register("fedbn")
class FedBN(FedAvg):
    """FedBN: clients keep their normalization layers; the server averages everything
    else, weighted by ``num-examples``. Parameters: those of :class:`FedAvg`.

    Clients reply without normalization tensors, so the server's global model keeps its
    own (initial) ones; a client's deployed model is the global model with its own local
    normalization, which is what evaluation measures.
    """

    client_hooks = "fedsim.strategies.fedbn:FedBNClient"

    def configure_train(self, server_round, arrays, config, grid):
        self._current = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        aggregated, metrics = super().aggregate_train(server_round, replies)
        if aggregated is None:
            return None, metrics
        merged = ArrayRecord({k: v for k, v in self._current.items()})
        for key, value in aggregated.items():
            merged[key] = value
        return merged, metrics
