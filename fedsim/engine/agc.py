"""Adaptive gradient clipping (AGC; Brock et al. 2021, used by FedWon), unit-wise.

For every parameter W with gradient G and every output unit i (row i of a linear weight
[out, in], output channel i of a conv weight [out, in, kh, kw]; a vector such as a bias or
a gain is one unit):

    ||W_i||* = max(||W_i||_F, eps)
    if ||G_i||_F / ||W_i||* > lambda:   G_i <- lambda * ||W_i||* / ||G_i||_F * G_i

Rows under the threshold are left bit-identical. ``lambda`` ("clip factor") is a setting:
NFNets use 0.01 at batch 4096; FedWon's small batches need a far larger value
(FedWon's own value **unconfirmed**; fedsim's default :data:`DEFAULT_LAMBDA`).

A client option of every strategy: :class:`fedsim.engine.hooks.ClientHooks` (the client side
every strategy builds on) clips after each backward pass when the train message's config
sets ``fedsim.agc.lambda`` (0 or absent: off; the scenario's ``client.agc_lambda``, FedWon's
``agc_lambda``), with ``fedsim.agc.eps`` and ``fedsim.agc.exclude`` (comma-separated parameter-name
prefixes left unclipped, e.g. the classifier head as NFNets do): :func:`agc_settings` reads
them, :func:`clip_model_` applies them. :func:`adaptive_clip_` clips any parameters directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

DEFAULT_LAMBDA = 1.0  # unconfirmed for FedWon; see module docstring
DEFAULT_EPS = 1e-3


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm per output unit (dim 0), shaped to broadcast against ``x``; a
    scalar or vector is a single unit."""
    if x.ndim <= 1:
        return x.norm(p=2)
    return x.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.ndim - 1)))


@torch.no_grad()
def adaptive_clip_(parameters: Iterable[torch.Tensor], clip: float, eps: float = DEFAULT_EPS) -> int:
    """Clip gradients in place, unit-wise (see module docstring). Returns how many units
    were clipped (for tests and diagnostics)."""
    clipped = 0
    for p in parameters:
        if p.grad is None:
            continue
        w_norm = unitwise_norm(p.detach()).clamp_min(eps)
        g_norm = unitwise_norm(p.grad)
        max_norm = clip * w_norm
        over = g_norm > max_norm
        if bool(over.any()):
            # g_norm > max_norm >= clip*eps > 0 wherever ``over``, so the division is safe.
            scale = torch.where(over, max_norm / g_norm.clamp_min(1e-30), torch.ones_like(g_norm))
            p.grad.mul_(scale)
            clipped += int(over.sum())
    return clipped


def agc_settings(config: dict[str, Any]) -> tuple[float, float, tuple[str, ...]]:
    """(lambda, eps, excluded name prefixes) from a message config."""
    lam = float(config.get("fedsim.agc.lambda", 0.0) or 0.0)
    eps = float(config.get("fedsim.agc.eps", DEFAULT_EPS))
    raw = str(config.get("fedsim.agc.exclude", "") or "")
    exclude = tuple(s.strip() for s in raw.split(",") if s.strip())
    if lam < 0:
        raise ValueError(f"fedsim.agc.lambda must be >= 0 (got {lam})")
    return lam, eps, exclude


def clip_model_(model: nn.Module, clip: float, eps: float = DEFAULT_EPS, exclude: tuple[str, ...] = ()) -> int:
    params = [
        p for name, p in model.named_parameters() if p.requires_grad and not any(name.startswith(e) for e in exclude)
    ]
    return adaptive_clip_(params, clip, eps)


# Every fedsim client (fedsim.engine.hooks.ClientHooks.before_step) applies AGC when its
# message config has ``fedsim.agc.lambda`` > 0, so no mixin is needed to add it to a strategy.

__all__ = ["unitwise_norm", "adaptive_clip_", "clip_model_", "agc_settings", "DEFAULT_LAMBDA", "DEFAULT_EPS"]
