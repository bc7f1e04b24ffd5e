"""EF21 (Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and
Practically Faster Error Feedback", NeurIPS 2021) for federated rounds, with partial
participation (EF21-PP, same paper), the momentum variant EF21-SGDM (Fatkhullin, Tyurin,
Richtarik, "Momentum Provably Improves Error Feedback!", NeurIPS 2023) and the
smoothness-weighted EF21-W of "Error Feedback Reloaded" (Richtarik, Gasanov, Burlachenko,
2024). User guide: docs/compression.md.

Read top to bottom: the equations, the client and server states, the pure client / server
steps (numpy on float32 vectors, never mutating their inputs), then the client hooks and the
Flower strategy that move those vectors through messages (:mod:`fedsim.strategies.compressed.base`).

Equations
---------
``x`` the model, ``n`` the TOTAL number of clients, ``S`` the clients sampled this round,
``C`` a compressor, ``u_i`` client ``i``'s gradient-like vector: its model update over the
round taken as a descent direction, ``u_i = x - x_i^local`` (so the server step
``x+ = x - gamma * g`` with ``gamma = 1`` is a FedAvg-like step).

client ``i in S``::

    c_i   = C(a_i * u_i - g_i)          a_i = 1 (plain EF21) or 1 / (n w_i) (weighted)
    g_i  <- g_i + c_i
server::

    g    <- g + sum_{i in S} w_i c_i    w_i = 1/n (plain EF21 / EF21-PP)
    x    <- x - gamma * g

Clients not in ``S`` keep ``g_i`` (EF21-PP); the server divides by the TOTAL ``n``, not by
``|S|``, so ``g = sum_i w_i g_i`` holds at all times.

Weighted EF21 (EF21-W): weights proportional to the smoothness constants,
``w_i = L_i / sum_j L_j`` (:func:`ef21_weights`); client ``i`` compresses
``u_i / (n w_i) - g_i`` and the server keeps ``g = sum_i w_i g_i``, so ``g`` still tracks
``(1/n) sum_i u_i`` (because ``sum_i w_i u_i / (n w_i) = (1/n) sum_i u_i``).  The exact
client scaling ``1/(n w_i)`` and server weighting ``sum_i w_i c_i`` follow the EF21-W
algorithm as we read it (unconfirmed against the paper's text), and the combination of
weights with partial participation (``g += sum_{i in S} w_i c_i``) is (unconfirmed).  With
``w_i = 1/n`` everything reduces to plain EF21(-PP).

EF21-SGDM (momentum): ``v_i <- (1 - eta) v_i + eta * a_i u_i``, then ``c_i = C(v_i - g_i)``,
``g_i <- g_i + c_i``; the server is unchanged.  Initial ``v_i``: :func:`ef21_init_client`
with ``momentum=True`` sets ``v_i = a_i u_i`` at the uncompressed first round (unconfirmed;
:meth:`EF21ClientState.zeros` gives ``v_i = 0`` instead).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.arrays import NamedArrays
from fedsim.engine.hooks import hooks_path
from fedsim.strategies import STRATEGIES
from fedsim.strategies.compressed.base import (
    CompressedClient,
    CompressedStrategy,
    Message,
    check_same_shape,
    send,
    state_array,
    vector,
    weighted_sum,
)
from fedsim.strategies.compressed.compressors import Compressor, Identity

__all__ = [
    "EF21ClientState",
    "EF21ServerState",
    "ef21_weights",
    "ef21_client_scale",
    "ef21_init_client",
    "ef21_client_step",
    "ef21_sgdm_client_step",
    "ef21_server_step",
    "EF21Client",
    "EF21",
]


# --------------------------------------------------------------------------------------------
# states
# --------------------------------------------------------------------------------------------


@dataclass
class EF21ClientState:
    """EF21 client state: ``g`` (= g_i, float32 [d]) and optional momentum ``v`` (EF21-SGDM)."""

    g: np.ndarray
    v: np.ndarray | None = None

    @classmethod
    def zeros(cls, d: int, momentum: bool = False) -> EF21ClientState:
        """``g_i = 0`` (and ``v_i = 0`` when ``momentum``)."""
        return cls(np.zeros(d, np.float32), np.zeros(d, np.float32) if momentum else None)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"g": ..., ["v": ...]}`` (copies)."""
        out = {"g": self.g.copy()}
        if self.v is not None:
            out["v"] = self.v.copy()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> EF21ClientState:
        """Inverse of :meth:`to_arrays`."""
        g = state_array(arrays, "g", cls.__name__)
        v = state_array(arrays, "v", cls.__name__) if "v" in arrays else None
        if v is not None:
            check_same_shape(g, v, "EF21ClientState")
        return cls(g, v)


@dataclass
class EF21ServerState:
    """EF21 server state: ``g = sum_i w_i g_i`` (float32 [d])."""

    g: np.ndarray

    @classmethod
    def zeros(cls, d: int) -> EF21ServerState:
        return cls(np.zeros(d, np.float32))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"g": self.g.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> EF21ServerState:
        return cls(state_array(arrays, "g", cls.__name__))


