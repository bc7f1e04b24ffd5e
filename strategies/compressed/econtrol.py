"""EControl (Gao, Islamov, Stich, "EControl: Fast Distributed Optimization with Compression
and Error Control", ICLR 2024): error compensation whose feedback strength is controlled by
``eta``. User guide: docs/compression.md.

Read top to bottom: the equations, the client and server states, the pure client / server
steps (numpy on float32 vectors, never mutating their inputs), then the client hooks and the
Flower strategy that move those vectors through messages (:mod:`fedsim.strategies.compressed.base`).

Equations
---------
``n`` the TOTAL number of clients, ``C`` a compressor, ``g_i`` client ``i``'s gradient-like
vector at the current ``x`` (in fedsim its round update ``u_i = x - x_i^local``)::

    Delta_i = C(eta * e_i + g_i - h_i)
    e_i    <- e_i + g_i - h_i - Delta_i      (h_i = the value BEFORE this round's update)
    h_i    <- h_i + Delta_i
server::

    h      <- h + (1/n) sum_i Delta_i        (so h = mean_i h_i, kept incrementally)
    x      <- x - gamma * h

Order of the client updates: the method is often summarised as ``h_i += Delta_i`` followed by
``e_i += g_i - h_i - Delta_i``.  Taken literally as sequential code, the ``e`` update would
see the *new* ``h_i`` and subtract ``Delta_i`` twice.  We implement the reading in which all
right-hand sides use this round's (pre-update) ``h_i``: then
``e_i^{t+1} = (1 - eta) e_i^t + [p_i - C(p_i)]`` with ``p_i = eta e_i + g_i - h_i`` the vector
that was compressed, i.e. ``e_i`` accumulates exactly the part of the intended message that
compression dropped; with ``eta = 0`` the ``h`` recursion is EF21's ``g`` recursion
(``h_i += C(g_i - h_i)``), which is what makes "eta = 0 recovers EF21" true.

Initialisation: ``e_i = 0`` and ``h_i = g_i`` from one uncompressed round
(:func:`econtrol_init_client`; passing a compressor gives ``h_i = C(g_i)``, the start under
which eta = 0 reproduces EF21 started from ``g_i = C(u_i)``).  ``eta`` default
:data:`ECONTROL_DEFAULT_ETA` = 1e-3 (unconfirmed; the theory uses delta/400; the authors
evaluated Top-K only).  Partial participation (unsampled clients keep ``e_i, h_i``; the
server divides by the total ``n``) mirrors EF21-PP and is a fedsim extension (unconfirmed:
the paper's algorithm is full-participation).
"""

from __future__ import annotations

from collections.abc import Mapping
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
    "ECONTROL_DEFAULT_ETA",
    "EControlClientState",
    "EControlServerState",
    "econtrol_init_client",
    "econtrol_client_step",
    "econtrol_server_step",
    "EControlClient",
    "EControl",
]

ECONTROL_DEFAULT_ETA = 1e-3
"""Default EControl feedback strength eta (unconfirmed; the theory uses delta/400)."""


# --------------------------------------------------------------------------------------------
# states
# --------------------------------------------------------------------------------------------


@dataclass
class EControlClientState:
    """EControl client state: error ``e`` (= e_i) and message estimate ``h`` (= h_i)."""

    e: np.ndarray
    h: np.ndarray

    @classmethod
    def zeros(cls, d: int) -> EControlClientState:
        return cls(np.zeros(d, np.float32), np.zeros(d, np.float32))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"e": self.e.copy(), "h": self.h.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> EControlClientState:
        e, h = state_array(arrays, "e", cls.__name__), state_array(arrays, "h", cls.__name__)
        check_same_shape(e, h, "EControlClientState")
        return cls(e, h)


@dataclass
class EControlServerState:
    """EControl server state: ``h = (1/n) sum_i h_i`` (float32 [d])."""

    h: np.ndarray

    @classmethod
    def zeros(cls, d: int) -> EControlServerState:
        return cls(np.zeros(d, np.float32))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"h": self.h.copy()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> EControlServerState:
        return cls(state_array(arrays, "h", cls.__name__))


# --------------------------------------------------------------------------------------------
# the algebra: client and server steps
# --------------------------------------------------------------------------------------------


