"""Compressed FedAvg without error feedback: the baseline that shows why error feedback is
needed (docs/compression.md).

Equations: each sampled client ``i`` sends ``C(u_i)``, ``u_i = W - x_i^local`` its round's
model update; the server steps ``x+ = x - gamma * sum_{i in S} p_i C(u_i)`` with ``p_i`` the
clients' ``num-examples`` shares among the received replies (so with the identity compressor
and ``gamma = 1`` it is FedAvg). Whatever ``C`` drops is lost. No state on either side.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsim.arrays import NamedArrays
from fedsim.engine.hooks import hooks_path
from fedsim.strategies import STRATEGIES
from fedsim.strategies.compressed.base import (
    CompressedClient,
    CompressedStrategy,
    Message,
    send,
    vector,
)
from fedsim.strategies.compressed.compressors import Compressor

__all__ = ["compressed_client_step", "compressed_server_mean", "CompressedPlainClient", "Compressed"]


def compressed_client_step(u: np.ndarray, compressor: Compressor, rng: np.random.Generator | None = None) -> Message:
    """Baseline without error feedback: the client sends ``C(u_i)``."""
    return send(vector(u, "u"), compressor, rng)


def compressed_server_mean(
    messages: Mapping[int, np.ndarray], weights: Mapping[int, float] | None = None
) -> np.ndarray:
    """Baseline server: (weighted) mean of the received decoded messages ``C(u_i)``.

    ``weights`` (e.g. ``num-examples`` per client) are normalised over the received clients;
    None means the plain mean over ``S``.
    """
    if not messages:
        raise ValueError("compressed_server_mean: no messages")
    ids = sorted(messages)
    raw = np.array([1.0 if weights is None else float(weights[i]) for i in ids])
    if np.any(raw < 0) or raw.sum() <= 0:
        raise ValueError("compressed_server_mean: weights must be >= 0 with a positive sum")
    w = raw / raw.sum()
    acc: np.ndarray | None = None
    for wi, i in zip(w, ids):
        term = np.float32(wi) * vector(messages[i], f"message of client {i}")
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc


class CompressedPlainClient(CompressedClient):
    """The baseline's client side: no buffers, it sends ``C(u_i)``."""

    buffers = ()

    def client_step(
        self, u: np.ndarray, compressor: Compressor, rng: np.random.Generator, init: bool, state: NamedArrays
    ) -> tuple[Message, NamedArrays]:
        return compressed_client_step(u, compressor, rng), {}


@STRATEGIES.register("compressed")
class Compressed(CompressedStrategy):
    """Each sampled client sends ``C(u_i)`` with ``u_i = W - x_i^local`` (its round's model
    update); the server steps ``x+ = x - server_lr * sum_i p_i C(u_i)`` with ``p_i`` the
    clients' ``num-examples`` shares among the received replies (so with the identity
    compressor and ``server_lr=1`` it is FedAvg). Whatever ``C`` drops is lost.

    Parameters: ``compressor``, ``downlink``, ``server_lr``, ``seed``, ``bn``,
    ``downlink_history`` and Flower's FedAvg ones (see
    :class:`fedsim.strategies.compressed.base.CompressedStrategy` and docs/compression.md); ``init``
    is accepted and ignored (there are no buffers to start).
    """

    method = "none"
    client_hooks = hooks_path(CompressedPlainClient)
    default_init = "zero"
    init_round = False

    def server_step(self, decoded: dict[int, np.ndarray], examples: dict[int, float]) -> np.ndarray:
        return compressed_server_mean(decoded, examples)