# --------------------------------------------------------------------------------------------
# the algebra: client and server steps
# --------------------------------------------------------------------------------------------


def ef21_weights(smoothness: Sequence[float] | np.ndarray | None, n: int | None = None) -> np.ndarray:
    """Client weights for weighted EF21: ``w_i = L_i / sum_j L_j`` (float64, sums to 1).

    ``smoothness=None`` gives uniform weights ``1/n`` (plain EF21).  All ``L_i`` must be > 0.
    """
    if smoothness is None:
        if n is None or n < 1:
            raise ValueError("ef21_weights: give smoothness constants or n >= 1")
        return np.full(n, 1.0 / n)
    L = np.asarray(smoothness, dtype=np.float64).reshape(-1)
    if L.size == 0 or not np.all(np.isfinite(L)) or np.any(L <= 0):
        raise ValueError("ef21_weights: smoothness constants must be finite and > 0")
    if n is not None and L.size != n:
        raise ValueError(f"ef21_weights: {L.size} smoothness constants for n={n} clients")
    return L / L.sum()


def ef21_client_scale(weights: Sequence[float] | np.ndarray, i: int) -> float:
    """Client scaling ``a_i = 1 / (n w_i)`` of weighted EF21 (1.0 for uniform weights)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(1.0 / (w.size * w[i]))


def _scaled(u: np.ndarray, scale: float) -> np.ndarray:
    u = vector(u, "u")
    return u if scale == 1.0 else np.float32(scale) * u


def ef21_init_client(
    u: np.ndarray,
    compressor: Compressor | None = None,
    rng: np.random.Generator | None = None,
    *,
    scale: float = 1.0,
    momentum: bool = False,
) -> tuple[Message, EF21ClientState]:
    """First round of EF21: ``g_i = a_i u_i`` sent uncompressed (or ``g_i = C(a_i u_i)``).

    This is exactly :func:`ef21_client_step` from ``g_i = 0`` with ``C`` = identity (or the
    given compressor), so the server initialises with :func:`ef21_server_step` from
    :meth:`EF21ServerState.zeros`.  With ``momentum`` the buffer starts at ``v_i = a_i u_i``
    (unconfirmed choice).
    """
    target = _scaled(u, scale)
    msg = send(target, compressor or Identity(), rng)
    v = target.copy() if momentum else None
    return msg, EF21ClientState(msg.decoded.copy(), v)


def ef21_client_step(
    state: EF21ClientState,
    u: np.ndarray,
    compressor: Compressor,
    rng: np.random.Generator | None = None,
    *,
    scale: float = 1.0,
) -> tuple[Message, EF21ClientState]:
    """EF21 client step: ``c_i = C(a_i u_i - g_i)``, ``g_i+ = g_i + c_i``.

    Args:
        state: the client's ``g_i`` (``v`` is carried over untouched).
        u: gradient-like vector ``u_i`` (float32 [d]).
        compressor: ``C`` (contractive for the EF21 theory).
        rng: generator for randomised compressors.
        scale: ``a_i``; 1 for EF21, ``1 / (n w_i)`` for weighted EF21 (:func:`ef21_client_scale`).

    Returns:
        ``(message, new_state)``; ``message.decoded`` is ``c_i``.
    """
    target = _scaled(u, scale)
    check_same_shape(target, state.g, "ef21_client_step")
    msg = send(target - state.g, compressor, rng)
    v = None if state.v is None else state.v.copy()
    return msg, EF21ClientState(state.g + msg.decoded, v)


def ef21_sgdm_client_step(
    state: EF21ClientState,
    u: np.ndarray,
    compressor: Compressor,
    eta: float,
    rng: np.random.Generator | None = None,
    *,
    scale: float = 1.0,
) -> tuple[Message, EF21ClientState]:
    """EF21-SGDM client step: ``v_i+ = (1-eta) v_i + eta a_i u_i``; ``c_i = C(v_i+ - g_i)``;
    ``g_i+ = g_i + c_i``.

    Args:
        state: ``g_i`` and momentum buffer ``v_i`` (must not be None).
        u: stochastic gradient-like vector ``u_i``.
        eta: momentum parameter in (0, 1]; ``eta = 1`` is plain EF21.
        compressor, rng, scale: as in :func:`ef21_client_step`.
    """
    if state.v is None:
        raise ValueError("ef21_sgdm_client_step: state has no momentum buffer v")
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"ef21_sgdm_client_step: eta must be in (0, 1], got {eta}")
    target = _scaled(u, scale)
    check_same_shape(target, state.g, "ef21_sgdm_client_step")
    v = np.float32(1.0 - eta) * state.v + np.float32(eta) * target
    msg = send(v - state.g, compressor, rng)
    return msg, EF21ClientState(state.g + msg.decoded, v)


def ef21_server_step(
    state: EF21ServerState,
    messages: Mapping[int, np.ndarray],
    n: int,
    weights: Sequence[float] | np.ndarray | None = None,
) -> EF21ServerState:
    """EF21(-PP / -W) server aggregate: ``g+ = g + sum_{i in S} w_i c_i``.

    Args:
        state: server ``g``.
        messages: decoded ``c_i`` of the sampled clients, keyed by client id in ``0..n-1``.
        n: TOTAL number of clients (not ``|S|``).
        weights: ``w`` of shape ``(n,)`` (e.g. :func:`ef21_weights`); None means ``1/n``.

    Then call :func:`fedsim.strategies.compressed.base.model_step` ``(x, new_state.g, gamma)``.
    """
    acc = weighted_sum(messages, n, weights)
    if acc is None:
        return EF21ServerState(state.g.copy())
    check_same_shape(acc, state.g, "ef21_server_step")
    return EF21ServerState(state.g + acc)


# --------------------------------------------------------------------------------------------
# in fedsim: client hooks and strategy
# --------------------------------------------------------------------------------------------


class EF21Client(CompressedClient):
    """EF21's client side: buffers ``g`` (and ``v`` with momentum) across rounds.

    Config: ``ef.scale`` (``a_i``, from :meth:`EF21.client_settings`) and ``ef.momentum``
    (EF21-SGDM's eta; 0 is plain EF21).
    """

    buffers = ("g", "v")

    def client_step(
        self, u: np.ndarray, compressor: Compressor, rng: np.random.Generator, init: bool, state: NamedArrays
    ) -> tuple[Message, NamedArrays]:
        scale = float(self.config.get("ef.scale", 1.0))
        mom = float(self.config.get("ef.momentum", 0.0))
        if init:
            msg, s = ef21_init_client(u, None, rng, scale=scale, momentum=mom > 0)
            return msg, s.to_arrays()
        s0 = EF21ClientState.from_arrays(state) if state else EF21ClientState.zeros(u.size, momentum=mom > 0)
        if mom > 0:
            if s0.v is None:
                s0 = EF21ClientState(s0.g, np.zeros(u.size, np.float32))
            msg, s = ef21_sgdm_client_step(s0, u, compressor, mom, rng, scale=scale)
        else:
            msg, s = ef21_client_step(s0, u, compressor, rng, scale=scale)
        return msg, s.to_arrays()


@STRATEGIES.register("ef21")
class EF21(CompressedStrategy):
    """EF21 on the clients' round updates ``u_i = W - x_i^local``.

    Client ``i`` (sampled): ``c_i = C(a_i u_i - g_i)``, ``g_i += c_i`` (EF21-SGDM:
    ``v_i = (1-momentum) v_i + momentum a_i u_i``, ``c_i = C(v_i - g_i)``); it sends ``c_i``.
    Server: ``g += sum_{i in S} w_i c_i`` with ``w_i = 1/n`` for ``n`` the TOTAL number of
    clients (EF21-PP: clients not sampled keep ``g_i``), then ``x+ = x - server_lr * g``.

    Parameters (plus those of :class:`fedsim.strategies.compressed.base.CompressedStrategy`:
    ``compressor``, ``downlink``, ``server_lr``, ``seed``, ``bn``, ``init``, and Flower's
    FedAvg ones such as ``fraction_train``):
        momentum: EF21-SGDM's eta in (0, 1]; None (default) is plain EF21.
        smoothness: per-client constants ``L_i`` (a list of n positive numbers) for EF21-W:
            ``w_i = L_i / sum_j L_j`` and ``a_i = 1 / (n w_i)``; None is uniform EF21.
        init: ``"full"`` (default): round 1 every client sends ``u_i`` uncompressed and
            ``g_i = u_i``; ``"zero"``: ``g_i = 0``.
    """

    method = "ef21"
    client_hooks = hooks_path(EF21Client)
    default_init = "full"

    def __init__(self, momentum: float | None = None, smoothness: list[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if momentum is not None and not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = None if momentum is None else float(momentum)
        self.smoothness = None if smoothness is None else [float(v) for v in smoothness]
        if self.smoothness is not None:
            ef21_weights(self.smoothness)  # validates
        self.client_config["ef.momentum"] = float(self.momentum or 0.0)

    def _weights(self) -> np.ndarray | None:
        if self.smoothness is None:
            return None
        return ef21_weights(self.smoothness, self._n)

    def client_settings(self, client_id: int) -> dict[str, Any]:
        w = self._weights()
        return {"ef.scale": 1.0 if w is None else ef21_client_scale(w, client_id)}

    def server_step(self, decoded: dict[int, np.ndarray], examples: dict[int, float]) -> np.ndarray:
        d = next(iter(decoded.values())).size
        state = EF21ServerState(self._srv["g"]) if "g" in self._srv else EF21ServerState.zeros(d)
        state = ef21_server_step(state, decoded, self._n, self._weights())
        self._srv["g"] = state.g
        return state.g