def econtrol_init_client(
    g: np.ndarray,
    compressor: Compressor | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[Message, EControlClientState]:
    """EControl start: ``e_i = 0``, ``h_i = g_i`` sent uncompressed (or ``h_i = C(g_i)``).

    The message's decoded vector is ``h_i`` itself, so the server initialises with
    :func:`econtrol_server_step` from :meth:`EControlServerState.zeros`.
    """
    g = vector(g, "g")
    msg = send(g, compressor or Identity(), rng)
    return msg, EControlClientState(np.zeros_like(g), msg.decoded.copy())


def econtrol_client_step(
    state: EControlClientState,
    g: np.ndarray,
    compressor: Compressor,
    eta: float = ECONTROL_DEFAULT_ETA,
    rng: np.random.Generator | None = None,
) -> tuple[Message, EControlClientState]:
    """EControl client step (all right-hand sides use this round's ``e_i, h_i``)::

        Delta_i = C(eta * e_i + g_i - h_i)
        e_i+    = e_i + g_i - h_i - Delta_i
        h_i+    = h_i + Delta_i

    Args:
        state: ``e_i``, ``h_i``.
        g: the client's gradient-like vector ``g_i`` at the current model.
        compressor: ``C`` (the authors evaluated Top-K only).
        eta: feedback strength (>= 0); ``eta = 0`` gives EF21's recursion for ``h_i``.
        rng: generator for randomised compressors.

    Returns:
        ``(message, new_state)``; ``message.decoded`` is ``Delta_i``.
    """
    if eta < 0:
        raise ValueError(f"econtrol_client_step: eta must be >= 0, got {eta}")
    g = vector(g, "g")
    check_same_shape(g, state.h, "econtrol_client_step")
    p = np.float32(eta) * state.e + g - state.h
    msg = send(p, compressor, rng)
    delta = msg.decoded
    e_new = state.e + g - state.h - delta
    h_new = state.h + delta
    return msg, EControlClientState(e_new, h_new)


def econtrol_server_step(state: EControlServerState, deltas: Mapping[int, np.ndarray], n: int) -> EControlServerState:
    """EControl server aggregate: ``h+ = h + (1/n) sum_{i in S} Delta_i`` (keeps ``h = mean h_i``).

    ``n`` is the TOTAL number of clients.  Then call :func:`fedsim.strategies.compressed.base.model_step` ``(x, h, gamma)``.
    """
    acc = weighted_sum(deltas, n, None)
    if acc is None:
        return EControlServerState(state.h.copy())
    check_same_shape(acc, state.h, "econtrol_server_step")
    return EControlServerState(state.h + acc)


# --------------------------------------------------------------------------------------------
# in fedsim: client hooks and strategy
# --------------------------------------------------------------------------------------------


class EControlClient(CompressedClient):
    """EControl's client side: buffers ``e`` and ``h`` across rounds; config ``ef.eta``."""

    buffers = ("e", "h")

    def client_step(
        self, u: np.ndarray, compressor: Compressor, rng: np.random.Generator, init: bool, state: NamedArrays
    ) -> tuple[Message, NamedArrays]:
        if init:
            msg, s = econtrol_init_client(u, None, rng)
            return msg, s.to_arrays()
        s0 = EControlClientState.from_arrays(state) if state else EControlClientState.zeros(u.size)
        msg, s = econtrol_client_step(s0, u, compressor, float(self.config.get("ef.eta", ECONTROL_DEFAULT_ETA)), rng)
        return msg, s.to_arrays()


@STRATEGIES.register("econtrol")
class EControl(CompressedStrategy):
    """EControl on the clients' round updates ``u_i = W - x_i^local`` (written ``g_i`` in the
    paper): ``Delta_i = C(eta e_i + u_i - h_i)``, ``e_i += u_i - h_i - Delta_i``,
    ``h_i += Delta_i`` (right-hand sides use this round's ``e_i, h_i``); the client sends
    ``Delta_i``. Server: ``h += (1/n) sum_{i in S} Delta_i`` (``n`` the TOTAL number of
    clients; unsampled clients keep ``e_i, h_i``, a fedsim extension of the
    full-participation algorithm), then ``x+ = x - server_lr * h``.

    Parameters (plus those of :class:`fedsim.strategies.compressed.base.CompressedStrategy`):
        eta: feedback strength >= 0 (default 1e-3, unconfirmed; theory: delta/400).
            ``eta=0`` is EF21 exactly (same start, same messages).
        init: ``"full"`` (default): round 1 every client sends ``u_i`` uncompressed,
            ``h_i = u_i``, ``e_i = 0``; ``"zero"``: ``e_i = h_i = 0``.
    """

    method = "econtrol"
    client_hooks = hooks_path(EControlClient)
    default_init = "full"

    def __init__(self, eta: float = ECONTROL_DEFAULT_ETA, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if float(eta) < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.client_config["ef.eta"] = self.eta

    def server_step(self, decoded: dict[int, np.ndarray], examples: dict[int, float]) -> np.ndarray:
        d = next(iter(decoded.values())).size
        state = EControlServerState(self._srv["h"]) if "h" in self._srv else EControlServerState.zeros(d)
        state = econtrol_server_step(state, decoded, self._n)
        self._srv["h"] = state.h
        return state.h
