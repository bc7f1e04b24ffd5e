"""Communication compressors, as small composable plug-ins (docs/compression.md).

Every compressor maps a flat float32 vector ``x`` (shape ``[d]``) to a *payload*: a dict of
named numpy arrays, exactly what goes on the wire.  ``decode`` turns a payload back into a
dense float32 vector of length ``d``; ``compress(x) = decode(encode(x))`` is the operator
``C(x)`` of the error-feedback equations (:mod:`fedsim.strategies.compressed.ef21`,
:mod:`fedsim.strategies.compressed.econtrol`).  The bytes fedsim reports as sent are
``nbytes(payload) = sum(arr.nbytes for arr in payload.values())``: values, indices (in the
smallest unsigned integer dtype that can index ``d``), seeds, scales and bit-packed codes
are all counted, and nothing else is sent.

Compressors:

* :class:`Identity` -- ``C(x) = x``; payload ``values`` float32 ``[d]``.  Contractive, delta = 1.
* :class:`TopK` -- keeps the ``k`` entries of largest magnitude, zeroes the rest.
  Payload ``values`` float32 ``[k]`` + ``indices`` (uint8/uint16/uint32/uint64, the smallest
  able to hold ``d - 1``), indices sorted ascending.  Contractive:
  ``||C(x) - x||^2 <= (1 - k/d) ||x||^2``, so ``delta = k/d``.
* :class:`RandK` -- keeps ``k`` coordinates drawn uniformly without replacement.  The indices
  are not sent: ``encode`` draws an integer ``seed`` from the caller's generator, derives the
  indices from ``np.random.default_rng(seed)`` and sends ``values`` float32 ``[k]`` + ``seed``
  uint64 ``[1]``; ``decode`` regenerates the same indices from the seed.  Biased (unscaled)
  Rand-K is contractive in expectation, ``E||C(x) - x||^2 = (1 - k/d)||x||^2`` (delta = k/d).
  With ``unbiased=True`` the values are scaled by ``d/k`` (``E[C(x)] = x``, variance
  ``omega = d/k - 1``); it is then not contractive.
* :class:`QSGD` -- unbiased stochastic quantization with ``s`` levels (Alistarh et al., NeurIPS
  2017): ``C(x)_j = ||x||_2 * sign(x_j) * xi_j / s`` where, with ``r_j = s|x_j| / ||x||_2`` and
  ``l_j = floor(r_j)``, ``xi_j = l_j + 1`` with probability ``r_j - l_j`` and ``l_j``
  otherwise.  Payload ``norm`` float32 ``[1]`` + ``codes``: per coordinate one sign bit and
  ``b = ceil(log2(s + 1))`` bits for ``xi_j``, bit-packed (``np.packbits``, big-endian bit
  order) into ``ceil(d (1 + b) / 8)`` bytes.  Unbiased with
  ``omega = min(d/s^2, sqrt(d)/s)``; not contractive.
* :class:`ScaledSign` -- ``C(x) = (||x||_1 / d) * sign(x)`` (zeros are sent as ``+``).
  Payload ``scale`` float32 ``[1]`` + ``signs`` = ``np.packbits(x >= 0)`` (``ceil(d/8)`` bytes).
  Contractive with ``||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d <= (1 - 1/d)||x||^2``
  (delta = 1/d in the worst case).

Randomised compressors (Rand-K, QSGD) take an explicit ``np.random.Generator`` and raise
``ValueError`` without one: no global RNG state is ever read.

Plug-ins: :data:`COMPRESSORS` is a :class:`fedsim.registry.Registry`.  A new compressor is
one class decorated with :func:`register_compressor` (or named by import path
``package.module:Class`` in a spec); :func:`make_compressor` builds one from a spec such as
``"topk:0.01"`` or ``{"name": "qsgd", "levels": 16}``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import numpy as np

from fedsim.registry import Registry, RegistryError

Payload = dict[str, np.ndarray]

__all__ = [
    "COMPRESSORS",
    "Payload",
    "Compressor",
    "Identity",
    "TopK",
    "RandK",
    "QSGD",
    "ScaledSign",
    "register_compressor",
    "make_compressor",
    "index_dtype",
    "payload_nbytes",
]

COMPRESSORS: Registry[type] = Registry("compressor")
"""Compressor classes by short name (aliases live on the classes, see :func:`register_compressor`)."""

C = TypeVar("C", bound=type)


def register_compressor(name: str, *aliases: str) -> Callable[[C], C]:
    """Class decorator: register a :class:`Compressor` under ``name`` (and spelling
    ``aliases``, accepted by :func:`make_compressor` but not listed) and set its ``name``."""

    def decorator(cls: C) -> C:
        cls.name = name  # type: ignore[attr-defined]
        cls.aliases = tuple(aliases)  # type: ignore[attr-defined]
        return COMPRESSORS.register(name)(cls)

    return decorator


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def index_dtype(d: int) -> np.dtype:
    """Smallest unsigned integer dtype that can hold every index ``0 .. d-1``."""
    if d < 1:
        raise ValueError(f"vector length must be >= 1, got {d}")
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if d - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"vector length {d} is too large to index")


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes on the wire of a payload: the sum of ``arr.nbytes`` over its arrays."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))


def _as_vector(x: np.ndarray) -> np.ndarray:
    """Validate and return ``x`` as a contiguous 1-D float32 array (no copy if already so)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"compressors take a flat vector, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("compressors take a non-empty vector")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _count_from(fraction: float | None, count: int | None, d: int) -> int:
    """``k`` from either a fraction of ``d`` (rounded, at least 1) or an absolute count."""
    if count is not None:
        return min(int(count), d)
    assert fraction is not None
    return max(1, min(d, int(round(fraction * d))))


