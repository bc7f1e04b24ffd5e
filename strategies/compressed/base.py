"""The compressed-uplink protocol shared by every compressed method (docs/compression.md).

A method is one module of this package (:mod:`fedsim.strategies.compressed.plain`,
:mod:`fedsim.strategies.compressed.ef21`, :mod:`fedsim.strategies.compressed.econtrol`) holding its
equations as pure functions, its client side (a :class:`CompressedClient` implementing
:meth:`CompressedClient.client_step`) and its server side (a :class:`CompressedStrategy`
implementing :meth:`CompressedStrategy.server_step`). This module owns what they share and
names none of them: the wire protocol, the per-client buffers across rounds, the downlink,
BatchNorm handling and byte accounting (docs/extending.md shows a new method in one file).

What is compressed
    The client's model update over the round, taken as a descent direction,
    ``u_i = W - x_i^local`` (``W`` the model the client started from), over every
    floating-point tensor of the model except BatchNorm running statistics, flattened to one
    float32 vector (:func:`flatten`). The method's client step turns ``u_i`` and its buffers
    into a compressed message (:mod:`fedsim.strategies.compressed.compressors`); the server decodes
    the messages, the method's server step turns them into a direction and the server steps
    ``x+ = x - server_lr * direction`` (:func:`model_step`). All arithmetic is float32, as on
    the wire.

Round structure (identical to the papers' ``x^{t+1} = x^t - gamma g^t`` followed by clients
compressing ``grad_i(x^{t+1}) - g_i^t``): the server broadcasts ``x``; sampled clients
compute ``u_i`` at ``x`` and run their client step; the server applies its aggregate step
and then the model step. ``n`` is the TOTAL number of clients, ``S`` those sampled.

BatchNorm buffers (``running_mean``, ``running_var``, ``num_batches_tracked``)
    ``bn="average"`` (default): sent uncompressed next to the compressed payload and averaged
    by ``num-examples`` over the received clients, as FedAvg does (they are statistics, not a
    gradient-like quantity, and small); their bytes are counted. ``bn="local"``: FedBN-style,
    every normalization tensor stays on the client (never sent, restored from the client's
    state), the compressed update is zero on the BN affine parameters.

Downlink
    ``downlink="identity"``: every sampled client gets the dense model. Otherwise EF21-BC-style
    bidirectional compression: the server keeps its own model ``x`` and a public model ``W``
    that every client can reconstruct; after each round ``b_t = C_down(x_t - W_{t-1})``,
    ``W_t = W_{t-1} + decode(b_t)`` (error feedback on the downlink), and clients train from
    ``W``. A sampled client that holds ``W_v`` (the server tracks ``v`` per client) receives the
    increments ``b_{v+1} .. b_{t-1}`` it missed, or the dense ``W_{t-1}`` when that would be
    smaller or the increments are older than ``downlink_history`` rounds. Client and server
    apply the same float32 additions in the same order, so they agree bit for bit.

Dropped replies (failure, NaN, timeout)
    A client writes its buffers before it knows whether the server will use its reply. It
    therefore keeps two versions, ``acc.*`` (what the server had accepted before this
    participation) and ``new.*`` (after it); every train message carries the round of the
    client's last accepted reply (``ef.ack``), from which the client picks the version the
    server's aggregate actually contains. The same holds for the public model ``W``.

Bytes
    Uplink: every reply array (the compressor's payload as the compressor sends it, plus
    the dense BN arrays). Downlink: every array of each train message. Both next to the
    dense equivalents, in the strategy metrics (docs/compression.md, "What is counted").
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.app import (
    Message as FlowerMessage,  # ours, Message, is the compressed payload
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from fedsim.arrays import NamedArrays, numpy_to_record, record_to_numpy
from fedsim.engine.client_state import ClientState
from fedsim.engine.hooks import ClientHooks
from fedsim.models import norm_state_keys
from fedsim.strategies.compressed.compressors import (
    Compressor,
    Identity,
    Payload,
    RandK,
    TopK,
    make_compressor,
    payload_nbytes,
)
from fedsim.strategies.fedavg import FedAvg

UP = "__ef__/"  # reply payload array names: __ef__/<payload key>
DOWN = "__down__/"  # downlink increments: __down__/<round>/<payload key>
STATE = "ef"  # client state item
DENSE_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_SALT_UP, _SALT_DOWN = 0xEF21, 0xD0E1


# ==========================================================================================
# the algebra's shared pieces (pure functions on float32 vectors; they never mutate inputs)
# ==========================================================================================


@dataclass(frozen=True)
class Message:
    """One client's compressed message: the wire payload and its decoded dense vector."""

    payload: Payload
    decoded: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes on the wire (sum of the payload arrays' ``nbytes``)."""
        return payload_nbytes(self.payload)


def vector(x: np.ndarray, what: str) -> np.ndarray:
    """``x`` as a flat float32 vector (no copy if it already is one); ``what`` names it in errors."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a flat vector, got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def check_same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ ({a.shape} vs {b.shape})")


def state_array(arrays: Mapping[str, np.ndarray], key: str, owner: str) -> np.ndarray:
    """A float32 copy of buffer ``key`` of a stored state (for ``from_arrays``)."""
    if key not in arrays:
        raise ValueError(f"{owner}.from_arrays: missing array '{key}' (got {sorted(arrays)})")
    return np.array(arrays[key], dtype=np.float32).reshape(-1)


def send(x: np.ndarray, compressor: Compressor, rng: np.random.Generator | None) -> Message:
    """Compress ``x``: the payload and ``C(x)`` as the receiver decodes it."""
    payload = compressor.encode(x, rng)
    return Message(payload, compressor.decode(payload, x.size))


def weighted_sum(
    messages: Mapping[int, np.ndarray], n: int, weights: Sequence[float] | np.ndarray | None
) -> np.ndarray | None:
    """``sum_{i in S} w_i m_i`` in float32 over clients in ascending id order (None if empty);
    ``weights`` of shape ``(n,)``, None meaning ``w_i = 1/n`` for the TOTAL ``n``."""
    if n < 1:
        raise ValueError(f"total number of clients n must be >= 1, got {n}")
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    if w is not None and w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    acc: np.ndarray | None = None
    for i in sorted(messages):
        if not 0 <= i < n:
            raise ValueError(f"client id {i} outside 0..{n - 1}")
        wi = np.float32(1.0 / n if w is None else w[i])
        term = wi * vector(messages[i], f"message of client {i}")
        acc = term if acc is None else acc + term
    return acc


def model_step(x: np.ndarray, direction: np.ndarray, gamma: float) -> np.ndarray:
    """Server model step ``x+ = x - gamma * direction`` (``direction``: the method's server
    step result, e.g. EF21's ``g`` or EControl's ``h``; ``gamma``: ``server_lr``)."""
    x = vector(x, "x")
    direction = vector(direction, "direction")
    check_same_shape(x, direction, "model_step")
    return x - np.float32(gamma) * direction


# ==========================================================================================
# flat vectors of named arrays
# ==========================================================================================


@dataclass(frozen=True)
class LayoutEntry:
    """Where one named array lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    size: int


@dataclass(frozen=True)
class Layout:
    """Ordered description of a flattened dict of arrays (the dict's insertion order)."""

    entries: tuple[LayoutEntry, ...]

    @property
    def size(self) -> int:
        """Total length ``d`` of the flat vector."""
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Concatenate named arrays (in the mapping's order) into one float32 vector.

    Returns ``(vec, layout)``; :func:`unflatten` inverts it, casting each piece back to its
    original dtype.  Intended for floating-point parameters/updates: integer buffers (e.g. BN
    ``num_batches_tracked``) survive only while their values are exact in float32.
    """
    entries: list[LayoutEntry] = []
    pieces: list[np.ndarray] = []
    offset = 0
    for name, arr in arrays.items():
        a = np.asarray(arr)
        shape = tuple(int(s) for s in a.shape)
        entries.append(LayoutEntry(name, shape, a.dtype.str, offset, int(a.size)))
        pieces.append(a.reshape(-1).astype(np.float32, copy=False))
        offset += int(a.size)
    vec = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return vec.astype(np.float32, copy=False), Layout(tuple(entries))


def unflatten(vec: np.ndarray, layout: Layout) -> dict[str, np.ndarray]:
    """Split a flat vector back into named arrays of the shapes/dtypes in ``layout``."""
    vec = np.asarray(vec)
    if vec.shape != (layout.size,):
        raise ValueError(f"vector has shape {vec.shape}, layout expects ({layout.size},)")
    return {
        e.name: vec[e.offset : e.offset + e.size].reshape(e.shape).astype(np.dtype(e.dtype)) for e in layout.entries
    }


def is_dense_key(name: str, floating: bool) -> bool:
    """Arrays sent uncompressed (never part of the compressed vector): BN running statistics
    and every non-floating tensor."""
    return (not floating) or name.rsplit(".", 1)[-1] in DENSE_SUFFIXES


def split_keys(arrays: NamedArrays) -> tuple[list[str], list[str]]:
    """(compressed keys, dense keys), each sorted by name: the flat vector's layout must not
    depend on dict order (a checkpoint reloads arrays in another order than the model's)."""
    comp, dense = [], []
    for k, v in sorted(arrays.items()):
        (dense if is_dense_key(k, np.issubdtype(np.asarray(v).dtype, np.floating)) else comp).append(k)
    return comp, dense


def client_rng(seed: int, server_round: int, client_id: int) -> np.random.Generator:
    """The generator of client ``client_id``'s uplink compressor in ``server_round``: depends
    only on (seed, round, client), so inline and Ray runs draw the same Rand-K / QSGD."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(server_round), int(client_id), _SALT_UP]))


def server_rng(seed: int, server_round: int) -> np.random.Generator:
    """The generator of the server's downlink compressor in ``server_round``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(server_round), _SALT_DOWN]))


def spec_text(c: Compressor) -> str:
    return json.dumps(c.spec(), sort_keys=True)


def keep_fraction(c: Compressor, d: int) -> float:
    """Fraction of coordinates a sparsifier keeps (1.0 for dense compressors)."""
    if isinstance(c, (TopK, RandK)):
        return c.k(d) / d
    return 1.0


# ==========================================================================================
# client side
# ==========================================================================================


class CompressedClient(ClientHooks, ABC):
    """Client side of the protocol: reconstructs the model it trains from, computes the
    round's update ``u_i``, keeps the method's buffers across rounds (two versions, see
    "Dropped replies" above) and replies with the method's compressed message.

    A method implements :meth:`client_step` and lists its buffers in :attr:`buffers`;
    settings arrive in the message config (``ef.*`` keys, put there by the strategy's
    ``client_config`` / ``client_settings``).
    """

    buffers: ClassVar[tuple[str, ...]] = ()
    """Names of the per-client vectors the method keeps between rounds (e.g. EF21's ``g``)."""

    @abstractmethod
    def client_step(
        self, u: np.ndarray, compressor: Compressor, rng: np.random.Generator, init: bool, state: NamedArrays
    ) -> tuple[Message, NamedArrays]:
        """One participation: ``(message, new buffers)`` from the update ``u`` (float32 [d]).

        ``state``: the buffers the server's aggregate contains (a subset of :attr:`buffers`;
        empty before the first accepted participation). ``init``: the round is the
        uncompressed start (``init="full"``); ``compressor`` is then the identity.
        ``rng``: this client's generator for this round (randomised compressors).
        """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.bn = str(config.get("ef.bn", "average"))
        self.train = bool(config.get("ef.train", False))
        self._w: np.ndarray | None = None
        self._layout: Layout | None = None
        self._comp: list[str] = []
        self._dense: list[str] = []
        self._st: NamedArrays = {}
        self._w_keep: tuple[int, np.ndarray] | None = None

    def local_keys(self, model: nn.Module) -> set[str]:
        return norm_state_keys(model) if self.bn == "local" else set()

    # -- load ------------------------------------------------------------------------------
    def load(self, model: nn.Module, received: NamedArrays, state: ClientState) -> None:
        sd = model.state_dict()
        self._comp = sorted(k for k, v in sd.items() if not is_dense_key(k, v.is_floating_point()))
        self._dense = sorted(k for k, v in sd.items() if is_dense_key(k, v.is_floating_point()))
        if not self.train:  # evaluation (or a dense broadcast): plain copy, local keys restored
            super().load(model, received, state)
            return
        self._st = dict(state.get(STATE) or {})
        rnd = int(self.config["ef.round"])
        compressed_down = "ef.down.dense" in self.config
        if not compressed_down or bool(self.config["ef.down.dense"]):
            super().load(model, received, state)
            self._w, self._layout = flatten({k: np.asarray(received[k]) for k in self._comp})
        else:
            self._w, self._layout = self._reconstruct(model, received, rnd)
            self._write(model, received, state)
        if compressed_down:
            known = int(self.config["ef.down.known"])
            self._w_keep = None if known < 0 else (known, self._have_w().get(known))  # type: ignore[assignment]
        self._w = self._w.astype(np.float32, copy=False)

    def _have_w(self) -> dict[int, np.ndarray]:
        have = {}
        for tag in ("acc", "new"):
            if f"{tag}.w" in self._st:
                have[int(self._st[f"{tag}.wver"][0])] = self._st[f"{tag}.w"]
        return have

    def _reconstruct(self, model: nn.Module, received: NamedArrays, rnd: int) -> tuple[np.ndarray, Layout]:
        sd = model.state_dict()
        _, layout = flatten({k: sd[k].detach().cpu().numpy() for k in self._comp})
        known = int(self.config["ef.down.known"])
        base = self._have_w().get(known)
        if base is None:
            raise RuntimeError(
                f"client state lacks public model version {known} that the server assumes (state versions: {sorted(self._have_w())})"
            )
        down = make_compressor(json.loads(str(self.config["ef.downlink"])))
        chain: dict[int, dict[str, np.ndarray]] = {}
        for key, value in received.items():
            if key.startswith(DOWN):
                r, _, pk = key[len(DOWN) :].partition("/")
                chain.setdefault(int(r), {})[pk] = np.asarray(value)
        if sorted(chain) != list(range(known + 1, rnd)):
            raise RuntimeError(f"downlink increments {sorted(chain)} do not lead from version {known} to {rnd - 1}")
        w = np.array(base, dtype=np.float32).reshape(-1)
        for r in sorted(chain):
            w = w + down.decode(chain[r], w.size)
        return w, layout

    def _write(self, model: nn.Module, received: NamedArrays, state: ClientState) -> None:
        """Put W (compressed keys), the dense keys sent and the client's local keys into model."""
        assert self._w is not None and self._layout is not None
        local = self.local_keys(model)
        named = unflatten(self._w, self._layout)
        saved = state.get("local") if local else None
        sd = model.state_dict()
        with torch.no_grad():
            for k, v in named.items():
                if k not in local:
                    sd[k].copy_(torch.from_numpy(np.asarray(v)).reshape(sd[k].shape))
            for k in self._dense:
                if k in received and k not in local:
                    sd[k].copy_(torch.from_numpy(np.asarray(received[k])).reshape(sd[k].shape))
            if saved:
                for k in local & saved.keys():
                    sd[k].copy_(torch.from_numpy(np.asarray(saved[k])).reshape(sd[k].shape))

    # -- reply -------------------------------------------------------------------------------
    def reply(self, model: nn.Module, received: NamedArrays, state: ClientState) -> NamedArrays:
        if not self.train:
            return super().reply(model, received, state)
        assert self._w is not None and self._layout is not None
        cfg = self.config
        sd = model.state_dict()
        local = self.local_keys(model)
        x_local, _ = flatten({k: sd[k].detach().cpu().numpy() for k in self._comp})
        u = (self._w - x_local).astype(np.float32)
        for e in self._layout.entries:  # local (FedBN) tensors are not shared: no update
            if e.name in local:
                u[e.offset : e.offset + e.size] = 0.0
        rnd, cid = int(cfg["ef.round"]), int(cfg["ef.client"])
        rng = client_rng(int(cfg.get("ef.seed", 0)), rnd, cid)
        init = bool(cfg.get("ef.init", False))
        comp = Identity() if init else make_compressor(json.loads(str(cfg["ef.compressor"])))
        base_tag = "new" if "round" in self._st and int(self._st["round"][0]) == int(cfg.get("ef.ack", 0)) else "acc"
        base = {b: self._st[f"{base_tag}.{b}"] for b in self.buffers if f"{base_tag}.{b}" in self._st}
        msg, new = self.client_step(u, comp, rng, init, base)
        out: NamedArrays = {"round": np.array([rnd], dtype=np.int64)}
        for b, v in base.items():
            out[f"acc.{b}"] = v
        for b, v in new.items():
            out[f"new.{b}"] = v
        if "ef.down.dense" in cfg:
            if self._w_keep is not None and self._w_keep[1] is not None:
                out["acc.w"], out["acc.wver"] = np.asarray(self._w_keep[1]), np.array([self._w_keep[0]], dtype=np.int64)
            out["new.w"], out["new.wver"] = self._w, np.array([rnd - 1], dtype=np.int64)
        state.put(STATE, out)
        if local:
            state.put("local", {k: sd[k].detach().cpu().numpy() for k in local})
        reply = {UP + k: v for k, v in msg.payload.items()}
        if self.bn == "average":
            for k in self._dense:
                reply[k] = sd[k].detach().cpu().numpy()
        return reply


# ==========================================================================================
# server side
# ==========================================================================================


class CompressedStrategy(FedAvg, ABC):
    """Server side of the protocol: samples clients, sends the (possibly compressed) model,
    decodes the replies, lets the method's :meth:`server_step` turn them into a direction,
    steps the model, averages BN statistics and reports bytes.

    A method sets :attr:`method` (its name in checkpoints), :attr:`client_hooks` (its
    :class:`CompressedClient`, via :func:`hooks_path`), :attr:`default_init`,
    :attr:`init_round` and implements :meth:`server_step`, keeping its server buffers in
    ``self._srv`` (checkpointed; each reported as ``<name>_norm``).

    Parameters (besides Flower's FedAvg ones, e.g. ``fraction_train``):
        compressor: uplink compressor spec (``"topk:0.01"``, ``"randk:0.05"``, ``"qsgd:16"``,
            ``"sign"``, ``"identity"`` or a dict; see :func:`fedsim.strategies.compressed.compressors.make_compressor`).
        downlink: downlink compressor spec; ``"identity"`` sends the dense model.
        server_lr: gamma in ``x+ = x - gamma * direction`` (1.0: a FedAvg-like step).
        seed: seeds Rand-K / QSGD draws (per round and client); set it to the scenario seed.
        bn: ``"average"`` (BN running statistics sent dense and averaged) or ``"local"`` (FedBN).
        init: ``"full"``: round 1 samples every client and each sends its update
            uncompressed (the EF21 / EControl start ``g_i = u_i``, ``h_i = u_i``); ``"zero"``:
            buffers start at zero and every message is compressed.
        downlink_history: increments the server keeps for clients catching up.
    """

    method: ClassVar[str]
    """The method's name, stored in checkpoints (a resume must not switch methods)."""
    client_hooks: ClassVar[str]
    """``hooks_path(<the method's CompressedClient>)``."""
    default_init: ClassVar[str] = "zero"
    init_round: ClassVar[bool] = True
    """Whether ``init="full"`` means an uncompressed first round with every client (methods
    without client buffers have nothing to initialise and ignore it)."""

    def __init__(
        self,
        compressor: Any = "topk:0.01",
        downlink: Any = "identity",
        server_lr: float = 1.0,
        seed: int = 0,
        bn: str = "average",
        init: str | None = None,
        downlink_history: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.up = make_compressor(compressor)
        self.down = make_compressor(downlink)
        if bn not in ("average", "local"):
            raise ValueError(f"bn must be 'average' or 'local', got {bn!r}")
        init = init or self.default_init
        if init not in ("full", "zero"):
            raise ValueError(f"init must be 'full' or 'zero', got {init!r}")
        if float(server_lr) <= 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        if int(downlink_history) < 0:
            raise ValueError(f"downlink_history must be >= 0, got {downlink_history}")
        self.server_lr = float(server_lr)
        self.seed = int(seed)
        self.bn = bn
        self.init = init
        self.downlink_history = int(downlink_history)
        self.compress_down = not isinstance(self.down, Identity)
        self.client_config: dict[str, Any] = {
            "ef.compressor": spec_text(self.up),
            "ef.downlink": spec_text(self.down),
            "ef.bn": bn,
            "ef.seed": self.seed,
        }
        # server state (see state_dict)
        self._n = 0
        self._srv: dict[str, np.ndarray] = {}  # the method's server buffers (EF21's g, EControl's h)
        self._x: np.ndarray | None = None  # server model (== public W unless downlink is compressed)
        self._accepted = np.zeros(0, np.int64)  # round of each client's last aggregated reply (0: none)
        self._version = np.zeros(0, np.int64)  # public model version each client holds (-1: none)
        self._hist: dict[int, dict[str, np.ndarray]] = {}  # downlink increments b_t
        # per-round scratch
        self._order: list[str] = []
        self._comp: list[str] = []
        self._dense_keys: list[str] = []
        self._layout: Layout | None = None
        self._W: np.ndarray | None = None
        self._dense_vals: NamedArrays = {}
        self._init_round = False
        self._down_stats = {"bytes_down_payload": 0, "bytes_down_dense": 0, "num_resync": 0}

    # -- what a method provides -----------------------------------------------------------------
    @abstractmethod
    def server_step(self, decoded: dict[int, np.ndarray], examples: dict[int, float]) -> np.ndarray:
        """Update the server buffers (``self._srv``) from this round's decoded messages
        (client id -> float32 [d]; ``examples``: each client's ``num-examples``) and return
        the direction of the model step ``x+ = x - server_lr * direction``."""

    def client_settings(self, client_id: int) -> dict[str, Any]:
        """Per-client config entries (e.g. EF21-W's scale); none by default."""
        return {}

    # -- bookkeeping ----------------------------------------------------------------------------
    def _ensure_clients(self, n: int) -> None:
        if self._n == n and self._accepted.size == n:
            return
        if self._n not in (0, n):
            raise RuntimeError(f"the number of clients changed from {self._n} to {n}")
        self._n = n
        self._accepted = np.zeros(n, np.int64)
        self._version = np.full(n, -1, np.int64)

    def _set_public(self, arrays: ArrayRecord) -> None:
        named = record_to_numpy(arrays)
        self._order = list(named)
        self._comp, self._dense_keys = split_keys(named)
        self._W, self._layout = flatten({k: named[k] for k in self._comp})
        self._W = self._W.astype(np.float32, copy=True)
        self._dense_vals = {k: named[k] for k in self._dense_keys}
        if self._x is None or not self.compress_down:
            self._x = self._W.copy()

    def _dense_nbytes(self) -> int:
        """Bytes of the uncompressed (BN) arrays at their own dtypes."""
        return int(sum(np.asarray(self._dense_vals[k]).nbytes for k in self._dense_keys))

    def _downlink_record(self, cid: int, rnd: int, arrays: ArrayRecord) -> tuple[ArrayRecord, bool, int]:
        assert self._W is not None
        known = int(self._version[cid])
        chain = list(range(known + 1, rnd))
        dense_bytes = 4 * self._W.size
        ok = (
            known >= 0
            and all(r in self._hist for r in chain)
            and sum(payload_nbytes(self._hist[r]) for r in chain) < dense_bytes
        )
        if not ok:
            return arrays, True, known
        out: NamedArrays = {f"{DOWN}{r}/{k}": v for r in chain for k, v in self._hist[r].items()}
        if self.bn == "average":
            out.update(self._dense_vals)
        return numpy_to_record(out), False, known

    # -- Flower Strategy API --------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[FlowerMessage]:
        if self.fraction_train == 0.0:
            return []
        # One vectorised check per round: sorting 100,000 Python ints every round was a
        # measurable part of a round's time (PartitionGrid gives them sorted already).
        ids = np.asarray(list(grid.get_node_ids()), dtype=np.int64)
        if not np.array_equal(ids, np.arange(ids.size)) and not np.array_equal(np.sort(ids), np.arange(ids.size)):
            raise RuntimeError("compressed strategies need node ids 0..n-1 (fedsim's PartitionGrid)")
        nodes = range(ids.size)
        self._ensure_clients(len(nodes))
        self._set_public(arrays)
        self._init_round = self.init == "full" and server_round == 1 and self.init_round
        if self._init_round:
            node_ids = list(nodes)
        else:
            size = max(int(len(nodes) * self.fraction_train), self.min_train_nodes)
            node_ids, _ = sample_nodes(grid, self.min_available_nodes, size)
        self._down_stats = {"bytes_down_payload": 0, "bytes_down_dense": 0, "num_resync": 0}
        dense_down = 4 * self._W.size + self._dense_nbytes()  # type: ignore[union-attr]
        messages = []
        for cid in sorted(int(i) for i in node_ids):
            cfg: dict[str, Any] = dict(config)
            cfg.update(
                {
                    "server-round": server_round,
                    "ef.train": True,
                    "ef.round": server_round,
                    "ef.client": cid,
                    "ef.ack": int(self._accepted[cid]),
                    "ef.init": self._init_round,
                }
            )
            cfg.update(self.client_settings(cid))
            record = arrays
            if self.compress_down:
                record, dense, known = self._downlink_record(cid, server_round, arrays)
                cfg["ef.down.dense"], cfg["ef.down.known"] = dense, known
                self._down_stats["num_resync"] += int(dense)
            self._down_stats["bytes_down_payload"] += int(sum(np.asarray(v.numpy()).nbytes for v in record.values()))
            self._down_stats["bytes_down_dense"] += dense_down
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: ConfigRecord(cfg)})
            messages.append(FlowerMessage(content=content, message_type=MessageType.TRAIN, dst_node_id=cid))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[FlowerMessage]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._W is not None and self._x is not None and self._layout is not None
        d = self._W.size
        decoder = Identity() if self._init_round else self.up
        decoded: dict[int, np.ndarray] = {}
        examples: dict[int, float] = {}
        dense_in: dict[int, NamedArrays] = {}
        up_bytes = 0
        for r in sorted(replies, key=lambda m: int(m.metadata.src_node_id)):
            if r.has_error():
                continue
            cid = int(r.metadata.src_node_id)
            arrs = record_to_numpy(next(iter(r.content.array_records.values())))
            payload = {k[len(UP) :]: v for k, v in arrs.items() if k.startswith(UP)}
            decoded[cid] = decoder.decode(payload, d)
            examples[cid] = float(r.content["metrics"]["num-examples"])
            dense_in[cid] = {k: arrs[k] for k in self._dense_keys if k in arrs}
            up_bytes += payload_nbytes(arrs)
        if decoded:
            direction = self.server_step(decoded, examples)
            self._x = model_step(self._x, direction, self.server_lr)
            if self.bn == "average":
                self._average_dense(dense_in, examples)
            for cid in decoded:
                self._accepted[cid] = server_round
                self._version[cid] = server_round - 1
        # public model W_t (downlink error feedback when compressed)
        down_ratio = 1.0
        if self.compress_down:
            b = self.down.encode(self._x - self._W, server_rng(self.seed, server_round))
            self._W = self._W + self.down.decode(b, d)
            self._hist[server_round] = b
            for r in [r for r in self._hist if r <= server_round - self.downlink_history]:
                del self._hist[r]
            down_ratio = payload_nbytes(b) / (4 * d)
        else:
            self._W = self._x.copy()
        named = unflatten(self._W, self._layout)
        named.update(self._dense_vals)
        out = numpy_to_record({k: named[k] for k in self._order})
        n_rep = len(decoded)
        dense_up = n_rep * (4 * d + (self._dense_nbytes() if self.bn == "average" else 0))
        metrics: dict[str, Any] = {
            "bytes_up_payload": int(up_bytes),
            "bytes_up_dense": int(dense_up),
            "uplink_ratio": float(up_bytes / dense_up) if dense_up else 0.0,
            "uplink_keep_fraction": 1.0 if self._init_round else keep_fraction(self.up, d),
            "downlink_increment_ratio": float(down_ratio),
            "num_clients_total": int(self._n),
            "model_dim": int(d),
            "init_round": int(self._init_round),
            **{k: int(v) for k, v in self._down_stats.items()},
        }
        for name, vec in self._srv.items():
            metrics[f"{name}_norm"] = float(np.linalg.norm(vec))
        return out, MetricRecord(metrics)

    def _average_dense(self, dense_in: dict[int, NamedArrays], examples: dict[int, float]) -> None:
        for k in self._dense_keys:
            ids = [c for c in sorted(dense_in) if k in dense_in[c]]
            if not ids:
                continue
            w = np.array([examples[c] for c in ids], dtype=np.float64)
            w = w / w.sum() if w.sum() > 0 else np.full(len(ids), 1.0 / len(ids))
            ref = np.asarray(self._dense_vals[k])
            acc = sum(wi * np.asarray(dense_in[c][k], dtype=np.float64) for wi, c in zip(w, ids))
            acc = np.asarray(acc).reshape(ref.shape)
            if np.issubdtype(ref.dtype, np.floating):
                self._dense_vals[k] = acc.astype(ref.dtype)
            else:
                self._dense_vals[k] = np.rint(acc).astype(ref.dtype)

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {f"srv/{k}": v.copy() for k, v in self._srv.items()}
        arrays["accepted"] = self._accepted.copy()
        arrays["version"] = self._version.copy()
        if self.compress_down and self._x is not None:
            arrays["x"] = self._x.copy()
        for r, payload in self._hist.items():
            for k, v in payload.items():
                arrays[f"hist/{r}/{k}"] = np.asarray(v).copy()
        return arrays, {"n": self._n, "method": self.method}

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        if scalars.get("method", self.method) != self.method:
            raise ValueError(f"checkpoint is of strategy method {scalars.get('method')!r}, not {self.method!r}")
        self._n = int(scalars.get("n", 0))
        self._srv = {
            k[len("srv/") :]: np.asarray(v, dtype=np.float32).copy() for k, v in arrays.items() if k.startswith("srv/")
        }
        self._accepted = np.asarray(arrays.get("accepted", np.zeros(self._n)), dtype=np.int64).copy()
        self._version = np.asarray(arrays.get("version", np.full(self._n, -1)), dtype=np.int64).copy()
        self._x = np.asarray(arrays["x"], dtype=np.float32).copy() if "x" in arrays else None
        self._hist = {}
        for key, v in arrays.items():
            if key.startswith("hist/"):
                r, _, pk = key[len("hist/") :].partition("/")
                self._hist.setdefault(int(r), {})[pk] = np.asarray(v).copy()
