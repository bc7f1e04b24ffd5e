"""Client side of a strategy: what a client loads, how it steps, what it sends back.

A strategy names its client side with a class attribute ``client_hooks`` (an import path
``package.module:Class``); fedsim's ClientApp resolves it from the train message's config
key ``fedsim.client``. Flower's own strategies need none and get :class:`ClientHooks`,
which also honours FedProx's ``proximal-mu``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.arrays import NamedArrays
from fedsim.engine.agc import agc_settings, clip_model_
from fedsim.engine.client_state import ClientState

HOOKS_KEY = "fedsim.client"
TASK_KEY = "fedsim.task"  # in an evaluate message: run hooks.run_task instead of evaluating


def hooks_path(cls: type) -> str:
    """The import path ``module:Class`` under which the engine finds a client-hooks class
    (derived, not spelled out, so that moving a module cannot leave a stale path)."""
    return f"{cls.__module__}:{cls.__qualname__}"


class ClientHooks:
    """FedAvg's client: load every received array, train, send every array back.

    ``config``: the ConfigRecord of the message, as a plain dict.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.prox_mu = float(config.get("proximal-mu", 0.0))
        self._anchor: list[torch.Tensor] | None = None

    def local_keys(self, model: nn.Module) -> set[str]:
        """state_dict keys the client keeps to itself (never sent, never overwritten)."""
        return set()

    def load(self, model: nn.Module, received: NamedArrays, state: ClientState) -> None:
        """Put the received global arrays (and any local state) into ``model``."""
        local = self.local_keys(model)
        saved = state.get("local") if local else None
        sd = model.state_dict()
        with torch.no_grad():
            for key, value in received.items():
                if key in sd and key not in local:
                    sd[key].copy_(torch.from_numpy(np.asarray(value)).reshape(sd[key].shape))
            if saved:
                for key in local & saved.keys():
                    sd[key].copy_(torch.from_numpy(np.asarray(saved[key])).reshape(sd[key].shape))
        if self.prox_mu > 0:
            self._anchor = [p.detach().clone() for p in model.parameters()]

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """Added to the task loss each step (FedProx: mu/2 ||w - w_global||^2)."""
        if self._anchor is None:
            return None
        return 0.5 * self.prox_mu * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self._anchor))

    def before_step(self, model: nn.Module) -> None:
        """After backward, before the optimizer step. Applies adaptive gradient clipping
        when the config has ``fedsim.agc.lambda`` > 0 (any strategy: ``client.agc_lambda``)."""
        lam, eps, exclude = agc_settings(self.config)
        if lam > 0:
            clip_model_(model, lam, eps, exclude)

    def after_step(self, model: nn.Module) -> None:
        """After the optimizer step (e.g. re-apply a sparsity mask)."""

    def run_task(self, task: str, runtime: Any, client_id: int, received: NamedArrays, state: ClientState) -> Any:
        """A strategy's own client job, sent as an evaluate message whose config has
        ``fedsim.task`` = ``task``. ``runtime`` is the :class:`fedsim.engine.client.ClientRuntime`
        (model, device, ``runtime.data.client(client_id)`` tensors). Returns the reply's
        ``RecordDict`` (one ArrayRecord + one MetricRecord with ``num-examples``)."""
        raise NotImplementedError(f"{type(self).__name__} has no client task '{task}'")

    def metrics(self) -> dict[str, float]:
        """Extra numbers for the train reply's MetricRecord (same keys from every client)."""
        return {}

    def reply(self, model: nn.Module, received: NamedArrays, state: ClientState) -> NamedArrays:
        """Arrays sent back to the server; also stages local state to keep."""
        local = self.local_keys(model)
        sd = model.state_dict()
        if local:
            state.put("local", {k: sd[k].detach().cpu().numpy() for k in local})
        return {k: v.detach().cpu().numpy() for k, v in sd.items() if k not in local}