def _check_fraction_count(cls: str, fraction: float | None, count: int | None) -> None:
    if (fraction is None) == (count is None):
        raise ValueError(f"{cls}: give exactly one of fraction= or count=")
    if fraction is not None and (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float, np.integer, np.floating))
        or not 0.0 < float(fraction) <= 1.0
    ):
        raise ValueError(f"{cls}: fraction must be a number in (0, 1], got {fraction!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1):
        raise ValueError(f"{cls}: count must be an integer >= 1, got {count!r}")


def _need_rng(cls: str, rng: np.random.Generator | None) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"{cls} is randomised: pass an explicit np.random.Generator as rng")
    return rng


def _parse_k(name: str, text: str) -> dict[str, Any]:
    """``"0.01"`` -> fraction, ``"100"`` -> count (an integer literal is a count)."""
    try:
        if text.strip().lstrip("+").isdigit():
            return {"count": int(text)}
        return {"fraction": float(text)}
    except ValueError:
        raise ValueError(f"compressor '{name}': '{text}' is not a fraction or count") from None


# --------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------


class Compressor(ABC):
    """A compression operator ``C``: ``encode`` to a payload, ``decode`` back to ``[d]``.

    Attributes:
        name: the name :func:`make_compressor` knows it by: set by :func:`register_compressor`,
            else the class's import path ``package.module:Class``.
        aliases: other spellings of ``name`` that :func:`make_compressor` accepts.
        spec_keys: the constructor arguments a dict spec may give (besides ``name``).
        contractive: whether ``E||C(x) - x||^2 <= (1 - delta) ||x||^2`` for some
            ``delta in (0, 1]`` (the class EF21 / EControl are analysed for).
        unbiased: whether ``E[C(x)] = x``.
        randomized: whether ``encode`` needs an ``rng``.
    """

    name: ClassVar[str] = "compressor"
    aliases: ClassVar[tuple[str, ...]] = ()
    spec_keys: ClassVar[tuple[str, ...]] = ()
    contractive: bool = True
    unbiased: bool = False
    randomized: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # an unregistered class is named by its import path, so its spec() round-trips
        # through make_compressor (the spec is what clients receive in their config)
        cls.name = f"{cls.__module__}:{cls.__qualname__}"

    @classmethod
    def parse_args(cls, args: list[str]) -> dict[str, Any]:
        """Constructor arguments from the ``:``-separated tail of a string spec
        (``"topk:0.01"`` -> ``["0.01"]``); the default takes none."""
        if args:
            raise ValueError(f"compressor '{cls.name}' takes no arguments, got '{':'.join(args)}'")
        return {}

    @abstractmethod
    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Payload:
        """Arrays sent on the wire for the flat float32 vector ``x``."""

    @abstractmethod
    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        """Dense float32 vector of length ``d`` represented by ``payload``."""

    def compress(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """``C(x) = decode(encode(x))`` as a float32 vector of the same length."""
        x = _as_vector(x)
        return self.decode(self.encode(x, rng), x.size)

    @staticmethod
    def nbytes(payload: Mapping[str, np.ndarray]) -> int:
        """Bytes on the wire: the sum of ``arr.nbytes`` over the payload arrays."""
        return payload_nbytes(payload)

    def delta(self, d: int) -> float | None:
        """Contraction parameter ``delta`` for vectors of length ``d`` (None if not contractive)."""
        return None

    def omega(self, d: int) -> float | None:
        """Variance parameter ``omega`` (``E||C(x)-x||^2 <= omega ||x||^2``) of unbiased ones."""
        return None

    def spec(self) -> dict[str, Any]:
        """A dict spec that :func:`make_compressor` turns back into an equal compressor."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k != "name")
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compressor) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.spec().items())))


# --------------------------------------------------------------------------------------------
# compressors
# --------------------------------------------------------------------------------------------


@register_compressor("identity", "none")
class Identity(Compressor):
    """No compression: ``C(x) = x``; sends the dense float32 vector (``4 d`` bytes)."""

    contractive = True
    unbiased = True

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Payload:
        return {"values": _as_vector(x).copy()}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        values = np.asarray(payload["values"], dtype=np.float32)
        if values.shape != (d,):
            raise ValueError(f"identity payload has shape {values.shape}, expected ({d},)")
        return values.copy()

    def delta(self, d: int) -> float:
        return 1.0

    def omega(self, d: int) -> float:
        return 0.0


@register_compressor("topk", "top-k", "top_k")
class TopK(Compressor):
    """Top-K sparsification: keep the ``k`` largest-magnitude entries of ``x``.

    ``C(x)_j = x_j`` if ``j`` is among the ``k`` indices of largest ``|x_j|``, else 0.
    Contractive with ``delta = k/d``.  Ties in ``|x_j|`` are broken deterministically
    (``np.argpartition`` on the same input always selects the same set).

    Args:
        fraction: ``k = max(1, round(fraction * d))``, ``fraction in (0, 1]``.
        count: absolute ``k`` (capped at ``d``).  Give exactly one of the two.

    Payload: ``values`` float32 ``[k]``, ``indices`` sorted ascending in
    :func:`index_dtype` ``(d)``.  Bytes: ``k * (4 + itemsize(indices))``.
    """

    spec_keys = ("fraction", "count")
    contractive = True
    unbiased = False

    def __init__(self, fraction: float | None = None, count: int | None = None) -> None:
        _check_fraction_count("TopK", fraction, count)
        self.fraction = None if fraction is None else float(fraction)
        self.count = None if count is None else int(count)

    @classmethod
    def parse_args(cls, args: list[str]) -> dict[str, Any]:
        if len(args) != 1:
            raise ValueError(
                f"compressor spec '{':'.join([cls.name, *args])}': expected 'topk:FRACTION' or 'topk:COUNT'"
            )
        return _parse_k(cls.name, args[0])

    def k(self, d: int) -> int:
        """Number of kept entries for a vector of length ``d``."""
        return _count_from(self.fraction, self.count, d)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Payload:
        x = _as_vector(x)
        d = x.size
        k = self.k(d)
        if k >= d:
            idx = np.arange(d)
        else:
            idx = np.argpartition(np.abs(x), d - k)[d - k :]
            idx.sort()
        return {"values": x[idx].astype(np.float32), "indices": idx.astype(index_dtype(d))}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        values = np.asarray(payload["values"], dtype=np.float32)
        indices = np.asarray(payload["indices"])
        if values.shape != indices.shape or values.ndim != 1:
            raise ValueError("topk payload: values and indices must be 1-D of equal length")
        out = np.zeros(d, dtype=np.float32)
        out[indices.astype(np.int64)] = values
        return out

    def delta(self, d: int) -> float:
        return self.k(d) / d

    def spec(self) -> dict[str, Any]:
        if self.fraction is not None:
            return {"name": self.name, "fraction": self.fraction}
        return {"name": self.name, "count": self.count}


@register_compressor("randk", "rand-k", "rand_k")
class RandK(Compressor):
    """Rand-K sparsification with a shared seed (indices are regenerated, not sent).

    ``encode`` draws ``seed = rng.integers(2**63)`` and the index set
    ``S = sort(default_rng(seed).choice(d, k, replace=False))``; ``C(x)_j = a * x_j`` for
    ``j in S`` and 0 elsewhere, with ``a = d/k`` if ``unbiased`` else ``a = 1``.

    * biased (default): contractive in expectation, ``delta = k/d``;
    * unbiased: ``E[C(x)] = x``, ``omega = d/k - 1``; not contractive.

    Args:
        fraction / count: as for :class:`TopK` (exactly one).
        unbiased: scale the kept values by ``d/k``.

    Payload: ``values`` float32 ``[k]`` (already scaled) and ``seed`` uint64 ``[1]``.
    """

    spec_keys = ("fraction", "count", "unbiased")
    randomized = True

    def __init__(self, fraction: float | None = None, count: int | None = None, unbiased: bool = False) -> None:
        _check_fraction_count("RandK", fraction, count)
        if not isinstance(unbiased, (bool, np.bool_)):
            raise ValueError(f"compressor 'randk': unbiased must be true/false, got {unbiased!r}")
        self.fraction = None if fraction is None else float(fraction)
        self.count = None if count is None else int(count)
        self.unbiased = bool(unbiased)
        self.contractive = not self.unbiased

    @classmethod
    def parse_args(cls, args: list[str]) -> dict[str, Any]:
        bad_flag = len(args) == 2 and args[1].lower() not in ("unbiased", "biased")
        if len(args) not in (1, 2) or bad_flag:
            raise ValueError(
                f"compressor spec '{':'.join([cls.name, *args])}': expected 'randk:FRACTION|COUNT[:unbiased]'"
            )
        out = _parse_k(cls.name, args[0])
        out["unbiased"] = len(args) == 2 and args[1].lower() == "unbiased"
        return out

    def k(self, d: int) -> int:
        """Number of kept entries for a vector of length ``d``."""
        return _count_from(self.fraction, self.count, d)

    @staticmethod
    def indices_from_seed(seed: int, d: int, k: int) -> np.ndarray:
        """The sorted index set (int64) that ``seed`` selects among ``d`` coordinates."""
        if k >= d:
            return np.arange(d, dtype=np.int64)
        idx = np.random.default_rng(int(seed)).choice(d, size=k, replace=False)
        return np.sort(idx.astype(np.int64))

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Payload:
        x = _as_vector(x)
        d = x.size
        k = self.k(d)
        seed = int(_need_rng("RandK", rng).integers(0, 2**63 - 1))
        idx = self.indices_from_seed(seed, d, k)
        values = x[idx]
        if self.unbiased:
            values = values * np.float32(d / k)
        return {"values": values.astype(np.float32), "seed": np.array([seed], dtype=np.uint64)}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        values = np.asarray(payload["values"], dtype=np.float32)
        seed = int(np.asarray(payload["seed"]).reshape(-1)[0])
        idx = self.indices_from_seed(seed, d, values.size)
        out = np.zeros(d, dtype=np.float32)
        out[idx] = values
        return out

    def delta(self, d: int) -> float | None:
        return None if self.unbiased else self.k(d) / d

    def omega(self, d: int) -> float | None:
        return d / self.k(d) - 1.0 if self.unbiased else None

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        else:
            out["count"] = self.count
        out["unbiased"] = self.unbiased
        return out


@register_compressor("qsgd")
class QSGD(Compressor):
    """QSGD: unbiased stochastic quantization of ``x / ||x||_2`` onto ``s`` levels
    (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017).

    With ``r_j = s |x_j| / ||x||_2`` and ``l_j = floor(r_j)``, draw
    ``xi_j = l_j + 1`` w.p. ``r_j - l_j`` (else ``l_j``); the quantized value is
    ``levels_j = sign(x_j) * xi_j`` (``|levels_j| <= s``) and
    ``C(x)_j = ||x||_2 * levels_j / s``; ``E[C(x)] = x`` (up to float32 rounding of the norm).

    Wire format (what a real encoder sends; docs/compression.md): ``norm`` float32 ``[1]``
    and ``codes`` uint8: for each coordinate ``j`` in order, one sign bit (1 = negative;
    0 for ``xi_j = 0``) followed by ``xi_j`` in ``b = ceil(log2(s + 1))`` bits, most
    significant bit first, the whole bit string packed by ``np.packbits`` (zero-padded to a
    whole byte): ``4 + ceil(d (1 + b) / 8)`` bytes.  A fixed-width code, not the paper's
    Elias coding (which is shorter for sparse level vectors, i.e. small ``s``).

    Args:
        levels: number of quantization levels ``s >= 1``.

    Not contractive; ``omega = min(d/s^2, sqrt(d)/s)``.
    """

    spec_keys = ("levels",)
    contractive = False
    unbiased = True
    randomized = True

    def __init__(self, levels: int) -> None:
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
            raise ValueError(f"QSGD: levels must be an integer >= 1, got {levels}")
        self.levels = int(levels)

    @classmethod
    def parse_args(cls, args: list[str]) -> dict[str, Any]:
        if len(args) != 1 or not args[0].isdigit():
            raise ValueError(f"compressor spec '{':'.join([cls.name, *args])}': expected 'qsgd:LEVELS' with an integer")
        return {"levels": int(args[0])}

    @property
    def level_bits(self) -> int:
        """``b = ceil(log2(s + 1))``: bits that hold every level ``0 .. s``."""
        return self.levels.bit_length()

    def quantize(self, x: np.ndarray, rng: np.random.Generator | None) -> tuple[np.float32, np.ndarray]:
        """``(||x||_2 as float32, levels)`` with ``levels`` int64 ``[d]`` in ``[-s, s]``."""
        x = _as_vector(x)
        gen = _need_rng("QSGD", rng)
        s = self.levels
        x64 = x.astype(np.float64)
        norm = float(np.linalg.norm(x64))
        if norm == 0.0:
            return np.float32(0.0), np.zeros(x.size, np.int64)
        r = np.minimum(s * np.abs(x64) / norm, float(s))
        low = np.floor(r)
        xi = low + (gen.random(x.size) < (r - low))
        return np.float32(norm), (np.sign(x64) * xi).astype(np.int64)

    def pack(self, levels: np.ndarray) -> np.ndarray:
        """Bit-pack ``levels`` (int ``[d]``, ``|levels| <= s``): sign bit + ``b``-bit magnitude each."""
        levels = np.asarray(levels, dtype=np.int64)
        mag = np.abs(levels).astype(np.uint64)
        shifts = np.arange(self.level_bits - 1, -1, -1, dtype=np.uint64)  # MSB first
        bits = np.empty((levels.size, 1 + self.level_bits), dtype=np.uint8)
        bits[:, 0] = levels < 0
        bits[:, 1:] = (mag[:, None] >> shifts) & np.uint64(1)
        return np.packbits(bits.reshape(-1))

    def unpack(self, codes: np.ndarray, d: int) -> np.ndarray:
        """Inverse of :meth:`pack`: the ``d`` levels (int64)."""
        width = 1 + self.level_bits
        codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
        if codes.size != math.ceil(d * width / 8):
            raise ValueError(f"qsgd payload has {codes.size} code bytes, expected {math.ceil(d * width / 8)} for d={d}")
        bits = np.unpackbits(codes, count=d * width).reshape(d, width).astype(np.int64)
        shifts = np.arange(self.level_bits - 1, -1, -1, dtype=np.int64)
        mag = (bits[:, 1:] << shifts).sum(axis=1)
        return np.where(bits[:, 0] == 1, -mag, mag)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Payload:
        norm, levels = self.quantize(x, rng)
        return {"norm": np.array([norm], dtype=np.float32), "codes": self.pack(levels)}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        norm = np.float32(np.asarray(payload["norm"]).reshape(-1)[0])
        levels = self.unpack(payload["codes"], d)
        return (levels.astype(np.float32) * (norm / np.float32(self.levels))).astype(np.float32)

    def omega(self, d: int) -> float:
        s = self.levels
        return min(d / s**2, math.sqrt(d) / s)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "levels": self.levels}


@register_compressor("sign", "scaled_sign", "scaledsign")
class ScaledSign(Compressor):
    """Scaled sign: ``C(x) = (||x||_1 / d) * sign(x)``, with ``sign(0)`` sent as ``+1``.

    Payload: ``scale = ||x||_1 / d`` float32 ``[1]`` and ``signs = np.packbits(x >= 0)``
    (uint8, ``ceil(d/8)`` bytes).  Contractive:
    ``||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d``, so ``delta >= 1/d`` (worst case reported).
    """

    contractive = True
    unbiased = False

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> Payload:
        x = _as_vector(x)
        scale = float(np.abs(x.astype(np.float64)).sum() / x.size)
        return {"scale": np.array([scale], dtype=np.float32), "signs": np.packbits(x >= 0)}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        scale = np.float32(np.asarray(payload["scale"]).reshape(-1)[0])
        bits = np.unpackbits(np.asarray(payload["signs"], dtype=np.uint8), count=d)
        if bits.size != d:
            raise ValueError(f"sign payload holds {bits.size} signs, expected {d}")
        return np.where(bits.astype(bool), scale, -scale).astype(np.float32)

    def delta(self, d: int) -> float:
        return 1.0 / d


# --------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------


def _is_import_path(name: str) -> bool:
    return "." in name or ":" in name


def compressor_class(name: str) -> type[Compressor]:
    """The :class:`Compressor` subclass a spec's ``name`` denotes: a registered name or alias
    (case-insensitive) or an import path ``package.module:Class``."""
    key = name
    if not _is_import_path(name):
        key = name.lower()
        for registered in COMPRESSORS.names():
            if key in COMPRESSORS.get(registered).aliases:
                key = registered
    try:
        cls = COMPRESSORS.get(key)
    except RegistryError as exc:
        raise ValueError(str(exc)) from None
    if not (isinstance(cls, type) and issubclass(cls, Compressor)):
        raise ValueError(f"compressor '{name}' is not a Compressor subclass")
    return cls


def _split_string_spec(spec: str) -> tuple[str, list[str]]:
    """``"topk:0.01"`` -> ``("topk", ["0.01"])``; ``"pkg.mod:Cls:3"`` -> ``("pkg.mod:Cls", ["3"])``."""
    parts = [p.strip() for p in spec.strip().split(":")]
    if "." in parts[0] and len(parts) > 1:  # an import path's own ':' separates module and class
        return f"{parts[0]}:{parts[1]}", parts[2:]
    return parts[0], parts[1:]


def make_compressor(spec: Mapping[str, Any] | str | Compressor) -> Compressor:
    """Build a compressor from a spec.

    Accepted forms (a :class:`Compressor` instance is returned unchanged):

    * strings ``"identity"`` (or ``"none"``), ``"sign"``, ``"topk:0.01"`` (fraction) or
      ``"topk:100"`` (an integer literal is a count), ``"randk:0.1"`` /
      ``"randk:0.1:unbiased"``, ``"qsgd:16"``, ``"package.module:Class[:ARG...]"``;
    * dicts ``{"name": "topk", "fraction": 0.01}``, ``{"name": "randk", "count": 50,
      "unbiased": True}``, ``{"name": "qsgd", "levels": 16}``, ``{"name": "sign"}``.

    Raises:
        ValueError: one-line message for an unknown name, missing/extra keys or bad values.
    """
    if isinstance(spec, Compressor):
        return spec
    if isinstance(spec, str):
        name, args = _split_string_spec(spec)
        cls = compressor_class(name)
        kwargs = cls.parse_args(args)
    elif isinstance(spec, Mapping):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"compressor spec {spec!r} needs a string 'name'")
        cls = compressor_class(name)
        extra = set(kwargs) - set(cls.spec_keys)
        if extra:
            raise ValueError(f"compressor '{cls.name}': unexpected key(s) {', '.join(sorted(extra))}")
    else:
        raise ValueError(f"compressor spec must be a str or dict, got {type(spec).__name__}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required argument, e.g. qsgd without levels
        raise ValueError(f"compressor '{cls.name}': {exc}") from None
